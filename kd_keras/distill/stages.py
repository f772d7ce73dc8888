"""Training stages of a run: teacher fine-tuning, distillation, and the no-distillation baseline.

All three use the same engine (`Distiller`), optimiser recipe and best-epoch selection on the
validation split; only the loss weights differ. What each stage writes, and where, is defined by
`kd_keras.run.folder.RunFolder`.

Weight decay: Keras 3 applies `weight_decay` to the weights directly in every optimizer
(decoupled, as in AdamW / SGDW: Loshchilov & Hutter, 2019); `train.weight_decay_mode = "l2"`
instead adds (weight_decay / 2) * ||w||^2 to the loss, which is what PyTorch's
`SGD(weight_decay=...)` does (coupled L2; the seeds' recipes were written for it).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from kd_keras.config import Config
from kd_keras.data.pipeline import make_dataset, training_steps
from kd_keras.data.sources import Splits
from kd_keras.distill import distribute
from kd_keras.distill.callbacks import (
    FiniteGuard,
    HistoryCSV,
    SelectBest,
    StageCheckpoint,
    keras_verbose,
    tensorboard_callback,
)
from kd_keras.distill.distiller import Distiller
from kd_keras.distill.ensemble import build_ensemble, member_source
from kd_keras.distill.optim import class_weights, learning_rate_key, make_optimizer
from kd_keras.distill.precision import choose_jit_compile, choose_policy, float32_copy, policy_scope
from kd_keras.distill.teacher import prepare_teacher
from kd_keras.distill.teacher_cache import TeacherCache
from kd_keras.errors import KDError
from kd_keras.host import describe_host, host_line, peak_rss_mb, tf_matmul_peak
from kd_keras.io import atomic_write
from kd_keras.models.loading import PRESET_PREFIXES, load_model, saved_models_in
from kd_keras.models.registry import build_student, build_teacher
from kd_keras.models.taps import image_size_of, set_batchnorm_momentum
from kd_keras.run.files import STAGE_MODELS, member_path
from kd_keras.run.folder import RunFolder, sha256_of

logger = logging.getLogger(__name__)


def save_model(model: keras.Model, path: Path) -> Path:
    """Save a model as `.keras` atomically (no optimizer state: the deployable artefact)."""
    return atomic_write(path, lambda tmp: model.save(tmp))


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
        ensemble_features=cfg.teacher.ensemble_features, mixup=cfg.augment.mixup,
        mixup_seed=cfg.run.seed, name=f"{stage}_trainer",
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
    logger.info(f"XLA: {'on' if jit is True else 'off' if jit is False else jit} ({jit_reason})")
    tune = cfg.eval.threshold != "argmax"
    select = SelectBest(classifier, val_ds, splits.val.labels, splits.class_names, tc.monitor,
                        stage, tune_threshold=tune)  # fmt: skip
    weights = (
        class_weights(splits.train.labels, splits.num_classes)
        if tc.class_weight == "balanced" else None
    )  # fmt: skip
    recipe = ""  # what the stage trains with beyond the weights: the KD loss, MixUp
    if stage == "distill" and alpha < 1.0:
        recipe = f", {dc.mode} KD" + (f" at T {dc.temperature}" if dc.mode != "hard" else "")
    if cfg.augment.mixup > 0:
        recipe += f", MixUp {cfg.augment.mixup}"
    logger.info(f"\n== stage {stage}: {classifier.name}, {classifier.count_params():,} parameters, "
                f"{epochs} epochs, lr {learning_rate}, alpha {alpha}, beta {beta}"
                f"{recipe}")  # fmt: skip
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
            callbacks=callbacks + [checkpoint], initial_epoch=checkpoint.initial_epoch,
        )  # fmt: skip
    finally:
        distribute.unsync_batch_norm(synced)
        if cache is not None and cache.storage == "disk":
            shutil.rmtree(run.teacher_cache_dir, ignore_errors=True)
    best = [r for r in history.rows if r.get("epoch") == select.best_epoch + 1]
    balanced = best[0].get("val_balanced_accuracy") if best else None
    return StageResult(checkpoint.seconds, select.best_epoch + 1, select.best_score, epochs,
                       balanced, precision=policy, jit_compile=f"{jit} ({jit_reason})")  # fmt: skip


def check_not_chance(stage: str, result: StageResult, cfg: Config, splits: Splits,
                     learning_rate: float, force: bool) -> None:  # fmt: skip
    """A trained stage whose best model is no better than chance on validation (balanced
    accuracy <= 1/k + 0.05, the rule `kd_keras.distill.teacher.check_teacher` applies to a user's
    teacher) is a failed stage, not a result, unless `force`."""
    value = result.val_balanced_accuracy
    chance = 1.0 / splits.num_classes
    if value is None or value > chance + 0.05:
        return
    line = (f"stage {stage} ended no better than chance on validation (balanced accuracy "
            f"{value:.3f} at its best epoch {result.best_epoch}, chance {chance:.3f})")  # fmt: skip
    if force:
        logger.warning(f"warning: {line}; kept because of --force")
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
    return a.random_resized_crop or a.horizontal_flip or a.color_jitter > 0 or a.mixup > 0


def _teacher_cache(cfg: Config, model: Distiller, splits: Splits, size: int, run: RunFolder):
    """The frozen teacher's outputs on every training image, when `teacher.cache` asks for
    them (`auto`: whenever augmentation is off, so the cache is exact)."""
    mode = cfg.teacher.cache
    if mode == "off" or (mode == "auto" and _augments(cfg)):
        return None
    if mode == "auto":
        per_image = sum(int(np.prod(t.shape[1:])) for t in model.teacher_graph.outputs)
        mode = "memory" if per_image * 4 * len(splits.train) < 2e9 else "disk"
    if _augments(cfg):
        logger.info("teacher cache: the teacher sees each training image without augmentation "
                    "(the student sees it augmented)")  # fmt: skip
    start = time.perf_counter()
    cache = TeacherCache(model, splits.train, size, cfg.data.batch_size, mode,
                         run.teacher_cache_dir)  # fmt: skip
    logger.info(f"teacher cache ({mode}): {len(splits.train)} images, {cache.nbytes / 1e6:.1f} MB, "
                f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return cache


def check_stages(cfg: Config, run: RunFolder, stages: list[str], mode: str) -> None:
    """Refuse, before anything is written or removed, a request whose stages cannot run: a
    `teacher.path` / `teacher.ensemble` entry that does not exist, or a distillation stage with
    no teacher to learn from (none configured, none trained in this command, and none in the
    folder that would survive the request)."""
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


def run_stages(cfg, run: RunFolder, splits, stages, copy_teacher, force, current) -> None:
    n, size = splits.num_classes, cfg.data.image_size
    tc = cfg.train
    info = describe_host(tf_matmul_peak(seconds=0.5))
    logger.info(f"host: {host_line(info)}")
    policy, reason = choose_policy(tc.precision)
    logger.info(f"precision: {policy} ({reason}); saved models float32")

    def new_teacher(weights: str):
        return build_teacher(cfg.teacher.arch, n, size, weights,
                             tiny=cfg.teacher.variant == "tiny")  # fmt: skip

    def new_student(weights: str):
        return build_student(cfg.student.arch, n, size, weights, cfg.student.patch_size,
                             tiny=cfg.student.variant == "tiny")  # fmt: skip

    def train(
        stage: str,
        model,
        build,
        teacher,
        epochs,
        learning_rate,
        tap=None,
        *,
        path: Path | None = None,
        record=None,
        running: dict | None = None,
    ):
        """Fit `model` for `stage`, refuse it at chance, save its float32 copy to `path` (the
        stage's model file unless given), then `record(result, sha256)` in the run state
        (default: the stage is done) before its checkpoint goes, so a kill in between resumes
        from the checkpoint. `running`: extra run-state fields while it trains."""
        current["stage"] = stage
        run.set_stage(stage, "running", cfg, **(running or {}))
        result = fit_stage(cfg, splits, stage, model, teacher, epochs, learning_rate, run, tap)
        try:
            check_not_chance(stage, result, cfg, splits, learning_rate, force)
        except KDError:
            run.drop_checkpoint(stage)  # resuming it would only end at chance again
            raise
        path = path or run.model_path(STAGE_MODELS[stage])
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = sha256_of(save_model(float32_copy(model, lambda: build("none")), path))
        if record is None:
            run.record_stage(stage, {**result.__dict__, "host": info, "peak_rss_mb": peak_rss_mb()})
            run.set_stage(stage, "done", cfg, sha256=sha)
            current["stage"] = None
        else:
            record(result, sha)
        run.drop_checkpoint(stage)  # the next model of the stage starts from its own seed
        run.drop_snapshot()  # this model's results replace the old ones (resume keeps them)
        current["finished"] = True

    def train_members(epochs: int, learning_rate: float):
        """`teacher.members` teachers of `teacher.arch`, member k from seed run.seed + k, then
        their ensemble (mean probabilities) saved as the run's teacher. A resumed run keeps
        the members it finished (their sha256 recorded) and resumes the one it was training."""
        count, seed = cfg.teacher.members, cfg.run.seed
        kept = dict(run.state()["stages"].get("teacher", {}).get("members", {}))
        log = [
            e
            for e in run.train_log().get("teacher", {}).get("members", [])
            if str(e["member"]) in kept
        ]
        paths = [member_path(run.path, k) for k in range(count)]
        for k, path in enumerate(paths):
            if path.is_file() and kept.get(str(k)) == sha256_of(path):
                logger.info(
                    f"\n== teacher member {k + 1} of {count}: finished earlier, kept {path}"
                )
                continue
            logger.info(f"\n== teacher member {k + 1} of {count} (seed {seed + k})")
            keras.utils.set_random_seed(seed + k)
            with policy_scope(policy):
                member = new_teacher(cfg.teacher.weights)

            def record(result: StageResult, sha: str, k: int = k) -> None:
                kept[str(k)] = sha
                log.append({"member": k, "seed": seed + k, **result.__dict__})
                run.record_stage(
                    "teacher", {"members": log, "host": info, "peak_rss_mb": peak_rss_mb()}
                )
                run.set_stage("teacher", "running", cfg, members=kept)

            train("teacher", member, new_teacher, None, epochs, learning_rate, path=path,
                  record=record, running={"members": kept})  # fmt: skip
        ensemble = build_ensemble(
            [load_model(p, f"teacher member {k}") for k, p in enumerate(paths)]
        )
        saved = save_model(ensemble, run.model_path("teacher"))
        seconds = sum(e["seconds"] for e in log)
        run.record_stage("teacher", {"members": log, "seconds": seconds, "epochs": epochs,
                                     "host": info, "peak_rss_mb": peak_rss_mb()})  # fmt: skip
        run.set_stage("teacher", "done", cfg, sha256=sha256_of(saved), members=kept)
        logger.info(f"teacher: ensemble of {count} {cfg.teacher.arch} members saved as {saved}")
        current["stage"] = None
        return ensemble

    def saved_teacher():
        """The run's teacher, rebuilt in the training precision when it is ours."""
        loaded = run.load_model("teacher")
        if policy == "float32" or cfg.teacher.from_user or cfg.teacher.members > 1:
            return loaded
        with policy_scope(policy):
            teacher = new_teacher("none")
        teacher.set_weights(loaded.get_weights())
        return teacher

    teacher_file = run.model_path("teacher")
    t_epochs = cfg.teacher.epochs if cfg.teacher.epochs is not None else tc.epochs
    t_lr = cfg.teacher.learning_rate
    t_lr = t_lr if t_lr is not None else tc.learning_rate
    teacher = None
    teacher_tap = cfg.teacher.feature_layer
    if cfg.teacher.from_user:
        teacher, teacher_tap, described = prepare_teacher(cfg, splits, "distill" in stages, force)
        logger.info(f"teacher: {described}")
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
        logger.info(f"\n== stage teacher: finished earlier, kept ({teacher_file})")
        teacher = saved_teacher()
    elif "teacher" in stages and cfg.teacher.members > 1:
        teacher = train_members(t_epochs, t_lr)
    elif "teacher" in stages:
        keras.utils.set_random_seed(cfg.run.seed)
        with policy_scope(policy):
            teacher = new_teacher(cfg.teacher.weights)
        train("teacher", teacher, new_teacher, None, t_epochs, t_lr)

    for stage in ("distill", "scratch"):
        if stage not in stages:
            continue
        target = run.model_path(STAGE_MODELS[stage])
        if run.stage_done(stage, cfg) and target.is_file():
            logger.info(f"\n== stage {stage}: finished earlier, kept ({target})")
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
        s_epochs = cfg.student.epochs if cfg.student.epochs is not None else tc.epochs
        s_lr = cfg.student.learning_rate
        s_lr = s_lr if s_lr is not None else tc.learning_rate
        train(stage, student, new_student, teacher, s_epochs, s_lr, teacher_tap)
