"""Are a trained model's batch-norm moving statistics behind its weights? Evaluates the model on
the validation split as saved, then again after re-estimating every BatchNormalization layer's
moving mean and variance over one pass of the (un-augmented) training images (cumulative
average, dropout off), nothing else changed. A large gain means the statistics lagged the
weights (Keras's default momentum 0.99 over a short schedule): train with
`train.batchnorm_momentum = 0.9`.

    python benchmarks/bn_statistics.py --model runs/xray/teacher.keras

Prints validation AUC, balanced accuracy at the default 0.5 rule and at the best threshold,
before and after; writes `benchmarks/results/bn_statistics.json`.
"""

from __future__ import annotations

import os

import common

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def scores(model, val_ds, labels) -> dict:
    """Validation AUC and balanced accuracy at 0.5 and at the best threshold (binary)."""
    import numpy as np

    from kd_keras.evaluation.metrics import choose_threshold, classification_metrics
    from kd_keras.runtimes import keras_predictor, predict_probs

    probs = predict_probs(keras_predictor(model), val_ds, "the model")
    names = [str(c) for c in range(probs.shape[1])]
    at_half = classification_metrics(labels, probs, names, 0.5)
    threshold = choose_threshold(labels, probs)
    best = classification_metrics(labels, probs, names, threshold)
    return {
        "auc": round(float(at_half["roc_auc"]), 4),
        "balanced_accuracy_at_0.5": round(float(at_half["balanced_accuracy"]), 4),
        "balanced_accuracy_best_threshold": round(float(best["balanced_accuracy"]), 4),
        "threshold": round(float(np.asarray(threshold)), 4),
    }


def main() -> None:
    parser = common.parser(__doc__, "bn_statistics")
    parser.add_argument("--model", required=True, help="a binary classifier .keras file")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    import keras

    from kd_keras.config import DataConfig
    from kd_keras.data.pipeline import make_dataset
    from kd_keras.data.sources import load_splits
    from kd_keras.models.loading import load_model
    from kd_keras.models.taps import all_layers

    model = load_model(args.model, "model", safe_mode=False)
    splits = load_splits(DataConfig(path=args.data), seed=42)
    val = make_dataset(splits.val, args.size, args.batch, labels=False, cache=True)
    before = scores(model, val, splits.val.labels)
    print("as saved:       ", before, flush=True)
    layers = all_layers(model)
    norms = [lay for lay in layers if isinstance(lay, keras.layers.BatchNormalization)]
    for layer in layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    train = make_dataset(splits.train, args.size, args.batch, labels=False, cache=False)
    for k, images in enumerate(train, 1):
        for layer in norms:
            layer.momentum = 1.0 - 1.0 / k  # cumulative average over the pass
        model(images, training=True)
    after = scores(model, val, splits.val.labels)
    print("re-estimated:   ", after, flush=True)
    common.save(args.out, {"model": args.model, "batchnorm_layers": len(norms),
                           "as_saved": before, "re_estimated": after})  # fmt: skip


if __name__ == "__main__":
    main()
