"""The distillation workflow: train the stages, evaluate, write the report."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kd_keras.config import Config
from kd_keras.data.checks import check_splits
from kd_keras.data.sources import load_splits
from kd_keras.distill import distribute
from kd_keras.distill.stages import check_stages, run_stages
from kd_keras.errors import Interrupted, KDError
from kd_keras.evaluation.evaluate import evaluate_run
from kd_keras.prog import command
from kd_keras.reporting.run_report import write_run_report
from kd_keras.run.folder import RunFolder

logger = logging.getLogger(__name__)


def write_report_after_evaluation(run: RunFolder) -> Path | None:
    """`report.html` of a just-evaluated run. The metrics are already saved: a file the report
    cannot read or write is printed as a warning and does not fail the evaluation (the `report`
    command retries it); a bug in the report keeps its own exception and traceback."""
    try:
        return write_run_report(run)
    # Not a record-then-re-raise (it swallows), so not broad: OSError (writing the page, reading
    # a figure's data), ValueError (matplotlib on odd values, JSON), KDError (a run file the user
    # can fix). The traceback goes to the debug log.
    except (OSError, ValueError, KDError) as err:
        logger.debug("writing %s failed", run.report_html_path, exc_info=True)
        logger.warning(f"warning: {run.report_html_path} not written "
                       f"({type(err).__name__}: {err}); "
                       f"retry with `{command(f'report --run {run.path}')}`")  # fmt: skip
        return None


def evaluate_and_report(run: str | os.PathLike | RunFolder | None, splits=None) -> dict:
    """`evaluate.evaluate_run`, then the run's `report.html`; returns the report dict."""
    run = run if isinstance(run, RunFolder) else RunFolder.find(run)
    report = evaluate_run(run, splits=splits)
    write_report_after_evaluation(run)
    return report


def run_distill(
    cfg: Config,
    stages: list[str] | None = None,
    copy_teacher: bool = True,
    force: bool = False,
    mode: str = "new",
) -> dict:
    """Run the configured stages, then evaluate every model of the run on the test split.

    A teacher given by `teacher.path` (any Keras classifier, SavedModel or keras-hub preset:
    see `kd_keras.distill.teacher`) is wrapped into its own view of the image, checked on validation
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
            run_stages(cfg, run, splits, stages, copy_teacher, force, current)
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
            f"{run.path}; continue with: {command(f'distill --config {run.config_path} --resume')}"
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
