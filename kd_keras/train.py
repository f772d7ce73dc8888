"""Training stages of a run: teacher fine-tuning, distillation, and the no-distillation baseline.

All three use the same engine (`Distiller`), optimiser recipe and best-epoch selection on the
validation split; only the loss weights differ. What each stage writes, and where, is defined by
`kd_keras.run.RunFolder`.

Weight decay: Keras 3 applies `weight_decay` to the weights directly in every optimizer
(decoupled, as in AdamW / SGDW: Loshchilov & Hutter, 2019); `train.weight_decay_mode = "l2"`
instead adds (weight_decay / 2) * ||w||^2 to the loss, which is what PyTorch's
`SGD(weight_decay=...)` does (coupled L2; the seeds' recipes were written for it).
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from kd_keras import distribute
from kd_keras.config import Config, TrainConfig
from kd_keras.data import Splits, check_splits, load_splits, make_dataset, training_steps
from kd_keras.distiller import Distiller
from kd_keras.errors import (
    Interrupted,
    KDError,
    atomic_write,
    read_json,
    write_json,
    write_text,
)
from kd_keras.evaluate import choose_threshold, classification_metrics
from kd_keras.host import describe_host, host_line, peak_rss_mb, tf_matmul_peak
from kd_keras.inference import keras_predictor, predict_probs
from kd_keras.models import build_student, build_teacher, image_size_of, set_batchnorm_momentum
from kd_keras.precision import choose_jit_compile, choose_policy, float32_copy, policy_scope
from kd_keras.report import evaluate_and_report
from kd_keras.run import STAGE_MODELS, RunFolder, sha256_of


def save_model(model: keras.Model, path: Path) -> Path:
    """Save a model as `.keras` atomically (no optimizer state: the deployable artefact)."""
    return atomic_write(path, lambda tmp: model.save(tmp))


def make_optimizer(tc: TrainConfig, learning_rate: float, epochs: int, steps_per_epoch: int):
    """The configured optimizer and learning-rate schedule (decoupled decay only: coupled L2
    is a loss term, see the module docstring)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(tc.warmup_epochs * steps_per_epoch, total - 1)
    if tc.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else learning_rate,
            decay_steps=total - warmup,
            warmup_target=learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    else:
        lr = learning_rate
    decay = tc.weight_decay if tc.weight_decay_mode == "decoupled" and tc.weight_decay else None
    if tc.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=tc.momentum, weight_decay=decay)
    # "adam" with decoupled decay is AdamW: Keras 3 decouples decay in every optimizer
    return keras.optimizers.Adam(lr, weight_decay=decay)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """'balanced' weights n / (k * n_c), as in scikit-learn."""
    counts = np.bincount(labels, minlength=num_classes).astype("float64")
    return {c: float(len(labels) / (num_classes * counts[c])) if counts[c] else 0.0
            for c in range(num_classes)}  # fmt: skip


