"""The machine a run or a benchmark ran on: CPU model, ISA level, oneDNN, threads, peak.

Figures from two hosts are only comparable next to what the hosts are: an AVX2-only CPU trains
about 5x slower than an AVX-512 one in float32, INT8 pays only with VNNI, bfloat16 only with
AVX-512 BF16 or AMX. Every run log, benchmark result and report records `describe_host()`.

oneDNN: TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI,
BF16 or AMX; elsewhere its Eigen fallback back-propagates convolutions on small feature maps
up to 40x slower (measured on an AVX2-only AMD Zen 1: a ResNet18 train step at 32 px 2.37 s
without, 0.68 s with). `enable_onednn()` sets `TF_ENABLE_ONEDNN_OPTS=1` on x86 unless the
user set the variable; `kd_keras/__init__.py` calls it before anything imports TensorFlow.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from kd_keras.compat import tf_onednn_enabled

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
# the environment variable's value before kd_keras touched it (None: unset)
_USER_ONEDNN = os.environ.get(ONEDNN_ENV)

# ISA features that decide speed here, each as (label, any of these /proc/cpuinfo flags)
ISA_FEATURES = (
    ("AVX2", ("avx2",)),
    ("FMA", ("fma",)),
    ("AVX-512", ("avx512f",)),
    ("VNNI", ("avx512_vnni", "avx_vnni")),
    ("BF16", ("avx512_bf16", "amx_bf16")),
    ("AMX", ("amx_tile",)),
)


def is_x86() -> bool:
    """Whether this is an x86-64 machine (oneDNN's default rule and the flags below apply)."""
    return platform.machine().lower() in ("x86_64", "amd64", "x86", "i686")


def enable_onednn() -> None:
    """Turn TensorFlow's oneDNN kernels on for x86 CPUs where TensorFlow would leave them off,
    unless the user set `TF_ENABLE_ONEDNN_OPTS` (their value wins). Must run before the first
    `import tensorflow` of the process to take effect; worker processes inherit it."""
    if _USER_ONEDNN is None and is_x86():
        os.environ.setdefault(ONEDNN_ENV, "1")


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in `cpuinfo` (empty where unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's marketing name (`model name` in /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_features(flags: frozenset[str] | None = None) -> list[str]:
    """The speed-relevant ISA features present (labels of `ISA_FEATURES`, in that order)."""
    flags = cpu_flags() if flags is None else flags
    return [label for label, names in ISA_FEATURES if flags & set(names)]


def isa_level(flags: frozenset[str] | None = None) -> str:
    """One label for the host class: `AVX-512 + VNNI + BF16 + AMX`, `AVX2`, ... (`unknown`)."""
    features = [f for f in isa_features(flags) if f != "FMA"]
    if not features:
        return "unknown" if not is_x86() else "SSE only"
    base = "AVX-512" if "AVX-512" in features else "AVX2" if "AVX2" in features else features[0]
    extras = [f for f in features if f not in ("AVX2", "AVX-512")]
    return " + ".join([base, *extras])


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Native bfloat16 arithmetic (AVX-512 BF16 or AMX-BF16)."""
    return "BF16" in isa_features(flags)


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    """Integer dot-product instructions (AVX-512 VNNI or AVX-VNNI): what makes INT8 pay."""
    return "VNNI" in isa_features(flags)


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN kernels in this process (None: TensorFlow not
    imported yet, so not decided). Reads TensorFlow's own answer, not the environment."""
    if "tensorflow" not in sys.modules:
        return None
    return tf_onednn_enabled()


def threads() -> int:
    """CPU threads this process may use (its affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def tf_matmul_peak(n: int = 1024, seconds: float = 1.0) -> dict[str, Any]:
    """This process's float32 peak in TensorFlow (GFLOP/s): the fastest timed `n`x`n` MatMul
    on the CPU, with the kernels (oneDNN or Eigen) and threads training uses."""
    import tensorflow as tf

    with tf.device("/cpu:0"):
        a = tf.random.stateless_normal((n, n), seed=(0, 1))
        b = tf.random.stateless_normal((n, n), seed=(0, 2))
        matmul = tf.function(lambda x, y: tf.linalg.matmul(x, y))
        for _ in range(3):
            matmul(a, b).numpy()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            matmul(a, b).numpy()
            times.append(time.perf_counter() - t)
    return {
        "gflops": round(2 * n**3 / min(times) / 1e9, 1),
        "n": n,
        "calls": len(times),
        "method": f"fastest timed float32 {n}x{n} MatMul in TensorFlow (CPU, this process)",
    }


def describe_host(peak: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ran: CPU model, ISA level and features, oneDNN on/off (and who decided), threads,
    and the float32 peak measured in this run when one is given."""
    user = _USER_ONEDNN
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "isa_level": isa_level(),
        "isa": isa_features(),
        "onednn": onednn_enabled(),
        "onednn_setting": f"{ONEDNN_ENV}={user} (user)"
        if user is not None
        else f"{ONEDNN_ENV}={os.environ.get(ONEDNN_ENV, 'unset')} (kd_keras)",
        "threads": threads(),
        "cpu_count": os.cpu_count(),
    }
    if peak is not None:
        info["fp32_peak_gflops"] = peak.get("gflops")
        info["fp32_peak_method"] = peak.get("method")
    return info


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (10^6 bytes): `VmHWM` of
    /proc/self/status on Linux, else `resource.getrusage` (None where neither exists)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6, 1)


def host_line(info: dict[str, Any] | None = None) -> str:
    """`describe_host()` as one human line, for logs and report headers."""
    info = describe_host() if info is None else info
    onednn = {True: "on", False: "off", None: "not loaded"}[info.get("onednn")]
    line = (f"{info['cpu']} ({info['isa_level']}), {info['threads']} threads, "
            f"oneDNN {onednn}")  # fmt: skip
    if info.get("fp32_peak_gflops"):
        line += f", float32 peak {info['fp32_peak_gflops']} GFLOP/s"
    return line
