"""Distillation epoch time with and without the teacher-output cache, measured in one run.

A ResNet50 teacher at 64 px teaching a ResNet18 student at 32 px (the Distiller resizes each
batch for the student) on the real PneumoniaMNIST train split, augmentation off (the cache's
automatic case), batch 64. Each variant: one untimed warm-up epoch (graph tracing), then one
timed epoch; the cache's one-off fill time is reported separately. Prints a table and writes
`benchmarks/results/teacher_cache.json`.

    python benchmarks/teacher_cache.py --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import os
import time

import common

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def epoch_seconds(distiller, dataset, steps: int) -> float:
    """Wall-clock seconds of one `fit` epoch of `steps` batches (after a warm-up epoch that
    traces the graph)."""
    distiller.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    start = time.perf_counter()
    distiller.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    parser = common.parser(__doc__, "teacher_cache")
    parser.add_argument("--teacher-size", type=int, default=64)
    parser.add_argument("--student-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0, help="train images (0: all)")
    args = parser.parse_args()

    import keras

    from kd_keras.config import DataConfig
    from kd_keras.data.pipeline import make_dataset, training_steps
    from kd_keras.data.sources import load_splits, stratified_subset
    from kd_keras.distill.distiller import Distiller
    from kd_keras.distill.teacher_cache import TeacherCache
    from kd_keras.models.registry import build_student, build_teacher

    train = load_splits(DataConfig(path=args.data), seed=0).train
    if args.limit:
        train = train.subset(stratified_subset(train.labels, args.limit, 0))
    keras.utils.set_random_seed(0)
    teacher = build_teacher("resnet50", 2, args.teacher_size)
    results = {}
    for variant in ("uncached", "cached"):
        keras.utils.set_random_seed(0)
        student = build_student("resnet18", 2, args.student_size)
        d = Distiller(student, teacher, alpha=0.5, temperature=4.0, beta=1.0)
        d.compile(optimizer=keras.optimizers.Adam(1e-3))
        fill = 0.0
        cache = None
        if variant == "cached":
            start = time.perf_counter()
            cache = TeacherCache(d, train, args.teacher_size, args.batch, "memory")
            fill = time.perf_counter() - start
        ds = make_dataset(train, args.teacher_size, args.batch, training=True, seed=0,
                          teacher_cache=cache)  # fmt: skip
        seconds = epoch_seconds(d, ds, training_steps(len(train), args.batch))
        results[variant] = {"epoch_s": round(seconds, 2), "fill_s": round(fill, 2)}
        print(variant, results[variant], flush=True)
    ratio = results["cached"]["epoch_s"] / results["uncached"]["epoch_s"]
    summary = {
        "teacher": f"resnet50 @ {args.teacher_size} px",
        "student": f"resnet18 @ {args.student_size} px",
        "train_images": len(train), "batch": args.batch, "results": results,
        "cached_over_uncached_epoch": round(ratio, 3),
    }  # fmt: skip
    common.save(args.out, summary)
    print(f"cached epoch / uncached epoch: {ratio:.2f}x (target <= 0.6x)")


if __name__ == "__main__":
    main()
