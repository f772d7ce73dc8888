"""Deployment-resolution latency of fresh teacher and student models; no trained run needed.

Builds the architectures at --image-size (default 224), converts each to ONNX FP32 and INT8
(static QDQ for CNNs, dynamic for ViT/DeiT, as `kd_keras.export` does) and times Keras, ONNX and
INT8 at batch 1, plus throughput at --batch. Latency does not depend on weight values, so fresh
weights measure what a trained model costs. Static INT8 calibrates on --data (a MedMNIST .npz
such as pneumoniamnist.npz) when given, else on random pixels (fine for timing, not accuracy).
Writes export/latency_<N>px.json and .md (or --out).

    python benchmarks/latency.py --data ../shared/data/pneumoniamnist.npz
    python benchmarks/latency.py --student vit_small --image-size 224 --iters 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from kd_keras import benchmark as bench
from kd_keras.errors import KDError, write_json, write_text
from kd_keras.export import check_writable_dir, console


def calibration_images(data: str | None, size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of [0, 255] RGB images: real training images from an .npz, else random pixels."""
    if data is None:
        rng = np.random.default_rng(seed)
        images = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
        return [images[i : i + 32] for i in range(0, n, 32)]
    from kd_keras.data import load_npz, make_dataset, stratified_subset

    _, splits = load_npz(Path(data), None)
    train = splits["train"].subset(stratified_subset(splits["train"].labels, n, seed))
    return list(make_dataset(train, size, 32, labels=False, cache=False).as_numpy_iterator())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--teacher", default="resnet50", help="resnet50 | efficientnet_b3")
    parser.add_argument("--student", default="resnet18", help="resnet18 | vit_small | deit_small")
    parser.add_argument("--patch-size", type=int, default=16, help="ViT/DeiT patch size")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--data", help="MedMNIST .npz for calibration and timing images")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--formats", default="keras,onnx,int8", help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32, help="batch size for throughput")
    parser.add_argument("--threads", type=int, help="ONNX Runtime / TensorFlow intra-op threads")
    parser.add_argument("--out", help="result .json path (default export/latency_<N>px.json)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except KDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> dict:
    formats = bench.check_settings(
        args.warmup, args.iters, args.batch, args.threads, args.formats.split(",")
    )
    size = args.image_size
    keras_threads = bench.set_tensorflow_threads(args.threads)
    out = Path(args.out or f"export/latency_{size}px.json")
    check_writable_dir(out.parent)

    from kd_keras.models import build_student, build_teacher

    calibration = calibration_images(args.data, size, args.calibration_samples)
    images = np.resize(np.concatenate(calibration), (args.batch, size, size, 3))
    say = console(stderr=True).print
    rows = []
    with tempfile.TemporaryDirectory(prefix="kd_keras_latency_") as tmp:
        for name, arch in (("teacher", args.teacher), ("student", args.student)):
            say(f"building {name} ({arch}) at {size} px …")
            if name == "teacher":
                model = build_teacher(arch, args.num_classes, size)
            else:
                model = build_student(arch, args.num_classes, size, patch_size=args.patch_size)
            candidates = bench.fresh_candidates(
                name, arch, model, Path(tmp), formats, args.threads, calibration, say=say
            )
            rows += bench.benchmark_candidates(
                candidates, images, args.batch, args.warmup, args.iters, None, say
            )
            del model, candidates
    title = f"Latency at {size} px: {args.teacher} vs {args.student} (fresh weights)"
    result = bench.result_header(title, size, args.warmup, args.iters, args.batch, args.threads)
    calib_source = args.data or "random pixels"
    result.update(keras_threads=keras_threads, formats=list(formats), calibration=calib_source,
                  rows=rows, ratios=bench.ratios(rows))  # fmt: skip
    for row in rows:
        row["file"] = Path(row["file"]).name if row["file"] else None  # temp files are gone
    result["json"], result["md"] = str(out), str(out.with_suffix(".md"))
    write_text(result["md"], bench.benchmark_markdown(result))
    write_json(out, result)
    bench.print_benchmark(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
