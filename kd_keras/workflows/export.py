"""The export workflow: export and check a run's model files, then write their model card."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from kd_keras.deploy.export import export_files
from kd_keras.deploy.tables import print_summary
from kd_keras.reporting.model_card import write_model_card


def export_run(
    run_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    models: Iterable[str] = ("student", "teacher"),
    int8: bool = False,
    tolerance: float | None = None,
    limit: int | None = None,
    fmt: str | Iterable[str] = "onnx",
    quiet: bool = False,
) -> dict[str, Any]:
    """Export a run's models (`kd_keras.deploy.export.export_files`, same arguments), write
    `MODEL_CARD.md` beside `export.json`, and print the summary unless `quiet`; returns
    export.json's content plus `export_dir` and `model_card`."""
    result = export_files(run_dir, out_dir, models, int8, tolerance, limit, fmt, quiet)
    result["model_card"] = str(write_model_card(result["run"], out_dir))
    if not quiet:
        print_summary(result)
    return result
