"""`teacher.members`: several teachers of one architecture trained in the teacher stage and
taught as their ensemble; any convolutional architecture as the trained teacher."""

import json

import keras
import pytest
from conftest import ROOT, run_cli

from kd_keras.archs import TEACHER_ARCHS, TOKEN_ARCHS
from kd_keras.config import build_config
from kd_keras.distill.ensemble import ensemble_members
from kd_keras.errors import KDError
from kd_keras.models.loading import load_model
from kd_keras.models.registry import build_teacher
from kd_keras.run.files import member_path
from kd_keras.run.folder import RunFolder

XRAY = str(ROOT / "configs" / "xray.toml")


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


def test_any_convolutional_architecture_is_a_teacher_and_token_ones_are_not():
    assert {"resnet50", "efficientnet_b3", "resnet18", "resnet8x3", "mobilenet_v3_small"} <= set(
        TEACHER_ARCHS
    )
    assert not set(TOKEN_ARCHS) & set(TEACHER_ARCHS)
    assert build_config({"teacher": {"arch": "resnet8x3"}}, ROOT).teacher.arch == "resnet8x3"
    with pytest.raises(KDError, match="teacher.arch"):
        build_config({"teacher": {"arch": "vit_small"}}, ROOT)
    model = build_teacher("resnet8x3", 2, 32, tiny=True)
    assert model.output.shape == (None, 2)


def test_a_student_architecture_as_teacher_names_the_teacher_key_in_its_errors():
    with pytest.raises(KDError, match=r'set teacher.weights = "none"'):
        build_teacher("resnet8x3", 2, 32, weights="imagenet")
    with pytest.raises(KDError, match="teacher.weights"):
        build_teacher("resnet8x3", 2, 32, weights="imagenet", tiny=True)


def test_members_are_refused_with_a_given_teacher(tmp_path):
    with pytest.raises(KDError, match="teacher.members trains teachers .* teacher.path"):
        build_config({"teacher": {"members": 3, "path": str(tmp_path / "t.keras")}}, ROOT)
    with pytest.raises(KDError, match="teacher.members"):
        build_config({"teacher": {"members": 0}}, ROOT)


def member_run(tmp_path, tiny_npz, *extra):
    return run_cli(
        "distill", "--config", XRAY, "--force", "--stages", "teacher,distill",
        *sets(f"data.path={tiny_npz}", f"run.output_dir={tmp_path}", "run.name=m",
              "eval.imbalanced_subset=false", "teacher.arch=resnet8x3", "teacher.variant=tiny",
              "teacher.members=2", "teacher.epochs=1", "student.variant=tiny",
              "student.arch=resnet8x3", "student.epochs=1", "distill.beta=0"),
        *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_members_train_with_their_own_seeds_and_the_run_teaches_their_ensemble(tmp_path, tiny_npz):
    code, out, err = member_run(tmp_path, tiny_npz)
    assert code == 0, err
    run = RunFolder(tmp_path / "m")
    paths = [member_path(run.path, k) for k in range(2)]
    assert all(p.is_file() for p in paths)
    assert "teacher member 1 of 2 (seed 42)" in out and "teacher member 2 of 2 (seed 43)" in out
    members = [load_model(p) for p in paths]
    pairs = zip(members[0].get_weights(), members[1].get_weights())
    assert any((a != b).any() for a, b in pairs if a.size > 1)  # two seeds, two models
    teacher = run.load_model("teacher")
    assert len(ensemble_members(teacher)) == 2
    log = json.loads(run.train_log_path.read_text())["teacher"]
    assert [e["member"] for e in log["members"]] == [0, 1] and log["seconds"] > 0
    report = json.loads(run.report_path.read_text())
    assert report["models"]["teacher"]["members"] == 2
    # one name for a model everywhere: report.json, the run folder (exports, benchmarks, card)
    assert report["models"]["teacher"]["arch"] == run.arch("teacher") == "ensemble of 2 resnet8x3"
    assert report["models"]["student"]["arch"] == run.arch("student") == "resnet8x3"
    assert "ensemble of 2 members of 1 epochs" in out
    state = run.state()["stages"]["teacher"]
    assert state["status"] == "done" and set(state["members"]) == {"0", "1"}


@pytest.mark.slow  # a whole member run in a subprocess
def test_a_killed_member_run_resumes_keeping_the_finished_members(tmp_path, tiny_npz, monkeypatch):
    fit, calls = keras.Model.fit, []

    def second_fit_interrupted(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", second_fit_interrupted)
    code, _, err = member_run(tmp_path, tiny_npz)
    assert code == 130 and "interrupted in stage teacher" in err, err
    first = member_path(tmp_path / "m", 0)
    assert first.is_file() and not member_path(tmp_path / "m", 1).exists()
    kept = first.read_bytes()
    calls.clear()
    monkeypatch.setattr(keras.Model, "fit", fit)
    code, out, err = member_run(tmp_path, tiny_npz, "--resume")
    assert code == 0, err
    assert "teacher member 1 of 2: finished earlier, kept" in out
    assert "teacher member 2 of 2 (seed 43)" in out
    assert first.read_bytes() == kept
    assert len(ensemble_members(RunFolder(tmp_path / "m").load_model("teacher"))) == 2


@pytest.mark.slow  # a whole member run in a subprocess
def test_a_tampered_member_is_trained_again_not_loaded(tmp_path, tiny_npz):
    code, _, err = member_run(tmp_path, tiny_npz)
    assert code == 0, err
    run = RunFolder(tmp_path / "m")
    state = json.loads(run.state_path.read_text())
    state["stages"]["teacher"]["status"] = "running"  # as if killed before the ensemble
    run.state_path.write_text(json.dumps(state))
    run.model_path("teacher").unlink()
    member_path(run.path, 1).write_bytes(b"not the member we saved")
    code, out, err = member_run(tmp_path, tiny_npz, "--resume")
    assert code == 0, err
    assert "teacher member 1 of 2: finished earlier, kept" in out
    assert "teacher member 2 of 2 (seed 43)" in out  # its sha256 no longer matched
