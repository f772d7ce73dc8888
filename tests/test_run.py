"""The run folder: one owner of a run's layout, config, log and data."""

import dataclasses
import os
import time

import pytest
from conftest import make_run, tiny_classifier

from kd_keras.config import build_config
from kd_keras.errors import KDError
from kd_keras.run.files import MODEL_STAGES, resolve_data_source
from kd_keras.run.folder import RunFolder


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


def test_find_run(tmp_path):
    find = RunFolder.find
    with pytest.raises(KDError, match="no run found under .*cli.py distill"):
        find(None, runs_dir=tmp_path / "runs")
    with pytest.raises(KDError, match="run folder not found"):
        find(tmp_path / "nowhere")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(KDError, match="no config.toml"):
        find(tmp_path / "not_a_run")
    for i, name in enumerate(["older", "newer"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.toml").write_text("")
        stamp = time.time() - 100 + i * 50
        os.utime(tmp_path / "runs" / name / "config.toml", (stamp, stamp))
        os.utime(tmp_path / "runs" / name, (stamp, stamp))
    assert find(None, runs_dir=tmp_path / "runs").name == "newer"


def test_find_run_of_a_config(tmp_path):
    """`RunFolder.find(config=...)`: the config's run folder; `run` and `config` must agree."""
    runs = tmp_path / "runs"
    config = tmp_path / "exp.toml"
    config.write_text(f'[run]\noutput_dir = "{runs.as_posix()}"\nname = "mine"\n')
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "config.toml").write_text("")
    (runs / "other").mkdir()
    (runs / "other" / "config.toml").write_text("")
    assert RunFolder.find(config=config).path.resolve() == (runs / "mine").resolve()
    assert RunFolder.find(runs / "mine", config=config).name == "mine"
    with pytest.raises(KDError, match="is not the run folder of --config"):
        RunFolder.find(runs / "other", config=config)
