"""`predict`: run an exported model (`.onnx`, `.tflite`, `.keras`) on image files and folders.

Each image is made into a model input the way the training data was made, following the
*preprocessing recipe* recorded in the file's metadata at export (`preprocessing_recipe`):

- MedMNIST runs (`data.source = "medmnist"`): MedMNIST's own recipe for its source images —
  centre square crop (the short edge), greyscale, resize to the MedMNIST file's size
  (`data.medmnist_size`, 28 px for pneumoniamnist.npz) — then what kd_keras.data.sources does to
  every MedMNIST image: grey replicated to RGB, bilinear resize to the model's input size. The
  MedMNIST v2 paper and its MedMNIST+ notes describe the crop and the resize but name no
  interpolation; we use PIL's bicubic (antialiased when shrinking: a 1000 px X-ray to 28 px needs
  it), and the recipe records that choice.
- Folder / CSV / CIFAR-10 runs: what kd_keras.data.sources does with image files — decode to RGB
  (TensorFlow's decoder, as in training), bilinear resize to the model's input size.
- A `.keras` file carries no metadata: inside a run folder the run's config gives the recipe, the
  class names and the threshold; elsewhere a plain RGB resize and argmax are used, and the result
  says so. ONNX/TFLite files without kd_keras metadata are treated the same way.

The stored decision threshold (binary models) is applied, else argmax. A file that cannot be read
gets its error in its row and the rest go on (`failed` counts them).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.data.images import decode_errors, decode_file, list_images
from kd_keras.data.pipeline import make_dataset
from kd_keras.data.sources import Split
from kd_keras.errors import KDError
from kd_keras.evaluation.metrics import predict_classes
from kd_keras.io import check_writable_dir, write_text
from kd_keras.models.loading import load_model
from kd_keras.models.taps import image_size_of
from kd_keras.run.files import CONFIG_FILE, MODEL_STAGES
from kd_keras.run.folder import RunFolder
from kd_keras.runtimes import (
    file_metadata,
    keras_predictor,
    load_predictor,
    onnx_session,
    softmax,
    tflite_interpreter,
)

logger = logging.getLogger(__name__)

RECIPE_KEY = "preprocessing"
MEDMNIST_INTERPOLATION = "bicubic"  # PIL, antialiased when shrinking; the paper names none
MODEL_SUFFIXES = (".onnx", ".tflite", ".keras")


def preprocessing_recipe(data, image_size: int) -> dict[str, Any]:
    """How a run's training images were made from source images (recorded in exported files).

    Args:
        data: the run's `DataConfig` (None: no run known, a plain RGB resize).
        image_size: the model's input size.
    """
    final = {"to_rgb": "replicate grey", "size": image_size, "interpolation": "bilinear"}
    if data is not None and data.source == "medmnist":
        return {
            "source": "medmnist",
            "dataset": data.dataset,
            "crop": "centre square (short edge)",
            "color": "grey",
            "source_size": data.medmnist_size,
            "source_interpolation": MEDMNIST_INTERPOLATION,
            **final,
        }
    return {
        "source": data.source if data is not None else "plain",
        "crop": None,
        "color": "rgb",
        "source_size": None,
        "source_interpolation": None,
        **final,
    }


def describe_recipe(recipe: dict[str, Any]) -> str:
    """One line naming the steps of a preprocessing recipe."""
    steps = []
    if recipe.get("crop"):
        steps.append(f"{recipe['crop']} crop")
    steps.append("greyscale" if recipe.get("color") == "grey" else "decode to RGB")
    if recipe.get("source_size"):
        size = recipe["source_size"]
        steps.append(f"resize to {size}x{size} ({recipe['source_interpolation']})")
    if recipe.get("color") == "grey":
        steps.append("grey to RGB")
    steps.append(f"resize to {recipe['size']}x{recipe['size']} ({recipe['interpolation']})")
    return f"{recipe['source']}: " + ", ".join(steps)


# ---------------------------------------------------------------- images


def source_pixels(path: Path, recipe: dict[str, Any]) -> np.ndarray:
    """The uint8 pixels of one image as the training data held them before kd_keras.data.sources's
    pipeline: MedMNIST-style crop/grey/resize (H x W), or the decoded RGB image (H x W x 3)."""
    if recipe.get("color") == "grey":
        from PIL import Image

        with Image.open(path) as img:
            grey = img.convert("L")
        w, h = grey.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        grey = grey.crop((left, top, left + side, top + side))
        if recipe.get("source_size"):
            size = int(recipe["source_size"])
            resample = getattr(Image.Resampling, recipe["source_interpolation"].upper())
            grey = grey.resize((size, size), resample)
        return np.asarray(grey, np.uint8)
    return decode_file(str(path)).numpy()


def model_inputs(pixels: list[np.ndarray], size: int) -> np.ndarray:
    """float32 [N, size, size, 3] model inputs from source pixels, through kd_keras.data.sources's
    own evaluation pipeline (grey to RGB, bilinear resize, clip), one group per source shape."""
    out = np.zeros((len(pixels), size, size, 3), "float32")
    shapes: dict[tuple, list[int]] = {}
    for i, image in enumerate(pixels):
        shapes.setdefault(image.shape, []).append(i)
    for index in shapes.values():
        split = Split(np.stack([pixels[i] for i in index]), np.zeros(len(index), "int64"))
        ds = make_dataset(split, size, 64, labels=False, cache=False)
        out[index] = np.concatenate(list(ds.as_numpy_iterator()))
    return out


# ---------------------------------------------------------------- model


def model_info(path: Path) -> dict[str, Any]:
    """What `predict` needs to know about a model file: class names, input size, threshold,
    preprocessing recipe, where they came from (`note`), and (for `.keras`) the loaded model."""
    info: dict[str, Any] = {"model": None, "note": ""}
    if path.suffix == ".keras":
        run = _run_of(path)
        # always in safe mode; a run's own model is first checked against its fingerprint
        # (and a teacher view may then load the SavedModel the run recorded)
        own = run is not None and path.stem in _model_names()
        model = run.load_model(path.stem) if own else load_model(path)
        size = image_size_of(model)
        info.update(model=model, image_size=size)
        if run is None:
            info.update(class_names=None, threshold=None, recipe=preprocessing_recipe(None, size))
            info["note"] = (
                f"{path.name} has no metadata and is not in a run folder: plain RGB resize to "
                f"{size} px, argmax; export it for the training recipe"
            )
            return info
        info.update(
            class_names=run.report.get("class_names"),
            threshold=run.threshold(path.stem) if path.stem in _model_names() else None,
            recipe=preprocessing_recipe(run.cfg.data, size),
            note=f"{path.name}: recipe, classes and threshold from run folder {run.path}",
        )
        return info
    meta = file_metadata(path)
    size = int(meta["image_size"]) if meta.get("image_size") else _input_size(path)
    recipe = json.loads(meta[RECIPE_KEY]) if meta.get(RECIPE_KEY) else None
    info.update(
        image_size=size,
        class_names=json.loads(meta["class_names"]) if meta.get("class_names") else None,
        threshold=float(meta["decision_threshold"]) if meta.get("decision_threshold") else None,
        recipe=recipe or preprocessing_recipe(None, size),
    )
    if recipe is None:
        info["note"] = (
            f"{path.name} records no preprocessing recipe: plain RGB resize to {size} px "
            "(re-export it with this version of kd_keras to record the training recipe)"
        )
    return info


def _model_names() -> tuple[str, ...]:
    return tuple(MODEL_STAGES)


def _run_of(path: Path):
    return RunFolder(path.parent) if (path.parent / CONFIG_FILE).is_file() else None


def _input_size(path: Path) -> int:
    if path.suffix == ".onnx":
        shape = onnx_session(path).get_inputs()[0].shape
    else:
        shape = list(tflite_interpreter(path).get_input_details()[0]["shape"])
    if not isinstance(shape[1], int):
        raise KDError(f"{path} has no fixed input size and no kd_keras metadata")
    return int(shape[1])


# ---------------------------------------------------------------- predict_files


def predict_files(
    model_file: str | os.PathLike,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike | None = "predictions.csv",
    batch: int = 32,
    threads: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Classify image files with an exported model; returns the rows and the failure count.

    Args:
        model_file: a `.onnx`, `.tflite` or `.keras` file.
        inputs: image files and/or folders (searched recursively).
        out: CSV file to write (None: none).
        batch: images per model call.
        threads: CPU threads of the runtime (default: its own choice).
        quiet: do not log the note on where the recipe, classes and threshold came from
            (nothing is printed either way: the table is `predictions_renderables(result)`).
    """
    path = Path(model_file)
    if not path.is_file():
        raise KDError(f"model file not found: {path}")
    if path.suffix not in MODEL_SUFFIXES:
        raise KDError(f"cannot run {path}: expected a {', '.join(MODEL_SUFFIXES)} file")
    if batch < 1:
        raise KDError(f"batch must be >= 1, got {batch}")
    files = list_images(inputs)
    out = None if out is None else csv_target(out)  # decided before any prediction
    info = model_info(path)
    recipe, size = info["recipe"], info["image_size"]
    if info["note"] and not quiet:
        logger.info(info["note"])
    fn = keras_predictor(info["model"]) if info["model"] else load_predictor(path, threads)

    pixels, errors = {}, {}
    unreadable = decode_errors()
    for i, file in enumerate(files):
        try:
            pixels[i] = source_pixels(file, recipe)
        except unreadable as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            errors[i] = f"unreadable image: {reason[:200]}"
    good = sorted(pixels)
    probs = np.zeros((0, 0))
    if good:
        images = model_inputs([pixels[i] for i in good], size)
        logits = np.concatenate([fn(images[s : s + batch]) for s in range(0, len(images), batch)])
        probs = softmax(logits)
    names = info["class_names"] or [f"class_{k}" for k in range(probs.shape[1] if good else 0)]
    classes = predict_classes(probs, info["threshold"]) if good else []
    at = {i: k for k, i in enumerate(good)}
    rows = []
    for i, file in enumerate(files):
        row: dict[str, Any] = {"file": str(file), "name": _short_name(file, inputs)}
        if i in at:
            k = at[i]
            row["predicted"] = names[int(classes[k])]
            row.update({f"p_{name}": float(probs[k, c]) for c, name in enumerate(names)})
            row["error"] = ""
        else:
            row.update({"predicted": "", **{f"p_{n}": None for n in names}, "error": errors[i]})
        rows.append(row)
    result = {
        "model": str(path),
        "class_names": names,
        "threshold": info["threshold"],
        "decision": "argmax" if info["threshold"] is None else f"P(class 1) >= {info['threshold']}",
        "preprocessing": describe_recipe(recipe),
        "note": info["note"],
        "rows": rows,
        "failed": len(errors),
    }
    if out is not None:
        result["csv"] = str(write_text(out, rows_csv(rows)))
    return result


