"""INT8 that computes the same on every x86 CPU, the host it was checked on, and peak memory."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_run, tiny_classifier
from onnx import numpy_helper

from kd_keras import host
from kd_keras.deploy.onnx import to_onnx
from kd_keras.deploy.quantize import (
    CALIBRATION_BATCH,
    NO_VNNI_SPEED_NOTE,
    calibration_batches,
    quantize,
)
from kd_keras.models.registry import build_student
from kd_keras.run.folder import RunFolder
from kd_keras.workflows.export import export_run

INT16_MAX = 2**15 - 1
U8_MAX = 255


def int8_weights(path: Path) -> np.ndarray:
    """Every int8 initializer (quantized weights) of an ONNX file, flattened."""
    graph = onnx.load(str(path)).graph
    arrays = [numpy_helper.to_array(t) for t in graph.initializer
              if t.data_type == onnx.TensorProto.INT8]  # fmt: skip
    return np.concatenate([a.ravel() for a in arrays]).astype(np.int32)


def test_saturation_bound_of_the_16_bit_pair_sum():
    """Without VNNI, x86 U8S8 kernels add two uint8 x int8 products in 16 bits (VPMADDUBSW,
    saturating): 8-bit weights can overflow it, 7-bit weights (reduce_range) cannot."""
    assert 2 * U8_MAX * 127 > INT16_MAX
    assert 2 * U8_MAX * 64 <= INT16_MAX


@pytest.mark.parametrize("arch", ["resnet18", "vit_small"])
def test_int8_weights_fit_7_bits_so_no_host_saturates(tmp_path, arch):
    """The default recipe (static QDQ for conv nets, dynamic for ViT) keeps every int8 weight
    in [-64, 64], so the file computes the same with or without VNNI; full range does not."""
    model = build_student(arch, 2, 32, patch_size=8, tiny=True)
    fp32 = to_onnx(model, tmp_path / "m.onnx")
    calib = [np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")]
    info = quantize(fp32, tmp_path / "m.int8.onnx", calibration=calib)
    assert info["method"] == ("static" if arch == "resnet18" else "dynamic")
    weights = int8_weights(tmp_path / "m.int8.onnx")
    assert weights.size > 1000 and np.abs(weights).max() <= 64
    assert info["reduce_range"] is True and info["faithful_without_vnni"] is True
    assert info["checked_on"]["isa_level"] == host.isa_level()
    assert "never saturates" in info["recipe"]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.int8.onnx")).metadata_props}
    assert meta["int8_recipe"] == info["recipe"]
    assert host.isa_level() in meta["int8_checked_on"]
    assert json.loads(meta["quantization"])["reduce_range"] is True

    full = quantize(fp32, tmp_path / "full.int8.onnx", calibration=calib, reduce_range=False)
    assert full["faithful_without_vnni"] is False and "saturate" in full["recipe"]
    assert np.abs(int8_weights(tmp_path / "full.int8.onnx")).max() > 64


@pytest.mark.parametrize("vnni", [False, True])
def test_export_says_when_int8_cannot_be_faster(tmp_path, real_npz, monkeypatch, vnni):
    monkeypatch.setattr(host, "has_vnni", lambda flags=None: vnni)
    run = make_run(tmp_path / "r", real_npz, {"student": tiny_classifier()},
                   calibration_samples=16)  # fmt: skip
    result = export_run(run, tmp_path / "export", models=["student"], int8=True, limit=32,
                        quiet=True)  # fmt: skip
    on_disk = json.loads((tmp_path / "export" / "r" / "export.json").read_text())
    card = (tmp_path / "export" / "r" / "MODEL_CARD.md").read_text()
    assert on_disk["host"]["isa_level"] == host.isa_level()
    assert on_disk["artefacts"]["student.int8"]["quantization"]["reduce_range"] is True
    assert "7-bit weights" in card and host.isa_level() in card
    if vnni:
        assert "int8_speed_note" not in on_disk and NO_VNNI_SPEED_NOTE not in card
    else:
        assert on_disk["int8_speed_note"] == NO_VNNI_SPEED_NOTE
        assert "INT8 is not expected to be faster than FP32 on this CPU (no VNNI)" in card
    assert result["peak_rss_mb"] > 0 and on_disk["peak_rss_mb"] == result["peak_rss_mb"]


def test_peak_rss_from_vmhwm_and_from_getrusage(monkeypatch):
    peak = host.peak_rss_mb()
    assert peak is not None and 10 < peak < 1e6
    real = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self).startswith("/proc/self"):
            raise OSError("no /proc")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    fallback = host.peak_rss_mb()
    assert fallback is not None and abs(fallback - peak) < 0.5 * peak


def test_calibration_batches_are_small_by_default(real_npz):
    from kd_keras.config import DataConfig
    from kd_keras.data.sources import load_splits

    train = load_splits(DataConfig(path=str(real_npz)), seed=0).train
    shapes = [b.shape[0] for b in calibration_batches(train, 32, 20, seed=0)]
    assert CALIBRATION_BATCH == 8 and shapes == [8, 8, 4]


def test_dynamic_int8_vit_agrees_with_keras_under_non_vnni_arithmetic(tmp_path, real_npz):
    """The fast ViT export test's model and images, run with the integer arithmetic of a CPU
    without VNNI (emulated, `u8s8_emulation`): the default recipe saturates no pair sum, so it
    agrees with Keras there as here (>= 0.9); 8-bit weights saturate and fall below it, as
    measured on a real AVX2-only host (0.83)."""
    import keras
    import u8s8_emulation as emu

    from kd_keras.runtimes import keras_predictor

    keras.utils.set_random_seed(0)
    student = build_student("vit_small", 2, 32, patch_size=8, tiny=True)
    run = make_run(tmp_path / "vit", real_npz, {"student": student}, student="vit_small")
    export_run(run, tmp_path / "export", models=["student"], int8=True, limit=64, quiet=True)
    folder = tmp_path / "export" / "vit"
    test_split = RunFolder.find(run).load_splits().test
    from kd_keras.data.pipeline import make_dataset

    images = next(make_dataset(test_split.subset(np.arange(64)), 32, 64, labels=False,
                               cache=False).as_numpy_iterator())  # fmt: skip
    reference = keras_predictor(student)(images).argmax(1)
    emu.MatMulInteger.saturated = 0
    default = emu.logits(folder / "student.int8.onnx", images, without_vnni=True)
    assert emu.MatMulInteger.pairs > 0 and emu.MatMulInteger.saturated == 0
    assert (default.argmax(1) == reference).mean() >= 0.9

    quantize(folder / "student.onnx", tmp_path / "full.int8.onnx", reduce_range=False)
    emu.MatMulInteger.saturated = 0
    full = emu.logits(tmp_path / "full.int8.onnx", images, without_vnni=True)
    assert emu.MatMulInteger.saturated > 0
    assert (full.argmax(1) == reference).mean() < 0.9, "the emulation shows the failure"
