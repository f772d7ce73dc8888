"""Experiment configuration: one TOML file, validated on load.

Every key has a type, a default and, where it matters, a range or a list of choices. An unknown
section or key, a wrong type or an out-of-range value raises `KDError` naming the key (and the
valid keys or choices). Relative paths resolve against the config file's folder; paths given in
`--set` overrides resolve against the current directory.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_keras.archs import STUDENT_ARCHS, TEACHER_ARCHS
from kd_keras.config_rules import check_consistency
from kd_keras.deprecations import renamed_keys
from kd_keras.errors import KDError
from kd_keras.io import write_text

_WEIGHT_KEYWORDS = ("none", "imagenet")


def _spec(default: Any = None, *, kind: Any, help: str, choices=None, lo=None, hi=None,
          path=False, **kw):  # fmt: skip
    """A config key: default, type, range or choices, whether it is a path, and its one-line
    meaning (`help`; docs/configuration.md is generated from it by tools/gen_docs.py)."""
    meta = {"kind": kind, "choices": choices, "lo": lo, "hi": hi, "path": path, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# fmt: off
@dataclass
class RunConfig:
    name: str | None = _spec(None, kind=str, help="Run folder name (default: the file's stem).")
    output_dir: str | None = _spec(None, kind=str, path=True, help="Where run folders go (runs/).")
    seed: int = _spec(42, kind=int, lo=0, help="Seed of initial weights, data order, augmentation.")


@dataclass
class DataConfig:
    source: str = _spec("medmnist", kind=str, choices=("medmnist", "folder", "csv", "cifar10"),
        help="MedMNIST `.npz`; `<path>/{train,val,test}/<class>/` folders; `<path>/<split>.csv` "
        "(`filename,label`, images in `<path>/<split>/`); CIFAR-10 (`keras.datasets` or `path`).")
    dataset: str = _spec("pneumoniamnist", kind=str, help="MedMNIST dataset (`<dataset>.npz`).")
    path: str | None = _spec(None, kind=str, path=True, help="Data file or folder (MedMNIST "
        "default: `$KD_KERAS_DATA_DIR`, else a checked download); required by `folder`, `csv`.")
    medmnist_size: int = _spec(28, kind=int, choices=(28, 64, 128, 224), help="MedMNIST file px.")
    classes: list[str] | None = _spec(None, kind=list, help="Class names in label order "
        "(default: from the data); for CIFAR-10, the classes kept.")
    image_size: int = _spec(64, kind=int, lo=8, hi=1024, help="Training input size (square, px).")
    batch_size: int = _spec(32, kind=int, lo=1, hi=4096, help="Global batch over all replicas.")
    val_fraction: float = _spec(0.1, kind=float, lo=0.01, hi=0.5, help="Stratified validation "
        "share carved from train when the data has no validation split.")
    limit_train: int = _spec(0, kind=int, lo=0, help="Stratified N train images (0: all).")
    cache: bool = _spec(True, kind=bool, help="Keep decoded images in memory (tf.data cache).")
    skip_bad_files: bool = _spec(False, kind=bool,
        help="Skip (and count) undecodable images instead of refusing the split.")


@dataclass
class AugmentConfig:
    random_resized_crop: bool = _spec(True, kind=bool, help="Random crop, resized back (training).")
    crop_scale_min: float = _spec(0.6, kind=float, lo=0.05, hi=1.0,
        help="Smallest crop, as a fraction of the image area.")
    horizontal_flip: bool = _spec(True, kind=bool, help="Random left-right flip (training).")
    color_jitter: float = _spec(0.2, kind=float, lo=0.0, hi=1.0,
        help="Random brightness (± j·255) and contrast (1 ± j); 0: off.")
    mixup: float = _spec(0.0, kind=float, lo=0.0, hi=10.0, help="MixUp strength a: each "
        "training image blended with another of its batch, weight ~ Beta(a, a); 0: off.")


@dataclass
class TeacherConfig:
    arch: str = _spec("resnet50", kind=str, choices=TEACHER_ARCHS,
        help="Architecture of a teacher kd_keras trains.")
    weights: str = _spec("none", kind=str, path=True,
        help="`none`, `imagenet` (downloaded at run time) or a local weights file.")
    variant: str = _spec("full", kind=str, choices=("full", "tiny"),
        help="`tiny`: the same code at a fraction of the width and depth (smoke tests).")
    path: str | None = _spec(None, kind=str, path=True, help="A trained teacher (`.keras`, "
        "SavedModel folder, keras-hub preset): no teacher stage.")
    ensemble: list[str] | None = _spec(None, kind=list, path=True, help="Two or more teachers "
        "(files, SavedModels, presets, run folders) taught as one, instead of `path`.")
    ensemble_features: str | int = _spec("all", kind=(str, int), help='Feature matching on '
        'every member (`"all"`: mean of their terms) or on the member of this index.')
    image_size: int = _spec(0, kind=int, lo=0, hi=1024,
        help="Input size of a given teacher (0: the file's own).")
    input_scaling: str = _spec("auto", kind=str,
        choices=("auto", "raw", "unit", "symmetric", "caffe", "torch"), help="Pixels a given "
        "teacher expects: [0, 255], [0, 1], [-1, 1], BGR mean, ImageNet mean/std; auto: detect.")
    outputs: str = _spec("auto", kind=str, choices=("auto", "logits", "probabilities"),
        help="What a given teacher outputs (probabilities become logits).")
    class_order: list[str] | None = _spec(None, kind=list, help="A given teacher's class names "
        "in its output order, when it differs from the data's.")
    feature_layer: str | None = _spec(None, kind=str, help="Feature tap for matching, dotted "
        "through nested models (default: the architecture's own, else the last spatial map).")
    cache: str = _spec("auto", kind=str, choices=("auto", "off", "memory", "disk"),
        help="Teacher outputs computed once per train image; auto: when augmentation is off; "
        "disk: memory-mapped.")
    epochs: int | None = _spec(None, kind=int, lo=0, help="Teacher epochs (default: train.epochs).")
    learning_rate: float | None = _spec(None, kind=float, lo=0.0, hi=10.0,
        help="Teacher learning rate (default: train.learning_rate).")
    members: int = _spec(1, kind=int, lo=1, hi=32, help="Teachers of teacher.arch to train "
        "(seeds run.seed, run.seed + 1, ...); 2 or more are taught as their ensemble.")

    @property
    def from_user(self) -> bool:
        """True when the user gives the teacher (`path`) or teachers (`ensemble`): none is
        trained."""
        return bool(self.path or self.ensemble)


@dataclass
class StudentConfig:
    arch: str = _spec("resnet18", kind=str,
        choices=STUDENT_ARCHS,
        help="Student architecture (DeiT: class and distillation tokens).")
    weights: str = _spec("none", kind=str, path=True,
        help="`none`, `imagenet` (downloaded at run time) or a local weights file.")
    variant: str = _spec("full", kind=str, choices=("full", "tiny"),
        help="`tiny`: the same code at a fraction of the width and depth (smoke tests).")
    patch_size: int = _spec(16, kind=int, lo=1, help="ViT/DeiT patch; must divide image_size.")
    feature_layer: str | None = _spec(None, kind=str, help="Student feature tap, dotted through "
        "nested models (default: the architecture's own).")
    epochs: int | None = _spec(None, kind=int, lo=0,
        help="Epochs of the distilled and scratch students (default: train.epochs).")
    learning_rate: float | None = _spec(None, kind=float, lo=0.0, hi=10.0,
        help="Student learning rate (default: train.learning_rate).")


@dataclass
class DistillConfig:
    alpha: float = _spec(0.5, kind=float, lo=0.0, hi=1.0,
        help="Weight of the label (CE) term; 1 - alpha weighs the teacher-logits term.")
    temperature: float = _spec(4.0, kind=float, lo=1e-3, hi=100.0,
        help="Softmax temperature T of the soft KD term (scaled by T²).")
    beta: float = _spec(1.0, kind=float, lo=0.0, hi=1000.0,
        help="Weight of the feature-matching term (0: logits only).")
    mode: str = _spec("soft", kind=str, choices=("soft", "hard", "dkd"),
        help="Teacher-logits loss: soft KD (Hinton), hard KD (DeiT), Decoupled KD (DKD).")
    feature_loss: str = _spec("fitnet", kind=str, choices=("fitnet", "attention"),
        help="FitNet L2 through a learned adapter, or attention transfer (no adapter).")
    feature_norm: str = _spec("l2", kind=str, choices=("none", "l2"),
        help="FitNet: compare unit-length channel vectors (l2) or the raw maps (MSE).")
    dkd_alpha: float = _spec(1.0, kind=float, lo=0.0, hi=1000.0,
        help="Decoupled KD: weight of the target-class term.")
    dkd_beta: float = _spec(8.0, kind=float, lo=0.0, hi=1000.0,
        help="Decoupled KD: weight of the non-target-class term.")


@dataclass
class TrainConfig:
    stages: list[str] = _spec(["teacher", "distill", "scratch"], kind=list,
        help="Stages to run: teacher, distill, scratch (the student without a teacher).")
    epochs: int = _spec(10, kind=int, lo=1, help="Epochs of every stage (unless set per stage).")
    optimizer: str = _spec("sgd", kind=str, choices=("sgd", "adam", "adamw"), help="Optimizer.")
    learning_rate: float = _spec(0.01, kind=float, lo=0.0, hi=10.0,
        help="Peak learning rate of every stage (unless set per stage).")
    momentum: float = _spec(0.9, kind=float, lo=0.0, hi=1.0, help="SGD momentum.")
    weight_decay: float = _spec(1e-4, kind=float, lo=0.0, hi=1.0, help="Weight decay (0: none).")
    weight_decay_mode: str = _spec("decoupled", kind=str, choices=("decoupled", "l2"),
        help="Decay applied to the weights (Keras, AdamW) or as (wd/2)·‖w‖² in the loss.")
    schedule: str = _spec("cosine", kind=str, choices=("cosine", "constant"),
        help="Learning-rate schedule after the warm-up.")
    warmup_epochs: int = _spec(0, kind=int, lo=0, help="Epochs of linear learning-rate warm-up.")
    monitor: str = _spec("val_balanced_accuracy", kind=str,
        choices=("val_balanced_accuracy", "val_accuracy", "val_auc", "val_macro_f1"),
        help="Validation metric that picks the kept epoch.")
    class_weight: str = _spec("none", kind=str, choices=("none", "balanced"),
        help="Inverse-frequency class weights (a class-prior correction).")
    weight_distillation: bool = _spec(True, kind=bool,
        help="Class weights on the KD and feature terms too.")
    balanced_sampling: bool = _spec(False, kind=bool,
        help="Draw training batches with classes equally often (a class-prior correction).")
    logit_adjustment: float = _spec(0.0, kind=float, lo=0.0, hi=10.0,
        help="tau of logit adjustment, tau·log(prior) added in training (a prior correction).")
    stack_prior_corrections: bool = _spec(False, kind=bool,
        help="Allow two or more class-prior corrections at once (refused otherwise).")
    verbose: int | str = _spec("auto", kind=(int, str), choices=(0, 1, 2, "auto"),
        help="Keras verbosity; auto: progress bar on a terminal, one line per epoch when piped.")
    tensorboard: bool = _spec(False, kind=bool,
        help="Write each stage's scalars to `<run>/tensorboard/<stage>/`.")
    precision: str = _spec("float32", kind=str,
        choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"), help="Dtype policy; "
        "auto: mixed_float16 on a GPU; float32 on CPUs (bfloat16 measured no faster there).")
    batchnorm_momentum: float = _spec(0.9, kind=float, lo=0.0, hi=1.0, help="Momentum of every "
        "batch norm's moving statistics (PyTorch's 0.9); 0 keeps the model's own (Keras 0.99).")
    jit_compile: bool | str = _spec("auto", kind=(bool, str), choices=(True, False, "auto"),
        help="XLA; auto: only steps whose every model is a ViT/DeiT (archs.JIT_FASTER).")


@dataclass
class EvalConfig:
    split: str = _spec("test", kind=str, choices=("test", "val"), help="Split that is reported.")
    threshold: str = _spec("argmax", kind=str, choices=("argmax", "val_balanced_accuracy"),
        help="Decision rule; binary: the threshold maximising validation balanced accuracy.")
    imbalanced_subset: bool = _spec(True, kind=bool,
        help="Also report a fixed imbalanced binary subset of the split.")
    subset_minority: int = _spec(21, kind=int, lo=1, help="Minority images of that subset.")
    subset_majority: int = _spec(279, kind=int, lo=1, help="Majority images of that subset.")
    subset_seed: int = _spec(0, kind=int, lo=0, help="Seed that draws the subset.")


@dataclass
class ExportConfig:
    dir: str | None = _spec(None, kind=str, path=True,
        help="Parent of the per-run export folders (default `export`).")
    opset: int = _spec(17, kind=int, lo=13, hi=21, help="ONNX opset.")
    tolerance: float = _spec(1e-4, kind=float, lo=0.0,
        help="Largest |Δ logit| vs Keras an FP32 file may show (else it is deleted).")
    calibration_samples: int = _spec(256, kind=int, lo=1,
        help="Stratified train images that calibrate static INT8.")


@dataclass
class DistributeConfig:
    strategy: str = _spec("none", kind=str, choices=("none", "mirrored", "multi_worker"),
        help="tf.distribute: one device; this machine's GPUs (MirroredStrategy); the machines "
        "of TF_CONFIG (MultiWorkerMirroredStrategy).")
    sync_batch_norm: bool = _spec(True, kind=bool,
        help="BatchNorm statistics over the global batch (as on one device), not per replica.")
# fmt: on


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir or "runs") / (self.run.name or "run")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        return write_text(path, to_toml(self.to_dict()))


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _check_value(section: str, f: dataclasses.Field, value: Any) -> Any:
    key = f"{section}.{f.name}"
    meta = f.metadata
    kind = meta["kind"]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise KDError(f"config key {key} must be a list of strings, got {value!r}")
    else:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise KDError(f"config key {key} must be of type {names}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise KDError(f"config key {key} must be a finite number, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        valid = ", ".join(repr(c) for c in meta["choices"])
        raise KDError(f"config key {key} = {value!r} is not one of {valid}")
    if meta["lo"] is not None and value < meta["lo"]:
        raise KDError(f"config key {key} = {value!r} is below its minimum {meta['lo']}")
    if meta["hi"] is not None and value > meta["hi"]:
        raise KDError(f"config key {key} = {value!r} is above its maximum {meta['hi']}")
    return value


def _resolve_path(f: dataclasses.Field, value: Any, base: Path) -> Any:
    if not f.metadata["path"] or value is None:
        return value
    if isinstance(value, list):
        return [_resolve_path(f, v, base) for v in value]
    if value in _WEIGHT_KEYWORDS or "://" in value:  # keywords and hub handles stay as written
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse `section.key=value`; the value is read as TOML, else taken as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise KDError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _check_known(section: str, key: str | None = None) -> None:
    if section not in SECTIONS:
        raise KDError(f"unknown config section [{section}]; valid sections: {', '.join(SECTIONS)}")
    if key is not None:
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if key not in valid:
            raise KDError(
                f"unknown config key {section}.{key}; valid keys in [{section}]: {', '.join(valid)}"
            )


def build_config(
    raw: dict[str, Any],
    base_dir: Path,
    overrides: list[str] | None = None,
    default_name: str | None = None,
) -> Config:
    """Validate a raw TOML dict (plus `section.key=value` overrides) into a `Config`."""
    values: dict[str, dict[str, tuple[Any, Path]]] = {}
    raw, overrides = renamed_keys(raw, overrides)
    for section, body in raw.items():
        _check_known(section)
        if not isinstance(body, dict):
            raise KDError(f"config section [{section}] must be a table, got {body!r}")
        for key, value in body.items():
            _check_known(section, key)
            values.setdefault(section, {})[key] = (value, base_dir)
    for text in overrides or []:
        section, key, value = parse_override(text)
        _check_known(section, key)
        values.setdefault(section, {})[key] = (value, Path.cwd())

    sections = {}
    for name, cls in SECTIONS.items():
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values.get(name, {}):
                value, base = values[name][f.name]
                kwargs[f.name] = _resolve_path(f, _check_value(name, f, value), base)
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    if cfg.run.name is None:
        cfg.run.name = default_name or "run"
    check_consistency(cfg)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    """The raw table of a TOML file, with clear errors for a missing or malformed file."""
    path = Path(path)
    if path.is_dir():
        raise KDError(f"config file {path} is a folder; give a .toml file such as "
                      "configs/xray.toml")  # fmt: skip
    if not path.is_file():
        raise KDError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise KDError(f"config file {path} is not valid TOML: {err}") from err


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, validate and resolve a TOML config file."""
    path = Path(path)
    return build_config(read_toml(path), path.resolve().parent, overrides, default_name=path.stem)


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal (strings escaped), e.g. for `--set` overrides."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Write a two-level dict as TOML; `None` values are left out (TOML has no null)."""
    lines = []
    for section, body in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
