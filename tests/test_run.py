"""The run folder: one owner of a run's layout, config, log and data."""

import dataclasses

import numpy as np
import pytest
from conftest import make_run, tiny_classifier

from kd_keras.config import build_config
from kd_keras.errors import KDError
from kd_keras.runs.files import MODEL_STAGES, resolve_data_source
from kd_keras.runs.folder import RunFolder
from kd_keras.runtimes import keras_predictor, load_predictor, predict_probs


def test_layout_is_defined_once(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert [run.model_path(m).name for m in MODEL_STAGES] == [
        "teacher.keras", "student.keras", "student_scratch.keras",
    ]  # fmt: skip
    assert run.history_path("distill").name == "history_distill.csv"
    assert run.confusion_path("student", ".png").name == "confusion_student.png"
    assert (run.config_path.name, run.report_path.name) == ("config.toml", "report.json")
    with pytest.raises(KDError, match="unknown model 'ensemble'; valid: teacher"):
        run.model_path("ensemble")


def test_create_records_the_data_file_without_mutating_the_config(tmp_path, real_npz,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setenv("KD_KERAS_DATA_DIR", str(real_npz.parent))
    cfg = build_config({"run": {"name": "r", "output_dir": str(tmp_path)}}, tmp_path)
    before = dataclasses.asdict(cfg)
    run = RunFolder.create(cfg)
    assert dataclasses.asdict(cfg) == before, "the caller's config is left alone"
    assert run.cfg.data.path == str(real_npz.resolve())
    monkeypatch.delenv("KD_KERAS_DATA_DIR")
    assert len(RunFolder(run.path).load_splits().test) == 624, "no environment needed"
    assert resolve_data_source(run.cfg) is run.cfg, "a recorded path is kept"


def test_models_thresholds_log_and_teacher_path(tmp_path, tiny_npz):
    teacher = tiny_classifier("outside")
    teacher.save(tmp_path / "outside.keras")
    folder = make_run(tmp_path / "r", tiny_npz, {"student": tiny_classifier()})
    config = (folder / "config.toml").read_text()  # a teacher given by path, not copied
    (folder / "config.toml").write_text(
        config.replace("[teacher]\n", f'[teacher]\npath = "{tmp_path / "outside.keras"}"\n')
    )
    run = RunFolder(folder)
    assert list(run.models()) == ["teacher", "student"] and run.threshold("student") == 0.4
    assert run.model_file("teacher") == tmp_path / "outside.keras"
    assert run.model_file("student_scratch") is None and run.threshold("teacher") is None
    run.record_stage("distill", {"seconds": 1.5})
    run.record_stage("scratch", {"seconds": 2.5})
    assert run.train_log() == {"distill": {"seconds": 1.5}, "scratch": {"seconds": 2.5}}
    assert run.finished and run.name == "r"
    assert run.export_dir("out").as_posix() == "out/r"
    # the config's teacher.arch (efficientnet_b3 here) says nothing about a teacher given by path
    assert (run.arch("teacher"), run.arch("student")) == ("own teacher outside.keras", "resnet18")
    from kd_keras.reporting.model_card import model_card_markdown

    card = model_card_markdown(run)
    assert "# r: resnet18 distilled from own teacher outside.keras" in card
    assert "distilled from the user's teacher (own teacher outside.keras)" in card
    assert "efficientnet_b3" not in card


def test_non_finite_outputs_are_an_error_naming_the_model():
    images = [np.zeros((2, 32, 32, 3), "float32")]
    with pytest.raises(KDError, match="student.keras outputs non-finite logits for 1 of 2"):
        predict_probs(lambda x: np.array([[0.0, 1.0], [np.nan, 0.0]]), images, "student.keras")
    probs = predict_probs(keras_predictor(tiny_classifier()), images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_load_predictor_by_suffix(tmp_path):
    model = tiny_classifier()
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(load_predictor(tmp_path / "m.keras")(x), model(x), atol=1e-6)
    with pytest.raises(KDError, match="expected a .keras, .onnx"):
        load_predictor(tmp_path / "m.h5")
