"""Benchmark candidates: a run's trained files, or fresh models rebuilt at a given image size."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kd_keras.archs import MIN_IMAGE_SIZE, TOKEN_ARCHS, patch_grid_ok
from kd_keras.data.sources import load_npz
from kd_keras.deploy.onnx import to_onnx
from kd_keras.deploy.quantize import (
    calibration_batches,
    quantization_plan,
    quantize,
)
from kd_keras.deploy.tflite import convert, write_tflite
from kd_keras.deploy.timing import (
    EXPORT_FLAGS,
    FORMATS,
    Candidate,
    Loaded,
    keras_loader,
    onnx_loader,
    tflite_loader,
)
from kd_keras.distill.ensemble import build_ensemble
from kd_keras.errors import KDError
from kd_keras.models.flops import onnx_flops
from kd_keras.models.registry import build_student, build_teacher
from kd_keras.models.taps import image_size_of
from kd_keras.prog import command
from kd_keras.run.files import artefact_path
from kd_keras.run.folder import RunFolder
from kd_keras.runtimes import (
    file_metadata,
)


def rebuild_at_size(run: RunFolder, name: str, model, size: int, num_classes: int):
    """The same architecture at `size` px, with the trained weights when their shapes allow
    (a teacher trained as `teacher.members` members: the same ensemble of fresh members)."""
    tc = run.cfg.teacher
    arch = tc.arch if name == "teacher" else run.cfg.student.arch  # one member's, for ensembles
    need = MIN_IMAGE_SIZE.get(arch)
    if need and size < need:
        raise KDError(f"image size {size} is too small for {name} {arch} (needs at least {need})")
    if name == "teacher":
        members = [
            build_teacher(arch, num_classes, size, tiny=tc.variant == "tiny")
            for _ in range(tc.members)
        ]
        fresh = build_ensemble(members) if len(members) > 1 else members[0]
    else:
        patch = run.cfg.student.patch_size
        if arch in TOKEN_ARCHS and not patch_grid_ok(size, patch):
            raise KDError(
                f"image size {size} is not a multiple of student.patch_size = {patch} "
                "(or gives fewer than 2x2 patches)"
            )
        fresh = build_student(arch, num_classes, size, patch_size=patch,
                              tiny=run.cfg.student.variant == "tiny")  # fmt: skip
    try:
        fresh.set_weights(model.get_weights())
    except ValueError as err:
        reason = str(err).strip().splitlines()[0][:120]
        return fresh, (
            f"rebuilt at {size} px with fresh weights: the trained weights do not fit ({reason}); "
            "latency does not depend on weight values"
        )
    return fresh, f"rebuilt at {size} px with the trained weights"


def _stale(path: Path, source: Path) -> bool:
    return path.stat().st_mtime < source.stat().st_mtime


def _loader(fmt: str, path: Path, threads: int, provider: str) -> Callable[[], Loaded]:
    if fmt in ("tflite", "tflite_int8"):
        return tflite_loader(path, threads)
    return onnx_loader(path, threads, provider)


def _file_candidate(name, arch, fmt, path, params, threshold, source, size, threads, provider):
    """An exported file of the run (a note instead of a loader when it is missing or stale)."""
    flag = EXPORT_FLAGS[fmt]
    if not path.is_file():
        note = f"no {path.name}: run `{command(f'export {flag}')}` first"
        fp32 = path.with_name(path.name.replace(".int8.onnx", ".onnx"))
        if fmt == "int8" and fp32.is_file() and quantization_plan(fp32)["method"] == "none":
            note = quantization_plan(fp32)["reason"]
        return Candidate(name, arch, fmt, None, params, None, threshold, note)
    meta = file_metadata(path)
    exported = meta.get("image_size")
    if exported is not None and exported != str(size):
        note = f"{path.name} was exported at {exported} px, not {size} px: re-run export"
        return Candidate(name, arch, fmt, path, params, None, threshold, note)
    note = ""
    if _stale(path, source):
        note = f"{path.name} is older than {source.name}: re-run `{command(f'export {flag}')}`"
    if meta.get("decision_threshold"):  # INT8 files carry their own validation-chosen threshold
        threshold = float(meta["decision_threshold"])
    load = _loader(fmt, path, threads, provider)
    return Candidate(name, arch, fmt, path, params, load, threshold, note)


def model_flops(onnx_path: Path | None) -> int | None:
    """FLOPs at batch 1 from an FP32 ONNX file (None without one)."""
    if onnx_path is None or not onnx_path.is_file():
        return None
    return onnx_flops(onnx_path)["flops"]


def trained_candidates(
    run: RunFolder, name: str, model, source: Path, out: Path, formats, threads: int,
    provider: str = "auto",
) -> list[Candidate]:  # fmt: skip
    """The run's own files at the trained size: the .keras file and the exported files. Their
    `arch` is `RunFolder.arch`, the name report.json and the exports give the model (not the
    Keras model's own name)."""
    arch, params, threshold = run.arch(name), int(model.count_params()), run.threshold(name)
    size = image_size_of(model)
    candidates = []
    if "keras" in formats:
        candidates.append(
            Candidate(name, arch, "keras", source, params, keras_loader(model), threshold)
        )
    for fmt in FORMATS[1:]:
        if fmt in formats:
            path = artefact_path(out, name, fmt)
            candidates.append(_file_candidate(name, arch, fmt, path, params, threshold, source,
                                              size, threads, provider))  # fmt: skip
    flops = model_flops(artefact_path(out, name, "onnx"))
    for c in candidates:
        c.flops = flops
    return candidates


def fresh_candidates(
    name: str,
    arch: str,
    model,
    folder: Path,
    formats: tuple[str, ...],
    threads: int,
    calibration=None,
    note: str = "",
    say: Callable[[str], None] = lambda text: None,
    provider: str = "auto",
) -> list[Candidate]:
    """Save `model` to `folder` in every format asked (.keras, .onnx, .int8.onnx, .tflite,
    .int8.tflite) and wrap each file; FLOPs come from the FP32 ONNX file, written whenever an
    exported format is asked (a Keras-only benchmark has no FLOPs)."""
    size = image_size_of(model)
    params = int(model.count_params())
    path = {fmt: artefact_path(folder, f"{name}_{size}px", fmt) for fmt in FORMATS[1:]}
    candidates = []
    if "keras" in formats:
        keras_path = folder / f"{name}_{size}px.keras"
        model.save(keras_path)
        candidates.append(Candidate(name, arch, "keras", keras_path, params, keras_loader(model),
                                    None, note))  # fmt: skip
    if set(formats) - {"keras"}:  # the FP32 ONNX file gives every row its FLOPs
        say(f"converting {name} ({arch}, {size} px) to ONNX …")
        to_onnx(model, path["onnx"])
    needs_calibration = {"int8", "tflite_int8"} & set(formats)
    if needs_calibration and calibration is None:
        raise KDError("static INT8 quantization needs calibration images")
    for fmt in FORMATS[1:]:
        if fmt not in formats:
            continue
        extra = ""
        if fmt == "int8":
            plan = quantization_plan(path["onnx"])
            if plan["method"] == "none":
                candidates.append(Candidate(name, arch, fmt, None, params, None, None,
                                            plan["reason"]))  # fmt: skip
                continue
            say(f"quantizing {name} to INT8 ({plan['method']}) …")
            quantize(path["onnx"], path[fmt], plan["method"], calibration)
            extra = f"INT8 {plan['method']}"
        elif fmt.startswith("tflite"):
            say(f"converting {name} to TFLite ({fmt}) …")
            write_tflite(path[fmt], convert(model, calibration if fmt == "tflite_int8" else None),
                         {"image_size": str(size)})  # fmt: skip
        candidates.append(Candidate(name, arch, fmt, path[fmt], params,
                                    _loader(fmt, path[fmt], threads, provider), None,
                                    "; ".join(x for x in (note, extra) if x)))  # fmt: skip
    flops = model_flops(path["onnx"])
    for c in candidates:
        c.flops = flops
    return candidates


def calibration_images(data: str | os.PathLike | None, size: int, n: int, batch: int, seed=0):
    """Real training images of a MedMNIST-layout .npz, else uniform random pixels (fine for
    timing; INT8 accuracy is not measured on fresh models)."""
    if data is None:
        images = np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")
        return [images[i : i + batch] for i in range(0, n, batch)]
    path = Path(data)
    if not path.is_file():
        raise KDError(f"calibration data file not found: {path}")
    _, splits = load_npz(path, None)
    return calibration_batches(splits["train"], size, n, seed, batch)
