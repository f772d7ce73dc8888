"""XLA (`jit_compile=True`) vs the default TensorFlow graph, per architecture: the median train
step of each model (plain supervised step, `Distiller(alpha=1)`) compiled both ways, on the same
real batches, in one run. The ratio decides `train.jit_compile = "auto"` per architecture
(`kd_keras.archs.JIT_FASTER`).

    python benchmarks/jit_compile.py --data ../shared/data/pneumoniamnist.npz

Prints the table and writes `benchmarks/results/jit_compile.json`.
"""

from __future__ import annotations

import os

import common
from training_speed import step_ms

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ARCHS = (("teacher", "resnet50"), ("teacher", "efficientnet_b3"), ("student", "resnet18"),
         ("student", "deit_small"))  # fmt: skip


def main() -> None:
    parser = common.parser(__doc__, "jit_compile")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    args = parser.parse_args()

    import keras
    import numpy as np

    from kd_keras.config import DataConfig
    from kd_keras.data.pipeline import make_dataset
    from kd_keras.data.sources import load_splits
    from kd_keras.distill.distiller import Distiller
    from kd_keras.models.registry import build_student, build_teacher

    train = load_splits(DataConfig(path=args.data), seed=0).train
    ds = make_dataset(train, args.size, args.batch, training=True, seed=0, cache=True)
    batches = [(np.asarray(x), np.asarray(y)) for x, y in ds.take(args.steps + 3)]

    rows = {}
    for role, arch in ARCHS:
        times = {}
        for jit in (False, True):
            keras.utils.set_random_seed(0)
            build = build_teacher if role == "teacher" else build_student
            model = Distiller(build(arch, 2, args.size), None, alpha=1.0, beta=0.0)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit)
            times["xla" if jit else "graph"] = step_ms(model, batches)
        rows[arch] = {
            "graph_ms": round(times["graph"], 2),
            "xla_ms": round(times["xla"], 2),
            "xla_speedup": round(times["graph"] / times["xla"], 3),
        }
        print(f"{arch:16s} graph {times['graph']:8.1f} ms  XLA {times['xla']:8.1f} ms  "
              f"speed-up {rows[arch]['xla_speedup']:.2f}x", flush=True)  # fmt: skip
    summary = {
        "setting": f"train step (alpha 1) at {args.size} px, batch {args.batch}, "
                   f"{args.steps} timed steps (median), real PneumoniaMNIST train batches",
        "rows": rows,
    }  # fmt: skip
    common.save(args.out, summary)


if __name__ == "__main__":
    main()
