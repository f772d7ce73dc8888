"""The run folder: the one place that knows what a run writes and where (the layout:
`kd_keras.run.files`). Every other module asks a `RunFolder` for these paths; none spells a
file name itself.
"""

from __future__ import annotations

import os
import shutil
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from kd_keras.config import Config, load_config
from kd_keras.data.sources import load_splits
from kd_keras.errors import KDError
from kd_keras.io import newest_mtime, read_json, sha256_of, write_json
from kd_keras.models.loading import load_model, trust_saved_model
from kd_keras.prog import command
from kd_keras.run.files import (
    BENCHMARK_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    EXPORT_FILE,
    MEMBERS_DIR,
    MODEL_CARD_FILE,
    MODEL_STAGES,
    REPORT_FILE,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
    STATE_FILE,
    TENSORBOARD_DIR,
    TRAIN_LOG_FILE,
    resolve_data_source,
    stage_hash,
    stage_inputs,
)


class RunFolder:
    """A run's folder: its paths, its saved config, report and training log, and its data.

    Args:
        path: the folder (it need not exist yet; `create` makes it).

    Example:
        >>> run = RunFolder.find("runs/xray")
        >>> run.model_path("student"), run.cfg.data.image_size
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fresh = False  # set by `create`: the folder did not exist before

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, cfg: Config, mode: str = "new", stages: list[str] | None = None,
               check=None) -> RunFolder:  # fmt: skip
        """The folder of `cfg` (made if needed) with `cfg`, data source resolved, saved in it.

        `mode` says what may happen to a folder that already holds results: `"new"` refuses it;
        `"resume"` continues it (finished stages are kept, the interrupted one resumes from its
        last epoch) and refuses a config that changes any stage's result; `"overwrite"`
        replaces the `stages` to run and removes what no longer belongs to the new config.
        `check(cfg)` (for example the data checks) runs after these checks and before anything
        is written or removed, so a failing run leaves no folder behind."""
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode must be new, resume or overwrite, got {mode!r}")
        cfg = resolve_data_source(cfg)
        run = cls(cfg.run_dir)
        held = run.results()
        if mode == "new" and held:
            raise KDError(
                f"run folder {run.path} already holds results ({', '.join(held[:4])}); add "
                "--resume to continue it, --overwrite to replace it, or choose another run.name"
            )
        if mode == "resume":
            if not held and not run.state_path.is_file():
                raise KDError(f"nothing to resume in {run.path}: drop --resume to start the run")
            run._check_resumable(cfg)
        if check is not None:
            check(cfg)
        run.fresh = not run.path.exists()
        if mode != "resume" and not run.fresh:
            run.snapshot()  # what a failure before the first finished stage restores
        if mode == "overwrite" and held:
            run._clear_for(cfg, stages or cfg.train.stages)
        run.path.mkdir(parents=True, exist_ok=True)
        cfg.save(run.config_path)
        run.__dict__.pop("cfg", None)
        return run

    @classmethod
    def find(cls, run: str | os.PathLike | None = None, runs_dir: str | os.PathLike = "runs",
             config: str | os.PathLike | None = None) -> RunFolder:  # fmt: skip
        """The run folder `run`, else the run folder of the config file `config` (both given
        must agree), else the most recently modified run under `runs_dir` ("modified": the
        newest file inside, so re-training a run makes it the latest)."""
        if config is not None:
            own = load_config(config).run_dir
            if run is not None and Path(run).resolve() != own.resolve():
                raise KDError(f"--run {run} is not the run folder of --config {config} ({own}); "
                              "give one")  # fmt: skip
            run = own
        if run is not None:
            path = Path(run)
            if not path.is_dir():
                raise KDError(f"run folder not found: {path}")
            if not (path / CONFIG_FILE).is_file():
                raise KDError(f"{path} is not a run folder (it has no {CONFIG_FILE})")
            return cls(path)
        root = Path(runs_dir)
        runs = [p for p in root.iterdir() if not p.name.startswith(".")
                and (p / CONFIG_FILE).is_file()] if root.is_dir() else []  # fmt: skip
        if not runs:
            raise KDError(
                f"no run found under {root}/ — train one with "
                f"`{command('distill --config configs/xray.toml')}` or pass --run"
            )
        return cls(max(runs, key=newest_mtime))

    # ------------------------------------------------------------ paths

    @property
    def name(self) -> str:
        """The folder's name, which names its export folder too."""
        return self.path.resolve().name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def report_md_path(self) -> Path:
        return self.path / REPORT_MD_FILE

    @property
    def train_log_path(self) -> Path:
        return self.path / TRAIN_LOG_FILE

    def model_path(self, name: str) -> Path:
        """Where model `name` (teacher, student, student_scratch) is saved in this run."""
        if name not in MODEL_STAGES:
            raise KDError(f"unknown model {name!r}; valid: {', '.join(MODEL_STAGES)}")
        return self.path / f"{name}.keras"

    def history_path(self, stage: str) -> Path:
        return self.path / f"history_{stage}.csv"

    def confusion_path(self, name: str, suffix: str) -> Path:
        return self.path / f"confusion_{name}{suffix}"

    @property
    def report_html_path(self) -> Path:
        return self.path / REPORT_HTML_FILE

    def predictions_path(self, name: str) -> Path:
        """Per-image test probabilities of model `name` (written by evaluation)."""
        return self.path / f"predictions_{name}.npz"

    def tensorboard_dir(self, stage: str) -> Path:
        """TensorBoard event files of one training stage."""
        return self.path / TENSORBOARD_DIR / stage

    def export_file(self, out_dir: str | os.PathLike | None = None) -> Path:
        """`export.json` of this run's export folder."""
        return self.export_dir(out_dir) / EXPORT_FILE

    def benchmark_file(self, out_dir: str | os.PathLike | None = None) -> Path:
        """`benchmark.json` (trained image size) of this run's export folder."""
        return self.export_dir(out_dir) / BENCHMARK_FILE

    def model_card_path(self, out_dir: str | os.PathLike | None = None) -> Path:
        """`MODEL_CARD.md` beside the exported models."""
        return self.export_dir(out_dir) / MODEL_CARD_FILE

    @property
    def teacher_cache_dir(self) -> Path:
        """Where a disk teacher cache lives while a distillation stage runs."""
        return self.path / "teacher_cache"

    def export_dir(self, out_dir: str | os.PathLike | None = None) -> Path:
        """`<out_dir or export.dir or export>/<run name>/`."""
        return Path(out_dir or self.cfg.export.dir or "export") / self.name

    # ------------------------------------------------------------ contents

    @cached_property
    def cfg(self) -> Config:
        """The saved config (read once)."""
        if not self.config_path.is_file():
            raise KDError(f"{self.path} is not a run folder (it has no {CONFIG_FILE})")
        return load_config(self.config_path)

    @property
    def report(self) -> dict[str, Any]:
        """The saved report, or an empty dict before evaluation."""
        return read_json(self.report_path) if self.report_path.is_file() else {}

    @property
    def finished(self) -> bool:
        """True once the run has been evaluated (its report exists)."""
        return self.report_path.is_file()

    def model_file(self, name: str) -> Path | None:
        """The saved model `name`; for the teacher, the configured `teacher.path` when the run
        did not copy it: once a run records stage states, only a `.keras` file its teacher
        stage is recorded as done from (with its sha256), never one the run refused. None when
        there is none."""
        path = self.model_path(name)
        if path.is_file():
            return path
        source = self.cfg.teacher.path if name == "teacher" else None
        if not source or not Path(source).is_file():
            return None
        if not self.state_path.is_file():  # written by hand or before run states: as it was
            return Path(source)
        entry = self.state()["stages"].get("teacher", {})
        checked = entry.get("status") == "done" and entry.get("source") == source
        return Path(source) if checked and entry.get("sha256") else None

    def models(self) -> dict[str, Path]:
        """Every model the run holds, in report order."""
        found = {name: self.model_file(name) for name in MODEL_STAGES}
        return {name: path for name, path in found.items() if path is not None}

    def check_fingerprint(self, name: str, path: Path | None = None) -> None:
        """Refuse model `name` when its file's sha256 differs from the one `run_state.json`
        recorded at the end of its stage (a file replaced or edited since). Runs written before
        fingerprints were recorded have none to compare."""
        path = path or self.model_file(name)
        recorded = self.state()["stages"].get(MODEL_STAGES[name], {}).get("sha256")
        if path is None or not recorded:
            return
        if sha256_of(path) != recorded:
            raise KDError(
                f"{path} changed since stage {MODEL_STAGES[name]} saved it (its sha256 differs "
                f"from the one in {self.state_path}); restore the run's own file, or retrain "
                f"with `{command(f'distill --config {self.config_path} --overwrite')}`"
            )

    def check_fingerprints(self) -> None:
        """`check_fingerprint` for every model the run holds."""
        for name, path in self.models().items():
            self.check_fingerprint(name, path)

    def load_model(self, name: str):
        """The run's model `name` (None when absent), after its fingerprint check, in Keras's
        safe mode. A teacher view around a SavedModel loads it only when the run recorded that
        SavedModel (the config's own `teacher.path` or ensemble member) with the sha256 it
        still has."""
        path = self.model_file(name)
        if path is None:
            return None
        self.check_fingerprint(name, path)
        if name == "teacher":
            self._trust_saved_models()
        return load_model(path, f"{name} model")

    def _trust_saved_models(self) -> None:
        tc = self.cfg.teacher
        configured = {str(Path(p).resolve()) for p in [tc.path, *(tc.ensemble or [])] if p}
        recorded = self.state()["stages"].get("teacher", {}).get("saved_models", {})
        for path, sha in recorded.items():
            if str(Path(path).resolve()) in configured:
                trust_saved_model(path, sha)

    def arch(self, name: str) -> str:
        """Model `name`'s architecture as report.json, exports, benchmark rows and the model
        card name it: the configured one, `ensemble of k [<arch>]`, or `own teacher <file>`."""
        tc = self.cfg.teacher
        if name != "teacher":
            return self.cfg.student.arch
        if tc.members > 1:
            return f"ensemble of {tc.members} {tc.arch}"
        if tc.ensemble:
            return f"ensemble of {len(tc.ensemble)}"
        if tc.path:
            return f"own teacher {Path(tc.path.rstrip('/')).name}"
        return tc.arch

    def threshold(self, name: str) -> float | None:
        """The decision threshold evaluation chose for model `name` (None: argmax)."""
        value = self.report.get("models", {}).get(name, {}).get("threshold")
        return None if value is None else float(value)

    def train_log(self) -> dict[str, Any]:
        """Per-stage wall-clock time and best epoch, as recorded by training."""
        return read_json(self.train_log_path) if self.train_log_path.is_file() else {}

    def record_stage(self, stage: str, entry: dict[str, Any]) -> None:
        """Add one stage's entry to the training log (atomically)."""
        log = self.train_log()
        log[stage] = entry
        write_json(self.train_log_path, log)

    # ------------------------------------------------------------ undo

    @property
    def snapshot_path(self) -> Path:
        """Where `snapshot` keeps the folder as it was before this command changed it."""
        return self.path.parent / f".{self.path.name}.before"

    def snapshot(self) -> Path:
        """Keep the folder's current files (hard links where the file system allows, else
        copies): every file a run writes is replaced atomically, never changed in place, so
        the links keep the old bytes while the run trains."""

        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:  # no hard links here (or across devices): copy
                shutil.copy2(src, dst)
            return dst

        shutil.rmtree(self.snapshot_path, ignore_errors=True)
        shutil.copytree(self.path, self.snapshot_path, symlinks=True, copy_function=link)
        return self.snapshot_path

    def undo(self) -> str | None:
        """Put the folder back as it was before this command (its snapshot), or remove it when
        the command created it; returns what was done, for the message (None: nothing)."""
        if self.snapshot_path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self.snapshot_path, self.path)
            return f"{self.path} is restored as it was"
        if self.fresh:
            shutil.rmtree(self.path, ignore_errors=True)
            return f"no run folder is left ({self.path} removed)"
        return None

    def drop_snapshot(self) -> None:
        """Forget the snapshot once a stage of this command finished (its results stand)."""
        shutil.rmtree(self.snapshot_path, ignore_errors=True)

    # ------------------------------------------------------------ state

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    def checkpoint_dir(self, stage: str) -> Path:
        """Where an unfinished stage keeps its last completed epoch (for --resume)."""
        return self.path / CHECKPOINT_DIR / stage

    def drop_checkpoint(self, stage: str) -> None:
        """Delete a finished stage's checkpoint (and the checkpoints folder once empty)."""
        shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)
        parent = self.path / CHECKPOINT_DIR
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()

    def state(self) -> dict[str, Any]:
        """`{"stages": {stage: {"status": "running" | "done", "hash": ..., ...}}}`."""
        if not self.state_path.is_file():
            return {"stages": {}}
        return read_json(self.state_path)

    def set_stage(self, stage: str, status: str, cfg: Config, **extra: Any) -> None:
        """Record a stage as running or done, with the fingerprint of what it depends on."""
        state = self.state()
        updated = time.strftime("%Y-%m-%dT%H:%M:%S")
        entry = {"status": status, "hash": stage_hash(cfg, stage), "updated": updated, **extra}
        state["stages"][stage] = entry
        write_json(self.state_path, state)

    def stage_done(self, stage: str, cfg: Config) -> bool:
        """Whether `stage` finished under a config giving the same result as `cfg`."""
        entry = self.state()["stages"].get(stage, {})
        return entry.get("status") == "done" and entry.get("hash") == stage_hash(cfg, stage)

    def results(self) -> list[str]:
        """Names of the result files this folder holds (models, report, checkpoints, state)."""
        names = [self.model_path(m).name for m in MODEL_STAGES if self.model_path(m).is_file()]
        for path in (self.report_path, self.state_path, self.path / CHECKPOINT_DIR):
            if path.exists():
                names.append(path.name)
        return names

    def _check_resumable(self, cfg: Config) -> None:
        if not self.config_path.is_file():
            return
        saved = load_config(self.config_path)
        for stage in ("teacher", "distill", "scratch"):
            old, new = stage_inputs(saved, stage), stage_inputs(cfg, stage)
            changed = sorted(k for k in new if old.get(k) != new[k])
            if changed:
                shown = ", ".join(f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in changed[:3])
                raise KDError(
                    f"cannot resume {self.path}: the config changes {shown}; resume with the "
                    "saved config (its config.toml), or use --overwrite to train anew"
                )

    def _clear_for(self, cfg: Config, stages: list[str]) -> None:
        """Remove the models of `stages`, and of finished stages whose inputs changed, with the
        report (it no longer describes the folder) and stale checkpoints."""
        state = self.state()["stages"]
        for model, stage in MODEL_STAGES.items():
            entry = state.get(stage, {})
            stale = stage in stages or entry.get("hash") != stage_hash(cfg, stage)
            if stale:
                self.model_path(model).unlink(missing_ok=True)
                self.history_path(stage).unlink(missing_ok=True)
                self.drop_checkpoint(stage)
                if stage == "teacher":  # the members an ensemble teacher was built from
                    shutil.rmtree(self.path / MEMBERS_DIR, ignore_errors=True)
                state.pop(stage, None)
        self.report_path.unlink(missing_ok=True)
        self.report_md_path.unlink(missing_ok=True)
        if self.path.is_dir():
            write_json(self.state_path, {"stages": state})

    def check_consistent(self, report: bool = True) -> None:
        """Refuse a folder whose parts do not belong together: a model whose stage is not
        recorded as done under the saved config, or (with `report`) a report older than a
        model."""
        if not self.state_path.is_file():
            return  # written before run states existed, or by hand: nothing to compare
        cfg = self.cfg
        self.check_fingerprints()
        for model, stage in MODEL_STAGES.items():
            path = self.model_path(model)
            if not path.is_file():
                continue
            if not self.stage_done(stage, cfg):
                raise KDError(
                    f"{path} does not belong to this run's config (stage {stage} did not finish "
                    f"under it); finish the run with "
                    f"`{command(f'distill --config {self.config_path} --resume')}`, or retrain "
                    "with --overwrite"
                )
            stale_report = (
                report and self.report_path.is_file()
                and self.report_path.stat().st_mtime < path.stat().st_mtime
            )  # fmt: skip
            if stale_report:
                raise KDError(f"{self.report_path} is older than {path.name}: re-run "
                              f"`{command(f'evaluate --run {self.path}')}`")  # fmt: skip

    def load_splits(self):
        """The run's train/val/test splits, from its saved config (nothing is mutated)."""
        return load_splits(self.cfg.data, seed=self.cfg.run.seed)
