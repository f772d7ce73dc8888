"""What every benchmark script shares: its command line's common options and its result file
(the figures plus the host — CPU model, ISA level, oneDNN, threads, float32 peak — its load
when the run started, and the time).

Imported first by every script: importing kd_keras turns TensorFlow's oneDNN kernels on
(`kd_keras.host.enable_onednn`) before anything imports TensorFlow."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import kd_keras  # noqa: F401  (oneDNN on before TensorFlow loads)

LOAD_AT_START = os.getloadavg()[0]  # 1-minute load average when the script started


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """An argument parser with `--data` (the MedMNIST .npz), `--batch` and `--out`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/pneumoniamnist.npz")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=f"benchmarks/results/{name}.json")
    return p


def save(out: str | os.PathLike, summary: dict, peak: dict | None = None) -> dict:
    """Add the host (with the float32 `peak` measured in this run, else a TensorFlow MatMul
    peak measured now), load and time to `summary`, write it as JSON (atomically), print it."""
    from kd_keras.host import describe_host, tf_matmul_peak
    from kd_keras.io import write_json

    summary = {
        **summary,
        "host": describe_host(peak or tf_matmul_peak()),
        "load_before": LOAD_AT_START,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, summary)
    print(json.dumps(summary, indent=2))
    return summary
