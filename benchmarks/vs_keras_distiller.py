"""Our default distilled student vs Keras 3.15's own `keras.distillation.Distiller`, same
teacher, student, data pipeline, optimizer, schedule and epochs, over seeds; both evaluated
with kd_keras's rule (best epoch and decision threshold chosen on validation, test reported).

Keras's Distiller is run as its documentation shows it: logits only (`LogitsDistillation`,
T = 4, passed `keras.losses.KLDivergence()` explicitly — `LogitsDistillation.compute_loss`
applies the softmax and T^2 only to a `KLDivergence` instance, not to the string default
"kl_divergence"), student-loss weight 0.5, no class weights (it cannot take
them). Ours is `configs/xray.toml`'s distillation stage; its results are read from a sweep's
`cells/<cell>/seed<N>/report.json` when given (`--ours`), else trained here.

    python cli.py sweep --config configs/xray.toml --grid distill.beta=0,1 --seeds 3 \\
        --set teacher.path=runs/xray/teacher.keras
    python benchmarks/vs_keras_distiller.py --teacher runs/xray/teacher.keras \\
        --ours runs/xray_sweep/cells/beta=1
"""

from __future__ import annotations

import os
from pathlib import Path

import common

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def keras_distiller_run(cfg, splits, teacher_path: str, seed: int) -> dict:
    """Train Keras's Distiller once; test metrics at the validation-chosen threshold."""
    import keras
    import numpy as np

    from kd_keras.data.pipeline import make_dataset
    from kd_keras.distill.callbacks import SelectBest
    from kd_keras.distill.optim import make_optimizer
    from kd_keras.evaluation.metrics import choose_threshold, classification_metrics
    from kd_keras.models.loading import load_model
    from kd_keras.models.registry import build_student
    from kd_keras.models.taps import set_batchnorm_momentum
    from kd_keras.runtimes import keras_predictor, predict_probs

    keras.utils.set_random_seed(seed)
    size, batch, epochs = cfg.data.image_size, cfg.data.batch_size, cfg.student.epochs
    teacher = load_model(teacher_path, "teacher")
    teacher.trainable = False
    student = build_student(cfg.student.arch, splits.num_classes, size)
    if cfg.train.batchnorm_momentum > 0:  # the same student as ours trains
        set_batchnorm_momentum(student, cfg.train.batchnorm_momentum)
    train = make_dataset(splits.train, size, batch, training=True, augment=cfg.augment, seed=seed,
                         epochs=epochs)  # fmt: skip
    val = make_dataset(splits.val, size, batch, labels=False)
    test = make_dataset(splits.test, size, batch, labels=False)
    steps = int(np.ceil(len(splits.train) / batch))
    kd = keras.distillation.Distiller(
        teacher=teacher, student=student, student_loss_weight=0.5,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=4.0, loss=keras.losses.KLDivergence()),
    )  # fmt: skip
    lr = cfg.student.learning_rate or cfg.train.learning_rate
    kd.compile(optimizer=make_optimizer(cfg.train, lr, epochs, steps),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    select = SelectBest(student, val, splits.val.labels, splits.class_names,
                        cfg.train.monitor, "keras_distiller", tune_threshold=True)  # fmt: skip
    kd.fit(train, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[select])
    fn = keras_predictor(student)
    threshold = choose_threshold(splits.val.labels, predict_probs(fn, val))
    return classification_metrics(splits.test.labels, predict_probs(fn, test),
                                  splits.class_names, threshold)  # fmt: skip


def main() -> None:
    parser = common.parser(__doc__, "vs_keras_distiller")
    parser.add_argument("--config", default="configs/xray.toml")
    parser.add_argument("--teacher", default="runs/xray/teacher.keras")
    parser.add_argument("--ours", help="a sweep's cells/<cell> folder holding seed<N>/report.json")
    parser.add_argument("--seeds", default="42,43,44")
    args = parser.parse_args()

    import numpy as np

    from kd_keras.config import load_config
    from kd_keras.data.sources import load_splits
    from kd_keras.io import read_json

    cfg = load_config(args.config, [f"data.path={args.data}"])
    splits = load_splits(cfg.data, seed=cfg.run.seed)
    rows = {"kd_keras": [], "keras.distillation": []}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        rows["keras.distillation"].append(keras_distiller_run(cfg, splits, args.teacher, seed))
        print(f"seed {seed}: keras.distillation "
              f"{ {m: round(rows['keras.distillation'][-1][m], 3) for m in METRICS} }")  # fmt: skip
    for seed in seeds if args.ours else []:  # read last: the sweep may run beside this
        report = read_json(Path(args.ours) / f"seed{seed}" / "report.json")
        rows["kd_keras"].append(report["models"]["student"]["test"])
    summary = {"seeds": args.seeds, "teacher": args.teacher, "results": {}}
    for name, results in rows.items():
        if results:
            summary["results"][name] = {
                m: [round(float(np.mean([r[m] for r in results])), 4),
                    round(float(np.std([r[m] for r in results], ddof=1)), 4)]
                for m in METRICS
            }  # fmt: skip
    common.save(args.out, summary)


if __name__ == "__main__":
    main()
