"""Teacher ensembles: averaged tempered probabilities, one adapter per member or a chosen one,
members at their own sizes, saved and reloaded as one teacher, configured as a list."""

import json

import keras
import numpy as np
import pytest
from conftest import ROOT, SIZE, run_cli

from kd_keras.config import build_config
from kd_keras.distill import ensemble, losses
from kd_keras.distill.distiller import Distiller
from kd_keras.errors import KDError
from kd_keras.models.loading import load_model
from kd_keras.models.registry import build_student, build_teacher
from kd_keras.models.taps import feature_and_logits

X = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
Y = np.array([0, 1, 1, 0])


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.fixture(scope="module")
def members():
    """Two different raw-pixel teachers at different sizes: ResNet50 at 48 px, ResNet18 at 32."""
    keras.utils.set_random_seed(0)
    return [build_teacher("resnet50", 2, 48, tiny=True),
            build_student("resnet18", 2, SIZE, tiny=True)]  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_logits_average_the_tempered_probabilities(temperature):
    z = np.random.default_rng(1).normal(0, 3, (3, 5, 4)).astype("float32")  # 3 members
    out = np.asarray(ensemble.EnsembleLogits(temperature)([z[0], z[1], z[2]]))
    want = softmax(z / temperature).mean(axis=0)
    np.testing.assert_allclose(softmax(out / temperature), want, rtol=1e-5, atol=1e-7)


def test_built_ensemble_resizes_per_member_and_survives_save_load(members, tmp_path):
    model = ensemble.build_ensemble(members)
    assert model.inputs[0].shape[1:3] == (48, 48), "input at the largest member size"
    small = keras.ops.image.resize(X, (SIZE, SIZE), interpolation="bilinear", antialias=True)
    want = (softmax(np.asarray(members[0](X))) + softmax(np.asarray(members[1](small)))) / 2
    np.testing.assert_allclose(softmax(np.asarray(model(X))), want, rtol=1e-4, atol=1e-6)
    model.save(tmp_path / "ens.keras")
    loaded = load_model(tmp_path / "ens.keras", "teacher")
    assert len(ensemble.ensemble_members(loaded)) == 2
    assert ensemble.ensemble_members(members[0]) is None, "a plain model is no ensemble"
    np.testing.assert_allclose(np.asarray(loaded(X)), np.asarray(model(X)), atol=1e-5)


def test_distiller_kd_term_uses_the_mean_tempered_probabilities(members):
    model = ensemble.build_ensemble(members)
    student = build_student("resnet18", 2, SIZE, tiny=True)
    d = Distiller(student, model, alpha=0.5, temperature=4.0, beta=0.0)
    t_out, s_out = d.teacher_outputs(X), d.student_outputs(X, training=False)
    terms = d.compute_terms(Y, s_out, t_out)
    small = keras.ops.image.resize(X, (SIZE, SIZE), interpolation="bilinear", antialias=True)
    p = (softmax(np.asarray(members[0](X)) / 4) + softmax(np.asarray(members[1](small)) / 4)) / 2
    q = softmax(np.asarray(s_out["kd_logits"]) / 4)
    kl = 16 * np.sum(p * (np.log(p) - np.log(q)), axis=-1)  # T^2 KL(p || q)
    assert float(terms["kd"]) == pytest.approx(float(kl.mean()), rel=1e-4)


def test_every_member_feature_through_its_own_adapter_or_a_chosen_one(members):
    model = ensemble.build_ensemble(members)
    student = build_student("resnet18", 2, SIZE, tiny=True)
    d = Distiller(student, model, alpha=0.5, beta=1.0, ensemble_features="all")
    assert d.feature_keys == ["feature_0", "feature_1"] and len(d.adapters) == 2
    d.compile(optimizer=keras.optimizers.SGD(0.01))
    logs = d.train_on_batch(X, Y, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
    t_out, s_out = d.teacher_outputs(X), d.student_outputs(X, training=False)
    per_member = [
        np.asarray(losses.feature_l2(t_out[k], a(s_out["feature"]), "l2"))
        for k, a in zip(d.feature_keys, d.adapters)
    ]
    feat = float(d.compute_terms(Y, s_out, t_out)["feat"])
    assert feat == pytest.approx(float(np.mean(per_member)), rel=1e-5), "mean over members"

    one = Distiller(student, model, alpha=0.5, beta=1.0, ensemble_features=1)
    assert one.feature_keys == ["feature"] and len(one.adapters) == 1
    member_feature = feature_and_logits(members[1])[0]
    assert one.teacher_graph.output["feature"].shape[1:] == member_feature.shape[1:]
    with pytest.raises(KDError, match="ensemble_features = 2"):
        Distiller(student, model, alpha=0.5, beta=1.0, ensemble_features=2)


def test_ensemble_config_is_checked_and_paths_resolved(tmp_path):
    cfg = build_config({"teacher": {"ensemble": ["a.keras", "runs/b"]}}, tmp_path)
    assert cfg.teacher.ensemble == [str(tmp_path / "a.keras"), str(tmp_path / "runs/b")]
    preset = build_config({"teacher": {"path": "kaggle://keras/resnet_50/keras/x"}}, tmp_path)
    assert preset.teacher.path == "kaggle://keras/resnet_50/keras/x", "hub handles stay as written"
    bad = [
        ({"path": "a.keras", "ensemble": ["b.keras", "c.keras"]}, "both set"),
        ({"ensemble": ["b.keras"]}, "at least 2"),
        ({"ensemble": ["b.keras", "c.keras"], "ensemble_features": 2}, "member index from 0 to 1"),
        ({"ensemble": ["b.keras", "c.keras"], "ensemble_features": "each"}, '"all"'),
    ]
    for keys, message in bad:
        with pytest.raises(KDError, match=message):
            build_config({"teacher": keys}, tmp_path)


def test_run_folder_member_is_its_teacher(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[run]\nname = "run"\n')
    with pytest.raises(KDError, match="without a teacher model"):
        ensemble.member_source(str(run))
    (run / "teacher.keras").write_bytes(b"")
    assert ensemble.member_source(str(run)) == str(run / "teacher.keras")
    assert ensemble.member_source("x.keras") == "x.keras"


@pytest.mark.slow
def test_ensemble_end_to_end(members, real_npz, tmp_path):
    """Two teacher files at two sizes, one run folder's report: members checked, the ensemble
    saved as the run's teacher and evaluated, the student distilled from it."""
    paths = []
    for i, member in enumerate(members):
        paths.append(str(tmp_path / f"m{i}.keras"))
        member.save(paths[-1])
    sets = [
        f"teacher.ensemble={json.dumps(paths)}", f"data.path={real_npz}",
        f"run.output_dir={tmp_path}", "run.name=ens", "data.limit_train=200",
        "student.epochs=1", "student.variant=tiny", "train.verbose=0",
    ]  # fmt: skip
    code, out, err = run_cli(
        "distill",
        "--config",
        str(ROOT / "configs/xray.toml"),
        "--stages",
        "distill",
        "--force",
        *[a for s in sets for a in ("--set", s)],
    )
    assert code == 0, err[-3000:]
    assert out.count("teacher check on validation") == 3, "each member, then the ensemble"
    assert "ensemble of 2: [0]" in out
    report = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student"]
    assert report["models"]["teacher"]["arch"] == "ensemble of 2"
    assert report["models"]["teacher"]["image_size"] == 48
