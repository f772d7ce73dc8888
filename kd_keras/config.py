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

from kd_keras.archs import MIN_IMAGE_SIZE, STUDENT_ARCHS, TEACHER_ARCHS, TOKEN_ARCHS, patch_grid_ok
from kd_keras.errors import KDError
from kd_keras.io import write_text

_WEIGHT_KEYWORDS = ("none", "imagenet")


def _spec(default: Any = None, *, kind: Any, choices=None, lo=None, hi=None, path=False, **kw):
    meta = {"kind": kind, "choices": choices, "lo": lo, "hi": hi, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class RunConfig:
    name: str | None = _spec(None, kind=str)
    output_dir: str | None = _spec(None, kind=str, path=True)
    seed: int = _spec(42, kind=int, lo=0)


@dataclass
class DataConfig:
    source: str = _spec("medmnist", kind=str, choices=("medmnist", "folder", "csv", "cifar10"))
    dataset: str = _spec("pneumoniamnist", kind=str)
    path: str | None = _spec(None, kind=str, path=True)
    medmnist_size: int = _spec(28, kind=int, choices=(28, 64, 128, 224))
    classes: list[str] | None = _spec(None, kind=list)
    image_size: int = _spec(64, kind=int, lo=8, hi=1024)
    batch_size: int = _spec(32, kind=int, lo=1, hi=4096)
    val_fraction: float = _spec(0.1, kind=float, lo=0.01, hi=0.5)
    limit_train: int = _spec(0, kind=int, lo=0)
    cache: bool = _spec(True, kind=bool)
    skip_bad_files: bool = _spec(False, kind=bool)


@dataclass
class AugmentConfig:
    random_resized_crop: bool = _spec(True, kind=bool)
    crop_scale_min: float = _spec(0.6, kind=float, lo=0.05, hi=1.0)
    horizontal_flip: bool = _spec(True, kind=bool)
    color_jitter: float = _spec(0.2, kind=float, lo=0.0, hi=1.0)


@dataclass
class TeacherConfig:
    arch: str = _spec("resnet50", kind=str, choices=TEACHER_ARCHS)
    weights: str = _spec("none", kind=str, path=True)
    variant: str = _spec("full", kind=str, choices=("full", "tiny"))
    path: str | None = _spec(None, kind=str, path=True)
    ensemble: list[str] | None = _spec(None, kind=list, path=True)
    ensemble_features: str | int = _spec("all", kind=(str, int))
    image_size: int = _spec(0, kind=int, lo=0, hi=1024)
    input_scaling: str = _spec(
        "auto", kind=str, choices=("auto", "raw", "unit", "symmetric", "caffe", "torch")
    )
    outputs: str = _spec("auto", kind=str, choices=("auto", "logits", "probabilities"))
    class_order: list[str] | None = _spec(None, kind=list)
    feature_layer: str | None = _spec(None, kind=str)
    cache: str = _spec("auto", kind=str, choices=("auto", "off", "memory", "disk"))
    epochs: int | None = _spec(None, kind=int, lo=0)
    learning_rate: float | None = _spec(None, kind=float, lo=0.0, hi=10.0)

    @property
    def from_user(self) -> bool:
        """True when the user gives the teacher (`path`) or teachers (`ensemble`): none is
        trained."""
        return bool(self.path or self.ensemble)


@dataclass
class StudentConfig:
    arch: str = _spec(
        "resnet18",
        kind=str,
        choices=STUDENT_ARCHS,
    )
    weights: str = _spec("none", kind=str, path=True)
    variant: str = _spec("full", kind=str, choices=("full", "tiny"))
    patch_size: int = _spec(16, kind=int, lo=1)
    feature_layer: str | None = _spec(None, kind=str)
    epochs: int | None = _spec(None, kind=int, lo=0)
    learning_rate: float | None = _spec(None, kind=float, lo=0.0, hi=10.0)


@dataclass
class DistillConfig:
    alpha: float = _spec(0.5, kind=float, lo=0.0, hi=1.0)
    temperature: float = _spec(4.0, kind=float, lo=1e-3, hi=100.0)
    beta: float = _spec(1.0, kind=float, lo=0.0, hi=1000.0)
    mode: str = _spec("soft", kind=str, choices=("soft", "hard", "dkd"))
    feature_loss: str = _spec("fitnet", kind=str, choices=("fitnet", "attention"))
    feature_norm: str = _spec("l2", kind=str, choices=("none", "l2"))
    dkd_alpha: float = _spec(1.0, kind=float, lo=0.0, hi=1000.0)
    dkd_beta: float = _spec(8.0, kind=float, lo=0.0, hi=1000.0)


@dataclass
class TrainConfig:
    stages: list[str] = _spec(["teacher", "distill", "scratch"], kind=list)
    epochs: int = _spec(10, kind=int, lo=1)
    optimizer: str = _spec("sgd", kind=str, choices=("sgd", "adam", "adamw"))
    learning_rate: float = _spec(0.01, kind=float, lo=0.0, hi=10.0)
    momentum: float = _spec(0.9, kind=float, lo=0.0, hi=1.0)
    weight_decay: float = _spec(1e-4, kind=float, lo=0.0, hi=1.0)
    weight_decay_mode: str = _spec("decoupled", kind=str, choices=("decoupled", "l2"))
    schedule: str = _spec("cosine", kind=str, choices=("cosine", "constant"))
    warmup_epochs: int = _spec(0, kind=int, lo=0)
    monitor: str = _spec(
        "val_balanced_accuracy",
        kind=str,
        choices=("val_balanced_accuracy", "val_accuracy", "val_auc", "val_macro_f1"),
    )
    class_weight: str = _spec("none", kind=str, choices=("none", "balanced"))
    weight_distillation: bool = _spec(True, kind=bool)
    balanced_sampling: bool = _spec(False, kind=bool)
    logit_adjustment: float = _spec(0.0, kind=float, lo=0.0, hi=10.0)
    stack_prior_corrections: bool = _spec(False, kind=bool)
    # "auto": Keras's progress bar on a terminal, one line per epoch when output is piped
    verbose: int | str = _spec("auto", kind=(int, str), choices=(0, 1, 2, "auto"))
    tensorboard: bool = _spec(False, kind=bool)
    precision: str = _spec(
        "float32", kind=str, choices=("auto", "float32", "mixed_bfloat16", "mixed_float16")
    )
    # momentum of every batch norm's moving statistics (PyTorch's 0.9); 0 keeps the model's own
    batchnorm_momentum: float = _spec(0.9, kind=float, lo=0.0, hi=1.0)
    # XLA: "auto" turns it on where it was measured faster (see kd_keras.archs.JIT_FASTER)
    jit_compile: bool | str = _spec("auto", kind=(bool, str), choices=(True, False, "auto"))


@dataclass
class EvalConfig:
    split: str = _spec("test", kind=str, choices=("test", "val"))
    threshold: str = _spec("argmax", kind=str, choices=("argmax", "val_balanced_accuracy"))
    seed_subset: bool = _spec(True, kind=bool)
    subset_minority: int = _spec(21, kind=int, lo=1)
    subset_majority: int = _spec(279, kind=int, lo=1)
    subset_seed: int = _spec(0, kind=int, lo=0)


@dataclass
class ExportConfig:
    dir: str | None = _spec(None, kind=str, path=True)
    opset: int = _spec(17, kind=int, lo=13, hi=21)
    tolerance: float = _spec(1e-4, kind=float, lo=0.0)
    calibration_samples: int = _spec(256, kind=int, lo=1)


@dataclass
class DistributeConfig:
    # tf.distribute engine (kd_keras.distill.distribute): one device, the GPUs of this machine
    # (MirroredStrategy), or the machines of TF_CONFIG (MultiWorkerMirroredStrategy)
    strategy: str = _spec("none", kind=str, choices=("none", "mirrored", "multi_worker"))
    # BatchNorm statistics over the global batch (as on one device) rather than per replica
    sync_batch_norm: bool = _spec(True, kind=bool)


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


STAGES = ("teacher", "distill", "scratch")
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
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    for stage in cfg.train.stages:
        if stage not in STAGES:
            raise KDError(f"config key train.stages has unknown stage {stage!r}; valid: {STAGES}")
    size = cfg.data.image_size
    for section, arch in (("teacher", cfg.teacher.arch), ("student", cfg.student.arch)):
        need = MIN_IMAGE_SIZE.get(arch)
        if need and size < need:
            raise KDError(
                f"config key data.image_size = {size} is too small for {section} {arch} "
                f"(needs at least {need})"
            )
    if cfg.student.arch in TOKEN_ARCHS:
        p = cfg.student.patch_size
        if not patch_grid_ok(size, p):
            raise KDError(
                f"config key student.patch_size = {p} must divide data.image_size = {size} "
                "into a grid of at least 2x2 patches"
            )
    tc = cfg.train
    if tc.optimizer == "adamw" and tc.weight_decay_mode == "l2":
        raise KDError(
            'config keys train.optimizer = "adamw" and train.weight_decay_mode = "l2" contradict '
            'each other (AdamW is Adam with decoupled decay); use optimizer = "adam" for '
            'coupled L2, or weight_decay_mode = "decoupled"'
        )
    corrections = [
        key for key, on in (
            ('train.class_weight = "balanced"', tc.class_weight == "balanced"),
            ("train.balanced_sampling = true", tc.balanced_sampling),
            (f"train.logit_adjustment = {tc.logit_adjustment}", tc.logit_adjustment > 0),
        ) if on
    ]  # fmt: skip
    if len(corrections) > 1 and not tc.stack_prior_corrections:
        raise KDError(
            f"config sets {' and '.join(corrections)}: each corrects for the class prior, "
            "together they over-correct; keep one, or set train.stack_prior_corrections = true"
        )
    if cfg.data.source in ("folder", "csv") and not cfg.data.path:
        raise KDError(f"config key data.path is required when data.source = {cfg.data.source!r}")
    _check_ensemble(cfg.teacher)


def _check_ensemble(tc: TeacherConfig) -> None:
    if tc.ensemble is None:
        return
    if tc.path:
        raise KDError("config keys teacher.path and teacher.ensemble are both set; use "
                      "teacher.path for one teacher, teacher.ensemble for several")  # fmt: skip
    if len(tc.ensemble) < 2:
        raise KDError(f"config key teacher.ensemble lists {len(tc.ensemble)} teacher(s); list at "
                      "least 2, or use teacher.path for one")  # fmt: skip
    choice = tc.ensemble_features
    in_range = isinstance(choice, int) and 0 <= choice < len(tc.ensemble)
    if choice != "all" and not in_range:
        raise KDError(f'config key teacher.ensemble_features = {choice!r} must be "all" or a '
                      f"member index from 0 to {len(tc.ensemble) - 1}")  # fmt: skip


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
