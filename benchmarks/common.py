"""What every benchmark script shares: its command line's common options and its result file
(the figures plus the machine, its load when the run started, and the time)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """An argument parser with `--data` (the MedMNIST .npz), `--batch` and `--out`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/pneumoniamnist.npz")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=f"benchmarks/results/{name}.json")
    return p


def save(out: str | os.PathLike, summary: dict) -> dict:
    """Add machine, load and time to `summary`, write it as JSON (atomically) and print it."""
    from kd_keras.errors import write_json

    summary = {
        **summary,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": os.getloadavg()[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, summary)
    print(json.dumps(summary, indent=2))
    return summary
