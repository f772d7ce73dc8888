"""The run folder's file names and stage bookkeeping: which stage writes which model, what a
stage's hash covers. The layout:

    runs/<name>/
        config.toml            the resolved config (the MedMNIST file actually used is recorded)
        teacher.keras          fine-tuned teacher (or a copy of `teacher.path`)
        student.keras          distilled student
        student_scratch.keras  same student, same init, trained on labels only
        history_<stage>.csv    per-epoch training and validation metrics of a stage
        train_log.json         wall-clock time and best epoch per stage
        report.json, .md       validation and test metrics of every model
        report.html            the same, with curves, plots and mistakes, in one file
        confusion_<model>.json / .png
        predictions_<model>.npz  per-image test probabilities, labels and decisions
        tensorboard/<stage>/   TensorBoard scalars (with `train.tensorboard = true`)
        run_state.json         each stage's status, config fingerprint and its model file's
                               sha256 (checked before any command uses the model)
    runs/.<name>.before/       while a command that may replace results runs: the folder as it
                               was (hard links), put back if no stage of the command finishes

    <export dir>/<name>/
        export.json, benchmark.json   exported files and their checks; measured latency
        MODEL_CARD.md                 the exported student described for its users
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from kd_keras.config import Config
from kd_keras.data.sources import resolve_medmnist_path

# model name -> the training stage that produces it (also the order of every report)
MODEL_STAGES = {"teacher": "teacher", "student": "distill", "student_scratch": "scratch"}


STAGE_MODELS = {stage: model for model, stage in MODEL_STAGES.items()}


CONFIG_FILE = "config.toml"


REPORT_FILE = "report.json"


REPORT_MD_FILE = "report.md"


TRAIN_LOG_FILE = "train_log.json"


# exported file of each format, `<model><suffix>` in the run's export folder
ARTEFACT_SUFFIXES = {
    "onnx": ".onnx", "int8": ".int8.onnx", "tflite": ".tflite", "tflite_int8": ".int8.tflite",
}  # fmt: skip


def artefact_path(out: Path, name: str, fmt: str) -> Path:
    """The exported file of model `name` in format `fmt` (a key of `ARTEFACT_SUFFIXES`)."""
    return Path(out) / f"{name}{ARTEFACT_SUFFIXES[fmt]}"


STATE_FILE = "run_state.json"


CHECKPOINT_DIR = "checkpoints"


# the teachers `teacher.members` trains, one `.keras` file each, before their ensemble is saved
# as the run's teacher
MEMBERS_DIR = "teacher_members"


def member_path(run_path: Path, index: int) -> Path:
    """Where member `index` (0-based) of a `teacher.members` ensemble is saved."""
    return Path(run_path) / MEMBERS_DIR / f"member{index}.keras"


# what each stage's result depends on: (section, keys to ignore); a run is resumed, and a saved
# model counts as belonging to the run, only while these are unchanged
STAGE_INPUTS = {
    "teacher": (("run", ("name", "output_dir")), ("data", ("cache",)), ("augment", ()),
                ("teacher", ("cache",)), ("train", ("verbose", "tensorboard", "stages"))),
    "scratch": (("run", ("name", "output_dir")), ("data", ("cache",)), ("augment", ()),
                ("student", ()), ("train", ("verbose", "tensorboard", "stages"))),
}  # fmt: skip
STAGE_INPUTS["distill"] = STAGE_INPUTS["teacher"] + (("student", ()), ("distill", ()))


def stage_inputs(cfg: Config, stage: str) -> dict[str, Any]:
    """The config values a stage's result depends on (paths of files included)."""
    data = cfg.to_dict()
    return {
        f"{section}.{key}": value
        for section, ignored in STAGE_INPUTS[stage]
        for key, value in data[section].items()
        if key not in ignored
    }


def stage_hash(cfg: Config, stage: str) -> str:
    """A short fingerprint of `stage_inputs`."""
    text = json.dumps(stage_inputs(cfg, stage), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


REPORT_HTML_FILE = "report.html"


TENSORBOARD_DIR = "tensorboard"


EXPORT_FILE = "export.json"


BENCHMARK_FILE = "benchmark.json"


MODEL_CARD_FILE = "MODEL_CARD.md"


def resolve_data_source(cfg: Config) -> Config:
    """A copy of `cfg` whose MedMNIST `data.path` names the file actually used (environment
    variable or download cache), so a saved run reloads its data without that environment."""
    if cfg.data.source != "medmnist" or cfg.data.path:
        return cfg
    path = resolve_medmnist_path(cfg.data.dataset, cfg.data.medmnist_size, None).resolve()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path)))