def _short_name(file: Path, inputs: list) -> str:
    """`file` relative to the folder argument it was found in (as given when named itself)."""
    for item in map(Path, inputs):
        if item.is_dir() and file.is_relative_to(item):
            return str(file.relative_to(item))
    return str(file)


def csv_target(out: str | os.PathLike) -> Path:
    """Where `--out` writes: the file it names, or `predictions.csv` inside it when it is a
    folder (an existing one, or a path ending in '/'); its folder is created and proven
    writable first."""
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        path = path / "predictions.csv"
    check_writable_dir(path.parent)
    if path.is_dir():
        raise KDError(f"--out {path} is a folder; name the CSV file to write (or a folder "
                      "without a predictions.csv folder inside)")  # fmt: skip
    return path


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The prediction rows as CSV text (probabilities with 6 decimals)."""
    buf = io.StringIO()
    fields = [k for k in rows[0] if k != "name"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def predictions_renderables(result: dict[str, Any]) -> list:
    """The prediction table and how it was made, for a console (the command line prints them):
    the table, then plain-text note lines (no rich markup or highlighting). Prints nothing."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Predictions of {Path(result['model']).name}")
    names = result["class_names"]
    for col in ["file", "predicted", *[f"P({n})" for n in names], "error"]:
        justify = "right" if col.startswith("P(") else "left"
        table.add_column(col, justify=justify, overflow="fold")
    for row in result["rows"]:
        probs = [
            "—" if row[f"p_{n}"] is None else f"{row[f'p_{n}']:.3f}" for n in names
        ]  # fmt: skip
        table.add_row(row["name"], row["predicted"] or "—", *probs, row["error"])
    lines = [f"preprocessing: {result['preprocessing']}", f"decision: {result['decision']}"]
    if result["failed"]:
        lines.append(f"{result['failed']} of {len(result['rows'])} files could not be read")
    if result.get("csv"):
        lines.append(f"written to {result['csv']}")
    return [table, *(Text(line) for line in lines)]
