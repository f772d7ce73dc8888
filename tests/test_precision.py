"""Mixed precision: which policy "auto" picks, and float32 files whatever trained them."""

import numpy as np
import pytest
from conftest import build

from kd_keras import host
from kd_keras.distill.precision import choose_policy, float32_copy, policy_scope, resolve_policy


def _flags(tmp_path, line: str) -> frozenset[str]:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor: 0\nmodel name\t: Test CPU\nflags\t\t: {line}\n")
    host.cpu_flags.cache_clear()
    try:
        return host.cpu_flags(str(info))
    finally:
        host.cpu_flags.cache_clear()


def test_bf16_detection_and_policy(tmp_path):
    zen4 = _flags(tmp_path, "fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni")
    assert host.has_bf16(zen4) and host.has_vnni(zen4)
    assert host.isa_level(zen4) == "AVX-512 + VNNI + BF16"
    zen1 = _flags(tmp_path, "fpu sse avx2 fma")
    assert not host.has_bf16(zen1) and not host.has_vnni(zen1)
    assert host.isa_level(zen1) == "AVX2"
    spr = _flags(tmp_path, "avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile")
    assert host.isa_level(spr) == "AVX-512 + VNNI + BF16 + AMX"
    assert host.cpu_flags(str(tmp_path / "absent")) == frozenset()
    host.cpu_flags.cache_clear()
    assert resolve_policy("float32") == "float32"
    assert choose_policy("auto", spr) == ("float32", choose_policy("auto", spr)[1])
    assert "AMX" in choose_policy("auto", spr)[1], "AMX: measured no faster"
    assert choose_policy("auto", zen4)[0] == "float32", "AVX-512 BF16 alone measured slower"
    assert choose_policy("auto", zen1)[0] == "float32", "no bfloat16 arithmetic"


def test_auto_policy_matches_this_hosts_flags():
    """`auto` on this machine follows the flags /proc/cpuinfo shows (no GPU here)."""
    text = open("/proc/cpuinfo").read() if host.is_x86() else ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    reason = choose_policy("auto")[1]
    assert resolve_policy("auto") == "float32"  # every CPU class measured: float32 is fastest
    if "amx_tile" in flags:
        assert "AMX" in reason
    elif {"avx512_bf16"} & flags:
        assert "AVX-512 BF16" in reason
    else:
        assert "no native bfloat16" in reason


def test_float32_copy_keeps_weights_and_outputs():
    from kd_keras.models.registry import build_student

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    with policy_scope("mixed_bfloat16"):
        mixed = build_student("resnet18", 2, 32, tiny=True)
    assert mixed.get_layer("logits").dtype_policy.name == "float32", "logits stay float32"
    copy = float32_copy(mixed, lambda: build_student("resnet18", 2, 32, tiny=True))
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    for a, b in zip(mixed.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(mixed(x), copy(x), atol=0.1)  # bfloat16 vs float32 arithmetic


@pytest.mark.slow
def test_mixed_bfloat16_training_saves_float32_models(tmp_path, tiny_npz):
    """train.precision = mixed_bfloat16 trains in bfloat16 and saves float32 models."""
    import json

    import keras
    from conftest import ROOT, run_cli

    from kd_keras.models.loading import load_model

    sets = [f"data.path={tiny_npz}", f"run.output_dir={tmp_path}", "run.name=bf16",
            "eval.imbalanced_subset=false", "teacher.variant=tiny", "student.variant=tiny",
            "train.epochs=1", "train.precision=mixed_bfloat16", "train.verbose=0"]  # fmt: skip
    # tiny_npz's pixels are noise: a model at chance is accepted (--force), as the test is about
    # the precision, not the learning
    code, out, err = run_cli("distill", "--config", str(ROOT / "configs" / "xray.toml"), "--force",
                             *[a for s in sets for a in ("--set", s)])  # fmt: skip
    assert code == 0, err[-2000:]
    assert "precision: mixed_bfloat16" in out
    assert keras.config.dtype_policy().name == "float32", "the global policy is restored"
    for name in ("teacher", "student", "student_scratch"):
        model = load_model(tmp_path / "bf16" / f"{name}.keras")
        assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}, name
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert all(np.isfinite(e["test"]["accuracy"]) for e in report["models"].values())


def test_xla_is_chosen_per_architecture():
    from kd_keras.distill.precision import choose_jit_compile, resolve_jit_compile

    assert "oneDNN" in choose_jit_compile("auto", ["resnet18"])[1], "the log says why"

    assert resolve_jit_compile("auto", ["deit_small"]) is True, "measured faster with XLA"
    assert resolve_jit_compile("auto", ["deit_small", "resnet50"]) is False, "a conv teacher"
    assert resolve_jit_compile("auto", ["resnet18"]) is False
    assert resolve_jit_compile(True, ["resnet18"]) is True
    assert resolve_jit_compile(False, ["deit_small"]) is False


@pytest.mark.slow
def test_xla_train_step_matches_the_graph_step():
    """A DeiT student (XLA's "auto" pick) trains under jit_compile with the same loss."""
    import keras

    from kd_keras.distill.distiller import Distiller

    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 1, 0])
    logs = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        student = build("deit_small")
        d = Distiller(student, build("resnet50"), alpha=0.5, beta=0.0)
        d.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=jit)
        logs.append(d.train_on_batch(x, y, return_dict=True))
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-4)


@pytest.mark.slow  # starts TensorFlow in two fresh processes
def test_onednn_is_on_in_every_kd_keras_process():
    """A fresh process that imports kd_keras, then TensorFlow, runs oneDNN on x86 whatever
    TensorFlow's own default for the CPU is, unless the user chose (their value wins)."""
    import os
    import subprocess
    import sys

    if not host.is_x86():
        pytest.skip("the oneDNN rule is for x86 CPUs")
    code = ("import kd_keras, tensorflow; from kd_keras.host import onednn_enabled; "
            "print(onednn_enabled())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert on.stdout.strip().splitlines()[-1] == "True", on.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", code], env={**env, "TF_ENABLE_ONEDNN_OPTS": "0"},
                         capture_output=True, text=True)  # fmt: skip
    assert off.stdout.strip().splitlines()[-1] == "False", "the user's 0 wins"
