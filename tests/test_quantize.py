"""INT8 quantization of ONNX models (`kd_keras.deploy.quantize`): calibration and the recipe per
graph family."""

import numpy as np
import onnx
import pytest

from kd_keras.deploy.quantize import calibration_batches
from kd_keras.errors import KDError
from kd_keras.models.registry import build_student, build_teacher


def test_calibration_uses_the_configured_count_and_batch(real_npz):
    from kd_keras.config import DataConfig
    from kd_keras.data.sources import load_splits

    train = load_splits(DataConfig(path=str(real_npz)), seed=0).train
    batches = calibration_batches(train, 32, 50, seed=0, batch_size=16)
    shapes = [b.shape for b in batches]
    assert shapes == [(16, 32, 32, 3)] * 3 + [(2, 32, 32, 3)]
    assert [b.shape for b in batches] == shapes, "iterable more than once"
    labels = batches.subset.labels
    assert len(labels) == 50 and 0 < labels.mean() < 1, "stratified: both classes"
    with pytest.raises(KDError, match="n >= 1"):
        calibration_batches(train, 32, 0, seed=0)


def test_int8_recipe_per_graph_family(tmp_path):
    """U8S8 static QDQ for convolution graphs with the classifier head kept float; dynamic for
    attention graphs; no INT8 file for Sigmoid-gated graphs (EfficientNet), where it is slower."""
    from kd_keras.deploy.onnx import to_onnx
    from kd_keras.deploy.quantize import quantization_plan, quantize

    plans = {}
    for arch in ("resnet18", "vit_small", "efficientnet_b3"):
        if arch == "efficientnet_b3":
            model = build_teacher(arch, 2, 32, tiny=True)
        else:
            model = build_student(arch, 2, 32, patch_size=8, tiny=True)
        path = to_onnx(model, tmp_path / f"{arch}.onnx")
        plans[arch] = quantization_plan(path)
    assert [plans[a]["method"] for a in plans] == ["static", "dynamic", "none"]
    assert "slower than FP32" in plans["efficientnet_b3"]["reason"]
    graph = onnx.load(tmp_path / "resnet18.onnx").graph
    head = {n.name: n.op_type for n in graph.node if n.name in plans["resnet18"]["exclude"]}
    assert "MatMul" in head.values() and "Softmax" in head.values(), head
    assert any("preprocessing" in name for name in head), "the input scaling stays float"
    calib = [np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")]
    info = quantize(tmp_path / "resnet18.onnx", tmp_path / "r.int8.onnx", calibration=calib)
    assert (info["method"], info["activations"], info["weights"]) == ("static", "uint8", "int8")
    ops = {n.op_type for n in onnx.load(tmp_path / "r.int8.onnx").graph.node}
    assert "QuantizeLinear" in ops and "MatMul" in ops, "head stays float"
