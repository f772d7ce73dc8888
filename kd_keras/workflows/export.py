"""The export workflow: export and check a run's model files, then write their model card."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from kd_keras.deploy.export import export_files
from kd_keras.deploy.tables import print_summary
from kd_keras.reporting.model_card import write_model_card


# `export_files`, then `MODEL_CARD.md` beside `export.json` and, unless `quiet`, the summary
# table; the result also names `model_card`. Same arguments (and help text) as `export_files`.
@functools.wraps(export_files, assigned=("__doc__", "__annotations__"))
def export_run(*args, **kwargs) -> dict[str, Any]:
    options = inspect.signature(export_files).bind(*args, **kwargs)
    options.apply_defaults()
    result = export_files(*options.args, **options.kwargs)
    result["model_card"] = str(write_model_card(result["run"], options.arguments["out_dir"]))
    if not options.arguments["quiet"]:
        print_summary(result)
    return result