class SelectBest(keras.callbacks.Callback):
    """Evaluates the trained classifier on the validation split after every epoch, adds
    `val_accuracy`, `val_balanced_accuracy`, `val_macro_f1`, `val_auc` to the epoch logs, keeps
    the weights of the best epoch by `monitor`, and restores them when training ends.

    The metrics use the decision rule evaluation will use: with `tune_threshold` (binary tasks,
    `eval.threshold = "val_balanced_accuracy"`) the threshold chosen on validation, not argmax —
    else a model that ranks well but is mis-calibrated at 0.5 ties with every other epoch at
    balanced accuracy 0.5. Ties on `monitor` go to the higher validation AUC (threshold-free),
    then to the later epoch."""

    def __init__(self, classifier: keras.Model, val_ds, y_val, class_names, monitor: str,
                 stage: str = "train", tune_threshold: bool = False):  # fmt: skip
        super().__init__()
        self.classifier = classifier
        self.predictor = keras_predictor(classifier)
        self.stage = stage
        self.val_ds = val_ds
        self.y_val = y_val
        self.class_names = class_names
        self.monitor = monitor
        self.tune_threshold = tune_threshold and len(class_names) == 2
        self.best_score = -np.inf
        self.best_auc = -np.inf
        self.best_epoch = -1
        self.best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        what = f"the {self.stage} stage's model after epoch {epoch + 1}"
        probs = predict_probs(self.predictor, self.val_ds, what)
        threshold = choose_threshold(self.y_val, probs) if self.tune_threshold else None
        m = classification_metrics(self.y_val, probs, self.class_names, threshold)
        values = {
            "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["balanced_accuracy"],
            "val_macro_f1": m["macro_f1"],
            "val_auc": m["roc_auc"] if m["roc_auc"] is not None else float("nan"),
        }
        if logs is not None:
            logs.update(values)
        score = values[self.monitor]
        auc = values["val_auc"] if np.isfinite(values["val_auc"]) else -np.inf
        if (score, auc) >= (self.best_score, self.best_auc):
            self.best_score, self.best_auc, self.best_epoch = score, auc, epoch
            self.best_weights = [w.copy() for w in self.classifier.get_weights()]
        rule = f" at threshold {threshold:.3f}" if threshold is not None else ""
        print(
            f"  val{rule}: balanced_accuracy {values['val_balanced_accuracy']:.4f}  "
            f"auc {values['val_auc']:.4f}  (best {self.monitor} {self.best_score:.4f} "
            f"at epoch {self.best_epoch + 1})"
        )

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.classifier.set_weights(self.best_weights)

    def state(self) -> tuple[dict, list[np.ndarray]]:
        """What a checkpoint needs to resume the selection: (scalars, best weights)."""
        scalars = {"best_score": float(self.best_score), "best_auc": float(self.best_auc),
                   "best_epoch": self.best_epoch}  # fmt: skip
        return scalars, (self.best_weights or [])

    def restore(self, scalars: dict, weights: list[np.ndarray]) -> None:
        """Resume the selection from a checkpoint's `state()`."""
        self.best_score, self.best_epoch = scalars["best_score"], scalars["best_epoch"]
        self.best_auc = scalars.get("best_auc", -np.inf)
        self.best_weights = list(weights) or None


class FiniteGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose loss or loss term is not finite, naming the
    stage, epoch, the terms and their values, and the likely cause: a term that is itself not
    finite (the model's outputs overflowed: usually the learning rate), or finite terms whose
    weighted sum is not (a loss weight too large); the last completed epoch's checkpoint is kept.

    Args:
        stage: the stage's name, for the message.
        weights: the config key and value weighting each term, e.g. `{"feat": ("distill.beta",
            1e39)}`, to name the one that overflowed.
        learning_rate: the stage's learning rate and the key that set it, for the message.
    """

    def __init__(self, stage: str, weights: dict[str, tuple[str, float]] | None = None,
                 learning_rate: tuple[str, float] | None = None):  # fmt: skip
        super().__init__()
        self.stage = stage
        self.weights = weights or {}
        self.learning_rate = learning_rate
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        values = {k: np.asarray(v) for k, v in (logs or {}).items()}
        bad = sorted(k for k, v in values.items() if not np.all(np.isfinite(v)))
        if bad:
            raise KDError(
                f"training diverged in stage {self.stage}, epoch {self.epoch + 1}, batch "
                f"{batch + 1}: {', '.join(bad)} not finite ({self._values(values)}); "
                f"{self._cause(values, bad)}. Nothing of this stage was saved except its last "
                "completed epoch (checkpoints/); fix that and train again with --overwrite"
            )

    @staticmethod
    def _values(values: dict) -> str:
        shown = [k for k in ("ce", "kd", "feat", "loss") if k in values] or sorted(values)
        return ", ".join(f"{k} = {float(np.mean(values[k])):.4g}" for k in shown)

    def _cause(self, values: dict, bad: list[str]) -> str:
        terms = [k for k in ("ce", "kd", "feat") if k in values]
        if terms and not set(terms) & set(bad):  # every term finite, their weighted sum not
            weighted = [(k, *self.weights[k]) for k in terms if k in self.weights]
            if weighted:
                term, key, weight = max(weighted, key=lambda t: abs(t[2]) * abs(float(
                    np.mean(values[t[0]]))))  # fmt: skip
                return (f"every term is finite but the weighted loss overflowed: {key} = "
                        f"{weight:g} times {term} = {float(np.mean(values[term])):.4g}; lower "
                        f"{key}")  # fmt: skip
            return "every term is finite but their weighted sum is not: lower the loss weights"
        lr = f" (now {self.learning_rate[1]:g}, {self.learning_rate[0]})" if self.learning_rate \
            else ""  # fmt: skip
        overflowed = ", ".join(k for k in terms if k in bad) or ", ".join(bad)
        return (
            f"{overflowed} itself overflowed: the model's outputs grew without bound, "
            f"usually a learning rate too high{lr}, or inputs that are not finite"
        )


class StageCheckpoint(keras.callbacks.Callback):
    """Keeps the last completed epoch of a stage, so `--resume` continues a killed run.

    Each epoch writes `epoch_<k>/` (the trained model's weights, batch-norm statistics
    included, the adapters' and the optimizer's state with its schedule step, and the
    best-so-far weights) and then, atomically, `latest.json` naming it (with the best-so-far
    score and the history rows): a kill at any moment leaves a complete previous epoch. The
    frozen teacher is not saved (it is rebuilt from its file). The arrays are copied at the end
    of the epoch and written by a background thread while the next epoch trains (the writes cost
    ~2 s per ResNet50 epoch here). Must be the last callback, after those whose state it saves.
    """

    def __init__(self, folder: Path, select: SelectBest, history: HistoryCSV):
        super().__init__()
        self.folder = Path(folder)
        self.select = select
        self.history = history
        self.seconds_before = 0.0
        self._start = time.perf_counter()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def latest(self) -> Path:
        return self.folder / "latest.json"

    @staticmethod
    def epochs_done(folder: Path) -> int:
        """Completed epochs kept in checkpoint `folder` (0 when it holds none)."""
        latest = Path(folder) / "latest.json"
        return read_json(latest)["epochs_done"] if latest.is_file() else 0

    def _state_variables(self) -> list:
        """What a resumed stage needs: the trained model's and adapters' variables (trainable
        or not) and the optimizer's (loss scale and schedule step included)."""
        model = self.model
        adapters = [v for adapter in model.adapters for v in adapter.weights]
        return list(model.student.weights) + adapters + list(model.optimizer.variables)

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()
        if not self.latest.is_file():
            return
        meta = read_json(self.latest)
        saved = self.folder / meta["dir"]
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trained_variables)
        variables = self._state_variables()
        with np.load(saved / "trainer.npz") as state:
            if len(state.files) != len(variables):
                raise KDError(
                    f"checkpoint {saved} holds {len(state.files)} arrays, this stage has "
                    f"{len(variables)} variables: it was written by other code; start the "
                    "stage again with --overwrite"
                )
            for i, variable in enumerate(variables):
                variable.assign(state[f"v{i}"])
        with np.load(saved / "best.npz") as best:
            self.select.restore(meta["select"], [best[f"w{i}"] for i in range(len(best.files))])
        self.history.rows = meta["history"]
        self.seconds_before = meta["seconds"]
        self.model._initial_epoch = meta["epochs_done"]
        print(f"  resuming after epoch {meta['epochs_done']} (checkpoint {saved})")

    def on_epoch_end(self, epoch, logs=None):
        self.wait()  # one write at a time, in epoch order
        state = [np.array(v.numpy()) for v in self._state_variables()]
        scalars, weights = self.select.state()
        meta = {"dir": f"epoch_{epoch + 1}", "epochs_done": epoch + 1, "select": scalars,
                "history": [dict(row) for row in self.history.rows],
                "seconds": self.seconds_before + time.perf_counter() - self._start}  # fmt: skip
        self._writer = threading.Thread(target=self._write, args=(meta, state, weights),
                                        name="kd_keras-checkpoint")  # fmt: skip
        self._writer.start()

    def _write(self, meta: dict, state: list, best: list) -> None:
        try:
            target = self.folder / meta["dir"]
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            np.savez(target / "trainer.npz", **{f"v{i}": a for i, a in enumerate(state)})
            np.savez(target / "best.npz", **{f"w{i}": w for i, w in enumerate(best)})
            write_json(self.latest, meta)
            for old in self.folder.glob("epoch_*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as err:  # re-raised in the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the pending checkpoint is on disk; re-raise its error, if any."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def on_train_end(self, logs=None):
        self.wait()

    @property
    def seconds(self) -> float:
        """Training time of the stage, resumed parts included."""
        return self.seconds_before + time.perf_counter() - self._start


class HistoryCSV(keras.callbacks.Callback):
    """Per-epoch logs written as CSV (atomically, rewritten each epoch)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.rows: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0})
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:  # the rate the last step of the epoch used
            row["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        self.rows.append(row)
        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, buf.getvalue())


def keras_verbose(setting: int | str, stream=None) -> int:
    """`train.verbose` as Keras's `fit(verbose=...)`: "auto" is the progress bar (1) on a
    terminal and one line per epoch (2) when output goes to a file or a pipe."""
    if setting != "auto":
        return int(setting)
    stream = sys.stdout if stream is None else stream
    return 1 if getattr(stream, "isatty", lambda: False)() else 2


def tensorboard_callback(log_dir: Path) -> keras.callbacks.TensorBoard:
    """Per-epoch scalars (every loss term, metric and the learning rate) for TensorBoard; it
    must come after `SelectBest`, whose validation metrics it logs. Checked before training:
    TensorFlow writes summaries only with the `tensorboard` package installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise KDError(
            "train.tensorboard = true needs the tensorboard package: pip install tensorboard "
            '(or pip install -e ".[tensorboard]")'
        )
    return keras.callbacks.TensorBoard(
        log_dir=str(log_dir), write_graph=False, profile_batch=0, update_freq="epoch"
    )


@dataclass
class StageResult:
    seconds: float
    best_epoch: int
    best_score: float
    epochs: int
    val_balanced_accuracy: float | None = None
    precision: str = "float32"
    jit_compile: str = ""


def fit_stage(
    cfg: Config,
    splits: Splits,
    stage: str,
    classifier: keras.Model,
    teacher: keras.Model | None,
    epochs: int,
    learning_rate: float,
    run: RunFolder,
    teacher_feature_layer: str | None = None,
) -> StageResult:
    """Train `classifier` in place (best validation epoch restored) for one stage."""
    dc = cfg.distill
    if stage == "distill":
        alpha, beta = dc.alpha, dc.beta
    else:
        alpha, beta, teacher = 1.0, 0.0, None
    tc = cfg.train
    adjustment = None
    if tc.logit_adjustment > 0:
        prior = np.bincount(splits.train.labels, minlength=splits.num_classes) / len(splits.train)
        adjustment = (tc.logit_adjustment * np.log(np.maximum(prior, 1e-12))).tolist()
    model = Distiller(
        classifier, teacher, alpha=alpha, temperature=dc.temperature, beta=beta, mode=dc.mode,
        feature_norm=dc.feature_norm, feature_loss=dc.feature_loss, dkd_alpha=dc.dkd_alpha,
        dkd_beta=dc.dkd_beta, weight_distillation=tc.weight_distillation,
        logit_adjustment=adjustment,
        l2_weight_decay=tc.weight_decay if tc.weight_decay_mode == "l2" else 0.0,
        teacher_feature_layer=teacher_feature_layer,
        student_feature_layer=cfg.student.feature_layer,
        ensemble_features=cfg.teacher.ensemble_features, name=f"{stage}_trainer",
    )  # fmt: skip
    size, batch = cfg.data.image_size, cfg.data.batch_size
    # the batch is loaded at the larger of the two resolutions; the Distiller resizes it down
    # for the other model
    train_size = max(size, image_size_of(teacher)) if model.uses_teacher else size
    seed = cfg.run.seed
    cache = _teacher_cache(cfg, model, splits, train_size, run) if model.uses_teacher else None
    # a resumed stage's stream starts at its first unfinished epoch (a balanced stream restarts)
    done = StageCheckpoint.epochs_done(run.checkpoint_dir(stage))
    train_ds = make_dataset(
        splits.train, train_size, batch, training=True, augment=cfg.augment, seed=seed,
        cache=cfg.data.cache, balanced=tc.balanced_sampling, teacher_cache=cache,
        first_epoch=done, epochs=epochs,
    )  # fmt: skip
    train_ds = distribute.shard_by_data(train_ds)  # workers split every global batch
    val_ds = make_dataset(splits.val, size, batch, cache=cfg.data.cache, labels=False)
    steps = training_steps(len(splits.train), batch)
    optimizer = make_optimizer(tc, learning_rate, epochs, steps)
    policy, _ = choose_policy(tc.precision)
    if policy == "mixed_float16":  # float16 gradients underflow unscaled
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    stepped = [cfg.student.arch if stage != "teacher" else cfg.teacher.arch]
    if model.uses_teacher and cache is None:  # the teacher runs inside the step
        stepped.append("user" if cfg.teacher.from_user else cfg.teacher.arch)
    jit, jit_reason = choose_jit_compile(tc.jit_compile, stepped)
    model.compile(optimizer=optimizer, jit_compile=jit)
    print(f"XLA: {'on' if jit is True else 'off' if jit is False else jit} ({jit_reason})")
    tune = cfg.eval.threshold != "argmax"
    select = SelectBest(classifier, val_ds, splits.val.labels, splits.class_names, tc.monitor,
                        stage, tune_threshold=tune)  # fmt: skip
    weights = (
        class_weights(splits.train.labels, splits.num_classes)
        if tc.class_weight == "balanced" else None
    )  # fmt: skip
    kd = ""
    if stage == "distill" and alpha < 1.0:
        kd = f", {dc.mode} KD" + (f" at T {dc.temperature}" if dc.mode != "hard" else "")
    print(f"\n== stage {stage}: {classifier.name}, {classifier.count_params():,} parameters, "
          f"{epochs} epochs, lr {learning_rate}, alpha {alpha}, beta {beta}{kd}")  # fmt: skip
    history = HistoryCSV(run.history_path(stage))
    checkpoint = StageCheckpoint(run.checkpoint_dir(stage), select, history)
    term_weights = {"kd": ("1 - distill.alpha", 1.0 - alpha), "feat": ("distill.beta", beta)}
    guard = FiniteGuard(stage, term_weights, (learning_rate_key(stage, cfg), learning_rate))
    callbacks = [guard, select, history]
    callbacks += [tensorboard_callback(run.tensorboard_dir(stage))] if tc.tensorboard else []
    if tc.batchnorm_momentum > 0:
        set_batchnorm_momentum(classifier, tc.batchnorm_momentum)
    synced = distribute.sync_batch_norm(classifier, cfg.distribute.sync_batch_norm)
    try:
        model.fit(
            train_ds, epochs=epochs, steps_per_epoch=steps,
            class_weight=weights, verbose=keras_verbose(tc.verbose), shuffle=False,
            callbacks=callbacks + [checkpoint],
        )  # fmt: skip
    finally:
        distribute.unsync_batch_norm(synced)
        if cache is not None and cache.storage == "disk":
            shutil.rmtree(run.teacher_cache_dir, ignore_errors=True)
    best = [r for r in history.rows if r.get("epoch") == select.best_epoch + 1]
    balanced = best[0].get("val_balanced_accuracy") if best else None
    return StageResult(checkpoint.seconds, select.best_epoch + 1, select.best_score, epochs,
                       balanced, precision=policy, jit_compile=f"{jit} ({jit_reason})")  # fmt: skip


def learning_rate_key(stage: str, cfg: Config) -> str:
    """The config key that set a stage's learning rate (its own, or `train.learning_rate`)."""
    own = "teacher" if stage == "teacher" else "student"
    return f"{own}.learning_rate" if getattr(cfg, own).learning_rate is not None else (
        "train.learning_rate")  # fmt: skip


def check_not_chance(stage: str, result: StageResult, cfg: Config, splits: Splits,
                     learning_rate: float, force: bool) -> None:  # fmt: skip
    """A trained stage whose best model is no better than chance on validation (balanced
    accuracy <= 1/k + 0.05, the rule `kd_keras.teacher.check_teacher` applies to a user's
    teacher) is a failed stage, not a result, unless `force`."""
    value = result.val_balanced_accuracy
    chance = 1.0 / splits.num_classes
    if value is None or value > chance + 0.05:
        return
    line = (f"stage {stage} ended no better than chance on validation (balanced accuracy "
            f"{value:.3f} at its best epoch {result.best_epoch}, chance {chance:.3f})")  # fmt: skip
    if force:
        print(f"warning: {line}; kept because of --force")
        return
    raise KDError(
        f"{line}, so it is not saved as a result. Likely causes: the learning rate (now "
        f"{learning_rate:g}, {learning_rate_key(stage, cfg)}; too high diverges, too low does "
        f"not move), too few epochs, or data whose labels do not match its images "
        f"({len(splits.train)} training images, {splits.num_classes} classes). Change it and "
        "train again, or use --force to keep such a model"
    )


def _augments(cfg: Config) -> bool:
    a = cfg.augment
    return a.random_resized_crop or a.horizontal_flip or a.color_jitter > 0


def _teacher_cache(cfg: Config, model: Distiller, splits: Splits, size: int, run: RunFolder):
    """The frozen teacher's outputs on every training image, when `teacher.cache` asks for
    them (`auto`: whenever augmentation is off, so the cache is exact)."""
    from kd_keras.teacher import TeacherCache

    mode = cfg.teacher.cache
    if mode == "off" or (mode == "auto" and _augments(cfg)):
        return None
    if mode == "auto":
        per_image = sum(int(np.prod(t.shape[1:])) for t in model._teacher_graph.outputs)
        mode = "memory" if per_image * 4 * len(splits.train) < 2e9 else "disk"
    if _augments(cfg):
        print("teacher cache: the teacher sees each training image without augmentation "
              "(the student sees it augmented)")  # fmt: skip
    start = time.perf_counter()
    cache = TeacherCache(model, splits.train, size, cfg.data.batch_size, mode,
                         run.teacher_cache_dir)  # fmt: skip
    print(f"teacher cache ({mode}): {len(splits.train)} images, {cache.nbytes / 1e6:.1f} MB, "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return cache


def _stage_setting(value, default):
    return default if value is None else value


def run_distill(
    cfg: Config,
    stages: list[str] | None = None,
    copy_teacher: bool = True,
    force: bool = False,
    mode: str = "new",
) -> dict:
    """Run the configured stages, then evaluate every model of the run on the test split.

    A teacher given by `teacher.path` (any Keras classifier, SavedModel or keras-hub preset:
    see `kd_keras.teacher`) is wrapped into its own view of the image, checked on validation
    (a teacher no better than chance stops the run unless `force`), and saved as the run's
    teacher (so the run is self-contained for evaluation and export) unless `copy_teacher` is
    False. `mode` (`new`, `resume`, `overwrite`) says what may happen to a folder that already
    holds results (`RunFolder.create`); with `resume`, finished stages are kept and the
    interrupted one continues from its last completed epoch. `cfg` is not modified: the run
    works from the config it saved.
    """
    stages = stages or cfg.train.stages
    worker = distribute.start(cfg, mode)  # before TensorFlow runs any operation
    cfg = distribute.worker_config(cfg, worker)  # non-chief workers: a temporary folder
    loaded = {}

    def check_request(resolved: Config) -> None:  # before the run folder is touched
        loaded["splits"] = check_splits(load_splits(resolved.data, seed=resolved.run.seed),
                                        resolved)  # fmt: skip
        check_stages(resolved, RunFolder(resolved.run_dir), stages, mode)

    run = RunFolder.create(cfg, mode, stages, check=check_request)
    cfg, splits = run.cfg, loaded["splits"]
    current = {"stage": None, "finished": False}
    try:
        with worker.strategy.scope():  # teacher, student and optimizer built under it
            _run_stages(cfg, run, splits, stages, copy_teacher, force, current)
    except (KeyboardInterrupt, Interrupted):
        where = f" in stage {current['stage']}" if current["stage"] else ""
        if mode == "overwrite" and not current["finished"]:
            raise Interrupted(
                f"interrupted{where} before any stage finished: {run.undo() or 'nothing changed'}"
                "; run the --overwrite again to replace it"
            ) from None
        run.drop_snapshot()
        raise Interrupted(
            f"interrupted{where}; completed stages and the last completed epoch are kept in "
            f"{run.path}; continue with: python cli.py distill --config {run.config_path} "
            "--resume"
        ) from None
    except BaseException as err:
        if not current["finished"]:  # nothing of this command stands: leave nothing changed
            undone = run.undo()
            if undone and isinstance(err, KDError):
                raise type(err)(f"{err}; as no stage of this command finished, {undone}") from err
        raise
    finally:
        distribute.cleanup_worker(cfg, worker)
    run.drop_snapshot()
    if not worker.is_chief:
        return {}  # the chief evaluates and writes the report
    return evaluate_and_report(run, splits=splits)


def check_stages(cfg: Config, run: RunFolder, stages: list[str], mode: str) -> None:
    """Refuse, before anything is written or removed, a request whose stages cannot run: a
    `teacher.path` / `teacher.ensemble` entry that does not exist, or a distillation stage with
    no teacher to learn from (none configured, none trained in this command, and none in the
    folder that would survive the request)."""
    from kd_keras.ensemble import member_source
    from kd_keras.teacher import PRESET_PREFIXES

    tc = cfg.teacher
    if tc.from_user:
        key = "teacher.path" if tc.path else "teacher.ensemble entry"
        for source in [tc.path] if tc.path else tc.ensemble:
            if not source.startswith(PRESET_PREFIXES) and not Path(source).exists():
                raise KDError(f"{key} file not found: {source}")
            member_source(source)  # a run folder must hold a teacher
        return
    if "distill" not in stages or "teacher" in stages:
        return
    teacher = run.model_path("teacher")
    kept = teacher.is_file() and (mode != "overwrite" or run.stage_done("teacher", cfg))
    if not kept:
        why = (f"{teacher.name} in {run.path} was trained under another config and --overwrite "
               "would remove it") if teacher.is_file() else f"none in {run.path}"  # fmt: skip
        raise KDError(
            f"stage distill needs a teacher: {why}, and teacher.path is not set; add the "
            "teacher stage (--stages teacher,distill) or set teacher.path"
        )


def _run_stages(cfg, run: RunFolder, splits, stages, copy_teacher, force, current) -> None:
    n, size = splits.num_classes, cfg.data.image_size
    tc = cfg.train
    info = describe_host(tf_matmul_peak(seconds=0.5))
    print(f"host: {host_line(info)}")
    policy, reason = choose_policy(tc.precision)
    print(f"precision: {policy} ({reason}); saved models float32")

    def new_teacher(weights: str):
        return build_teacher(cfg.teacher.arch, n, size, weights,
                             tiny=cfg.teacher.variant == "tiny")  # fmt: skip

    def new_student(weights: str):
        return build_student(cfg.student.arch, n, size, weights, cfg.student.patch_size,
                             tiny=cfg.student.variant == "tiny")  # fmt: skip

    def train(stage: str, model, build, teacher, epochs, learning_rate, tap=None):
        current["stage"] = stage
        run.set_stage(stage, "running", cfg)
        result = fit_stage(cfg, splits, stage, model, teacher, epochs, learning_rate, run, tap)
        try:
            check_not_chance(stage, result, cfg, splits, learning_rate, force)
        except KDError:
            run.drop_checkpoint(stage)  # resuming it would only end at chance again
            raise
        saved = save_model(float32_copy(model, lambda: build("none")),
                           run.model_path(STAGE_MODELS[stage]))  # fmt: skip
        run.record_stage(stage, {**result.__dict__, "host": info, "peak_rss_mb": peak_rss_mb()})
        run.set_stage(stage, "done", cfg, sha256=sha256_of(saved))
        run.drop_checkpoint(stage)
        run.drop_snapshot()  # this stage's results replace the old ones
        current["stage"], current["finished"] = None, True

    def saved_teacher():
        """The run's teacher, rebuilt in the training precision when it is ours."""
        loaded = run.load_model("teacher")
        if policy == "float32" or cfg.teacher.from_user:
            return loaded
        with policy_scope(policy):
            teacher = new_teacher("none")
        teacher.set_weights(loaded.get_weights())
        return teacher

    teacher_file = run.model_path("teacher")
    teacher = None
    teacher_tap = cfg.teacher.feature_layer
    if cfg.teacher.from_user:
        from kd_keras.teacher import prepare_teacher

        teacher, teacher_tap, described = prepare_teacher(cfg, splits, "distill" in stages, force)
        print(f"teacher: {described}")
        from kd_keras.teacher import saved_models_in

        source = cfg.teacher.path or cfg.teacher.ensemble
        # the fingerprints later commands check: the run's copy (or, not copied, the user's
        # .keras file itself) and every SavedModel inside the view
        recorded = {"source": source, "saved_models": saved_models_in(teacher)}
        if copy_teacher:
            recorded["sha256"] = sha256_of(save_model(teacher, teacher_file))
        elif cfg.teacher.path and Path(cfg.teacher.path).is_file():
            recorded["sha256"] = sha256_of(cfg.teacher.path)
        run.set_stage("teacher", "done", cfg, **recorded)
    elif "teacher" in stages and run.stage_done("teacher", cfg) and teacher_file.is_file():
        print(f"\n== stage teacher: finished earlier, kept ({teacher_file})")
        teacher = saved_teacher()
    elif "teacher" in stages:
        keras.utils.set_random_seed(cfg.run.seed)
        with policy_scope(policy):
            teacher = new_teacher(cfg.teacher.weights)
        train("teacher", teacher, new_teacher, None, _stage_setting(cfg.teacher.epochs, tc.epochs),
              _stage_setting(cfg.teacher.learning_rate, tc.learning_rate))  # fmt: skip

    for stage in ("distill", "scratch"):
        if stage not in stages:
            continue
        target = run.model_path(STAGE_MODELS[stage])
        if run.stage_done(stage, cfg) and target.is_file():
            print(f"\n== stage {stage}: finished earlier, kept ({target})")
            continue
        if stage == "distill" and teacher is None:
            if not teacher_file.is_file():
                raise KDError(
                    f"stage distill needs a teacher: none in {run.path} and teacher.path is not "
                    "set; add the teacher stage or set teacher.path"
                )
            teacher = saved_teacher()
        keras.utils.set_random_seed(cfg.run.seed)  # same initial student for both stages
        with policy_scope(policy):
            student = new_student(cfg.student.weights)
        train(stage, student, new_student, teacher, _stage_setting(cfg.student.epochs, tc.epochs),
              _stage_setting(cfg.student.learning_rate, tc.learning_rate), teacher_tap)  # fmt: skip
