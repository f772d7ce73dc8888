"""Training callbacks: best-epoch selection, the non-finite guard, resumable stage checkpoints, the
history CSV.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np

from kd_keras.errors import KDError
from kd_keras.evaluation.metrics import choose_threshold, classification_metrics
from kd_keras.io import read_json, write_json, write_text
from kd_keras.runtimes import keras_predictor, predict_probs

logger = logging.getLogger(__name__)


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
        logger.info(
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

    @property
    def initial_epoch(self) -> int:
        """The epoch a resumed stage continues from (0 when there is no checkpoint): what
        `fit_stage` passes as `fit(initial_epoch=...)`."""
        return self.epochs_done(self.folder)

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
        logger.info(f"  resuming after epoch {meta['epochs_done']} (checkpoint {saved})")

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
