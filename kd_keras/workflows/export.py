"""The export workflow: export and check a run's model files, then write their model card."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from kd_keras.deploy.export import export_files
from kd_keras.reporting.model_card import write_model_card


# `export_files`, then `MODEL_CARD.md` beside `export.json`; the result also names
# `model_card`. Nothing is printed (`quiet` only silences the progress lines logged); the
# console summary is `kd_keras.deploy.tables.summary_renderables(result)`. Same arguments (and
# help text) as `export_files`.
@functools.wraps(export_files, assigned=("__doc__", "__annotations__"))
def export_run(*args, **kwargs) -> dict[str, Any]:
    options = inspect.signature(export_files).bind(*args, **kwargs)
    options.apply_defaults()
    result = export_files(*options.args, **options.kwargs)
    result["model_card"] = str(write_model_card(result["run"], options.arguments["out_dir"]))
    return result
