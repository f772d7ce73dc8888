"""Export trained models to ONNX and TFLite (FP32 and INT8) and check every file against its
Keras model.

One call, `export_files` (with the model card: `kd_keras.workflows.export.export_run`), turns a run
folder into deployable files under `export/<run name>/`:

- `<model>.onnx`: FP32, converted with tf2onnx from an explicit input signature (Keras's own ONNX
  export fails on EfficientNet and ViT). Input `images`: float32 RGB pixels in [0, 255], NHWC, at
  the trained size, any batch. Outputs `logits` and `probabilities` (softmax of the logits).
  Metadata (`metadata_props`) carry the class names, image size, input range, decision threshold,
  source run and kd_keras version, so a file explains itself without the run folder.
- `<model>.int8.onnx` (with `int8=True`): ONNX Runtime quantization. Convolution-dominated graphs
  (ResNet, EfficientNet) get static QDQ quantization, per-channel, calibrated on
  `export.calibration_samples` images from the TRAIN split (dynamic quantization made conv nets
  slower than FP32 here). Attention-dominated graphs (ViT, DeiT) get dynamic quantization of their
  MatMul/Gemm weights (about 2x faster than FP32 on ViT-small; no calibration). The choice is read
  from the ONNX graph itself (`quantization_plan`), not from model names, so a new architecture
  needs no list to be updated. Weights are 7-bit (`reduce_range`, `INT8_RECIPE`): a file is
  exported once and run on CPUs nobody knows in advance, and without VNNI (AVX2, AVX-512
  without VNNI) ONNX Runtime's U8S8 kernels sum pairs of products in 16 bits, which 8-bit
  weights can saturate (measured on an AVX2 host: student argmax agreement 93.3% instead of
  99.7%). The metadata (`int8_recipe`, `int8_checked_on`) and export.json record the recipe
  and the CPU and ISA level its rows were measured on; on a CPU without VNNI the export says
  INT8 is not expected to be faster than FP32 there.
- `<model>.tflite`, `<model>.int8.tflite` (format `tflite`): see `kd_keras.deploy.tflite` (same
  interface, metadata, parity check and INT8 threshold rule).
- `export.json`: per file, the parity check and the test-split metrics.

Metadata also carry the *preprocessing recipe* of the training images (`preprocessing`, JSON;
`kd_keras.deploy.predict.preprocessing_recipe`), so `predict` makes inputs from image files the
same way. An INT8 file chooses its own decision threshold on its own validation probabilities (the
rule evaluation used for the FP32 model, `choose_threshold`) when the FP32 model has one, and
records it in its metadata; its test metrics use it and sit beside the FP32 file's.

Parity: ONNX Runtime and Keras run on the same real images (the whole test split by default);
the FP32 file passes when the largest absolute logit difference is within the tolerance
(`export.tolerance`, 1e-4). A file that fails is deleted and `KDError` is raised: a file that
disagrees with its model must never look like a finished export. INT8 files are expected to
differ; their test metrics are reported next to the FP32 ones instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.data.pipeline import make_dataset
from kd_keras.deploy.onnx import (
    check_parity,
    model_metadata,
    own_threshold,
    to_onnx,
    update_metadata,
)
from kd_keras.deploy.predict import preprocessing_recipe
from kd_keras.deploy.quantize import (
    CalibrationBatches,
    calibration_batches,
    int8_speed_note,
    quantization_plan,
    quantize,
)
from kd_keras.deploy.tflite import export_tflite
from kd_keras.deprecations import warn_renamed
from kd_keras.errors import KDError
from kd_keras.evaluation.metrics import classification_metrics
from kd_keras.host import describe_host, peak_rss_mb
from kd_keras.io import check_writable_dir, write_json
from kd_keras.models.taps import image_size_of
from kd_keras.prog import version
from kd_keras.run.files import MODEL_STAGES, artefact_path
from kd_keras.run.folder import RunFolder
from kd_keras.runtimes import (
    compare_logits,
    keras_predictor,
    onnx_predictor,
    onnx_session,
    output_shapes,
    predict,
    size_mb,
    softmax,
)

FORMATS = ("onnx", "tflite")
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- export_files


def check_formats(fmt: str | Iterable[str]) -> tuple[str, ...]:
    """Export formats from `"onnx"`, `"onnx,tflite"` or a sequence; unknown ones are a KDError."""
    parts = fmt.split(",") if isinstance(fmt, str) else list(fmt)
    formats = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        shown = unknown[0] if unknown else fmt
        raise KDError(f"unknown export format {shown!r}; valid: {', '.join(FORMATS)}")
    return formats


def export_files(
    run_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    models: Iterable[str] = ("student", "teacher"),
    int8: bool = False,
    tolerance: float | None = None,
    limit: int | None = None,
    formats: str | Iterable[str] = "onnx",
    quiet: bool = False,
    *,
    fmt: str | Iterable[str] | None = None,
) -> dict[str, Any]:
    """Export a run's models to `<out_dir>/<run name>/` and check each file; returns export.json.
    (`kd_keras.workflows.export.export_run` adds the model card; the console summary is
    `kd_keras.deploy.tables.summary_renderables(result)`.)

    Args:
        run_dir: run folder; None picks the most recent run under `runs/`.
        out_dir: parent folder of the per-run export folder (default `export.dir`, else
            `export`).
        models: which of the run's models to export. The student is required; another model
            missing from the run is skipped with a note.
        int8: also write `<model>.int8.onnx` / `<model>.int8.tflite` (see module docstring).
        tolerance: parity tolerance on logits (default `export.tolerance`).
        limit: check on the first `limit` test images only (default: the whole test split).
        formats: export format(s): `"onnx"`, `"tflite"`, `"onnx,tflite"` or a sequence of them.
        quiet: log no progress lines (this module's logger, INFO); nothing is printed.
        fmt: the old name of `formats` (deprecated: it goes in the next release).
    """
    if fmt is not None:
        warn_renamed("export_run(fmt=...)", "export_run(formats=...)", stacklevel=4)
        formats = fmt
    formats = check_formats(formats)
    models = tuple(models)
    unknown = [m for m in models if m not in MODEL_STAGES]
    if unknown:
        raise KDError(f"unknown model {unknown[0]!r} to export; valid: {', '.join(MODEL_STAGES)}")
    run = RunFolder.find(run_dir)
    run.check_consistent()
    tolerance = run.cfg.export.tolerance if tolerance is None else float(tolerance)
    if tolerance < 0:
        raise KDError(f"tolerance must be >= 0, got {tolerance}")
    sources: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name in models:
        path = run.model_file(name)
        if path is None and name == "student":
            raise KDError(f"run {run.path} has no student.keras — train the student first")
        if path is None:
            skipped[name] = f"run has no {name}.keras"
        else:
            sources[name] = path
    out = check_writable_dir(run.export_dir(out_dir))
    say = (lambda text: None) if quiet else logger.info

    splits = run.load_splits()
    class_names = run.report.get("class_names") or splits.class_names
    test = splits.test.subset(np.arange(min(limit, len(splits.test)))) if limit else splits.test
    result: dict[str, Any] = {
        "run": str(run.path.resolve()),
        "format": ",".join(formats),
        "opset": run.cfg.export.opset,
        "tolerance": tolerance,
        "split": "test",
        "n_images": len(test),
        "class_names": class_names,
        "kd_keras_version": version(),
        "artefacts": {},
        "skipped": skipped,
    }
    for name, source in sources.items():
        model = run.load_model(name)
        result["image_size"] = image_size_of(model)
        job = ExportJob(run, name, model, source, out, splits, test, class_names, tolerance, say)
        job.skipped = skipped  # files a format decides not to write say why here
        if "onnx" in formats:
            result["artefacts"].update(_export_onnx(job, int8))
        if "tflite" in formats:
            result["artefacts"].update(export_tflite(job, int8))
        del model, job
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["host"] = describe_host()
    note = int8_speed_note() if int8 else None
    if note:
        result["int8_speed_note"] = note
    result["peak_rss_mb"] = peak_rss_mb()
    write_json(out / "export.json", result)
    result["export_dir"] = str(out)
    return result


class ExportJob:
    """One model being exported: what every format needs, computed once (metadata, Keras logits
    on the test images, test and validation batches, the metrics and threshold rules)."""

    def __init__(
        self, run: RunFolder, name: str, model, source: Path, out: Path, splits, test,
        class_names: list[str], tolerance: float, say: Callable[[str], None],
    ):  # fmt: skip
        self.run, self.name, self.model, self.source, self.out = run, name, model, source, out
        self.splits, self.test, self.class_names = splits, test, class_names
        self.tolerance, self.say = tolerance, say
        self.size, self.threshold = image_size_of(model), run.threshold(name)
        self.arch = run.arch(name)  # one name for reports, metadata and the benchmark
        self.params = int(model.count_params())
        self.recipe = preprocessing_recipe(run.cfg.data, self.size)
        batch = run.cfg.data.batch_size
        self.test_batches = make_dataset(test, self.size, batch, labels=False, cache=False)
        self.val_batches = make_dataset(splits.val, self.size, batch, labels=False, cache=False)
        self.keras_logits = predict(keras_predictor(model), self.test_batches)

    def metadata(self, threshold: float | None, **extra: Any) -> dict[str, Any]:
        """The metadata of one exported file of this model."""
        return model_metadata(
            self.class_names, self.size, threshold, model=self.name, architecture=self.arch,
            source_run=str(self.run.path.resolve()), source_file=self.source.name,
            preprocessing=json.dumps(self.recipe), **extra,
        )  # fmt: skip

    def metrics(self, logits: np.ndarray, threshold: float | None) -> dict[str, Any]:
        """Test-split metrics of `logits` with decision `threshold`."""
        return classification_metrics(
            self.test.labels, softmax(logits), self.class_names, threshold
        )

    def own_threshold(self, fn) -> float | None:
        """The decision threshold an INT8 predictor `fn` chooses on the validation split."""
        return own_threshold(fn, self.val_batches, self.splits.val.labels, self.threshold)

    def calibration(self) -> CalibrationBatches:
        """`export.calibration_samples` stratified TRAIN images for INT8 calibration."""
        cfg = self.run.cfg
        return calibration_batches(self.splits.train, self.size, cfg.export.calibration_samples,
                                   cfg.run.seed)  # fmt: skip

    def checked(self, path: Path, logits: np.ndarray, what: str, outputs=None) -> dict[str, Any]:
        """The FP32 parity check of `logits` against Keras; beyond the tolerance the file is
        deleted and a `KDError` raised."""
        parity = check_parity(self.keras_logits, logits, self.tolerance)
        if outputs is not None:
            parity["outputs"] = outputs
        if not parity["passed"]:
            path.unlink(missing_ok=True)
            raise KDError(
                f"{self.name} {what} parity check FAILED: max |logit difference| "
                f"{parity['max_abs_diff']:.3g} > tolerance {self.tolerance:g} on {parity['n']} "
                f"test images; {path} was deleted"
            )
        return parity

    def entry(self, path: Path, **fields: Any) -> dict[str, Any]:
        """An export.json entry for `path`."""
        return {"file": path.name, "architecture": self.arch, "params": self.params,
                "size_mb": size_mb(path), **fields}  # fmt: skip


def _export_onnx(job: ExportJob, int8: bool) -> dict[str, dict[str, Any]]:
    """`<name>.onnx` checked against Keras on the test images (+ `<name>.int8.onnx`)."""
    name, threshold = job.name, job.threshold
    onnx_path = artefact_path(job.out, name, "onnx")
    job.say(f"{name}: converting {job.source.name} ({job.arch}, {job.size} px) to ONNX …")
    to_onnx(job.model, onnx_path, job.run.cfg.export.opset,
            job.metadata(threshold, precision="float32"))  # fmt: skip
    try:
        session = onnx_session(onnx_path)
        onnx_logits = predict(onnx_predictor(session), job.test_batches)
    except BaseException:
        onnx_path.unlink(missing_ok=True)
        raise
    parity = job.checked(onnx_path, onnx_logits, "ONNX", output_shapes(session))
    entries = {
        name: job.entry(onnx_path, source=str(job.source), threshold=threshold, parity=parity,
                        metrics=job.metrics(onnx_logits, threshold))
    }  # fmt: skip
    if not int8:
        return entries
    int8_path = artefact_path(job.out, name, "int8")
    plan = quantization_plan(onnx_path)
    method = plan["method"]
    if method == "none":
        int8_path.unlink(missing_ok=True)  # an older file would look like this export's
        job.say(f"{name}: {plan['reason']}")
        job.skipped[f"{name}.int8"] = plan["reason"]
        return entries
    job.say(f"{name}: quantizing to INT8 ({method}) …")
    calibration = job.calibration()
    info = quantize(onnx_path, int8_path, method, calibration=calibration,
                    metadata=job.metadata(threshold, precision="int8"))  # fmt: skip
    if method == "static":
        info.update(calibration_split="train", calibration_samples=len(calibration.images))
    fn = onnx_predictor(onnx_session(int8_path))
    own = job.own_threshold(fn)
    if own != threshold:
        update_metadata(int8_path, job.metadata(own, precision="int8"))
    int8_logits = predict(fn, job.test_batches)
    entries[f"{name}.int8"] = job.entry(
        int8_path, source=onnx_path.name, threshold=own, threshold_fp32=threshold,
        quantization=info, vs_keras=compare_logits(job.keras_logits, int8_logits),
        metrics=job.metrics(int8_logits, own),
    )  # fmt: skip
    return entries
