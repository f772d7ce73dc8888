"""Training speed, as ratios measured in one run (default: configs/xray.toml's models and data).

- every train step against its compute bound: the teacher's own step, the student's own step
  and the distillation step, each with its FLOPs (forward + backward: 3x the traced forward
  graph's, plus the teacher's forward: `kd_keras.models.flops.TRAIN_FLOPS_METHOD`), the bound
  (FLOPs / this run's float32 peak, a TensorFlow MatMul on the same kernels and threads) and
  measured / bound;
- distillation step vs its lower bound: the teacher's forward pass plus the student's own train
  step (alpha = 1, no teacher) on the same batches; the Distiller's overhead is what is left;
- our Distiller vs Keras 3.15's `keras.distillation.Distiller` on the logits-only case (T = 4,
  student-loss weight 0.5; `keras.losses.KLDivergence()` passed explicitly: Keras's
  `LogitsDistillation.compute_loss` applies the softmax and T^2 only to a `KLDivergence`
  instance, not to the string default "kl_divergence");
- mixed_bfloat16 vs float32 distillation step;
- the input pipeline (decode, resize, augmentation, batching) vs the step it feeds.

Steps are timed with `train_on_batch` on batches already in memory (pipeline excluded), after
warm-up steps that trace the graphs; the pipeline is timed alone. Prints a table and writes
`benchmarks/results/training_speed.json`.

    python benchmarks/training_speed.py --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import os
import time

import common

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def step_ms(model, batches, warmup: int = 3) -> float:
    """Median milliseconds of `train_on_batch` over `batches` after `warmup` untimed steps."""
    import numpy as np

    for x, y in batches[:warmup]:
        model.train_on_batch(x, y)
    times = []
    for x, y in batches[warmup:]:
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def forward_ms(model, batches, warmup: int = 3) -> float:
    """Median milliseconds of a compiled inference forward pass."""
    import numpy as np
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    for x, _ in batches[:warmup]:
        fn(x)
    times = []
    for x, _ in batches[warmup:]:
        start = time.perf_counter()
        np.asarray(fn(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = common.parser(__doc__, "training_speed")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    args = parser.parse_args()

    import keras
    import numpy as np

    from kd_keras.config import AugmentConfig, DataConfig
    from kd_keras.data.pipeline import make_dataset
    from kd_keras.data.sources import load_splits
    from kd_keras.distill.distiller import Distiller
    from kd_keras.distill.precision import policy_scope
    from kd_keras.models.registry import build_student, build_teacher

    train = load_splits(DataConfig(path=args.data), seed=0).train
    ds = make_dataset(train, args.size, args.batch, training=True, augment=AugmentConfig(),
                      seed=0, cache=True)  # fmt: skip
    n = args.steps + 3
    batches = [(np.asarray(x), np.asarray(y)) for x, y in ds.take(n)]
    # input pipeline alone: a second pass (the first filled the cache, as in epoch 2+)
    start = time.perf_counter()
    for _ in ds.take(n):
        pass
    pipeline_ms = (time.perf_counter() - start) / n * 1000

    def models(policy: str):
        keras.utils.set_random_seed(0)
        with policy_scope(policy):
            teacher = build_teacher(args.teacher, 2, args.size)
            student = build_student(args.student, 2, args.size)
        return teacher, student

    def ours(teacher, student, **kw):
        d = Distiller(student, teacher, **kw)
        d.compile(optimizer=keras.optimizers.Adam(1e-3))
        return d

    from kd_keras.host import describe_host, host_line, tf_matmul_peak
    from kd_keras.models.flops import TRAIN_FLOPS_METHOD, forward_flops, train_step_flops

    peak = tf_matmul_peak()
    x, y = batches[0]
    results, flops = {}, {}
    teacher, student = models("float32")
    results["teacher_forward_ms"] = forward_ms(teacher, batches)
    flops["teacher_forward"] = forward_flops(teacher, x)
    trainer = ours(None, teacher, alpha=1.0, beta=0.0)
    results["teacher_step_ms"] = step_ms(trainer, batches)
    flops["teacher_step"] = train_step_flops(teacher, x)
    trainer = ours(None, student, alpha=1.0, beta=0.0)
    results["student_step_ms"] = step_ms(trainer, batches)
    flops["student_step"] = train_step_flops(student, x)
    teacher, student = models("float32")
    trainer = ours(teacher, student, alpha=0.5, beta=1.0)
    results["distill_step_ms"] = step_ms(trainer, batches)
    flops["distill_step"] = train_step_flops(student, x, teacher)
    teacher, student = models("float32")
    results["ours_logits_ms"] = step_ms(ours(teacher, student, alpha=0.5, beta=0.0), batches)

    from keras.distillation import Distiller as KerasDistiller
    from keras.distillation import LogitsDistillation

    teacher, student = models("float32")
    teacher.trainable = False
    ref = KerasDistiller(
        teacher=teacher, student=student, student_loss_weight=0.5,
        distillation_losses=LogitsDistillation(temperature=4.0, loss=keras.losses.KLDivergence()),
    )  # fmt: skip
    ref.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    results["keras_logits_ms"] = step_ms(ref, batches)
    teacher, student = models("mixed_bfloat16")
    results["distill_step_bf16_ms"] = step_ms(ours(teacher, student, alpha=0.5, beta=1.0),
                                              batches)  # fmt: skip
    results["pipeline_batch_ms"] = pipeline_ms

    r = {k: round(v, 2) for k, v in results.items()}
    lower = r["teacher_forward_ms"] + r["student_step_ms"]
    ratios = {
        "distill_step_vs_lower_bound": round(lower / r["distill_step_ms"], 3),
        "ours_vs_keras_distiller_throughput": round(r["keras_logits_ms"] / r["ours_logits_ms"], 3),
        "bf16_vs_fp32_step_speedup": round(r["distill_step_ms"] / r["distill_step_bf16_ms"], 3),
        "pipeline_vs_step": round(r["pipeline_batch_ms"] / r["distill_step_ms"], 3),
    }
    bound = {}
    for name, count in flops.items():
        ms = r[f"{name}_ms"]
        bound_ms = count / (peak["gflops"] * 1e9) * 1000
        bound[name] = {"gflop": round(count / 1e9, 2), "bound_ms": round(bound_ms, 2),
                       "measured_ms": ms, "x_bound": round(ms / bound_ms, 2)}  # fmt: skip
    summary = {
        "setting": f"{args.teacher} -> {args.student} at {args.size} px, batch {args.batch}, "
                   f"{args.steps} timed steps (median), real PneumoniaMNIST train batches",
        "ms": r, "ratios": ratios, "compute_bound": bound, "flops_method": TRAIN_FLOPS_METHOD,
    }  # fmt: skip
    print(host_line(describe_host(peak)))
    print(f"{'step':<16} {'GFLOP':>8} {'bound ms':>9} {'measured':>9} {'x bound':>8}")
    for name, row in bound.items():
        print(f"{name:<16} {row['gflop']:>8} {row['bound_ms']:>9} {row['measured_ms']:>9} "
              f"{row['x_bound']:>8}")  # fmt: skip
    common.save(args.out, summary, peak)


if __name__ == "__main__":
    main()
