"""kd_keras: knowledge distillation of image classifiers with Keras 3.

The public API, importable from the package (loaded on first use, so `import kd_keras` does not
start TensorFlow):

    from kd_keras import load_config, run_distill, evaluate_run, export_run, benchmark_run
    cfg = load_config("configs/xray.toml", ["train.epochs=1"])
    report = run_distill(cfg)
"""

from __future__ import annotations

import importlib
import logging

from kd_keras.host import enable_onednn

# library code logs to the "kd_keras" loggers; nothing is shown unless the application
# configures logging (the command line shows INFO on stdout: kd_keras.cli.app)
logging.getLogger("kd_keras").addHandler(logging.NullHandler())

# before anything imports TensorFlow: oneDNN kernels on x86 CPUs where TensorFlow would leave
# them off (AVX2-only hosts train 3-4x faster with them; see kd_keras.host)
enable_onednn()

_API = {
    "load_config": "kd_keras.config",
    "Config": "kd_keras.config",
    "KDError": "kd_keras.errors",
    "RunFolder": "kd_keras.run.folder",
    "Distiller": "kd_keras.distill.distiller",
    "FeatureAdapter": "kd_keras.distill.distiller",
    "build_teacher": "kd_keras.models.registry",
    "build_student": "kd_keras.models.registry",
    "load_model": "kd_keras.models.loading",
    "load_splits": "kd_keras.data.sources",
    "make_dataset": "kd_keras.data.pipeline",
    "run_distill": "kd_keras.workflows.distill",
    "evaluate_run": "kd_keras.evaluation.evaluate",
    "classification_metrics": "kd_keras.evaluation.metrics",
    "export_run": "kd_keras.workflows.export",
    "benchmark_run": "kd_keras.deploy.benchmark",
    "benchmark_arch": "kd_keras.deploy.benchmark",
    "benchmark_fresh": "kd_keras.deploy.benchmark",  # deprecated name of benchmark_arch
    "run_sweep": "kd_keras.workflows.sweep",
    "paired_difference": "kd_keras.evaluation.verdict",
    "compare_runs": "kd_keras.evaluation.compare",
    "load_predictor": "kd_keras.runtimes",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'kd_keras' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return __all__
