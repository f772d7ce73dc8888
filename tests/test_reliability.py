"""Reliability: a killed run resumes, a re-run never destroys the last one, NaN stops the run,
bad data is caught before training, and every user mistake is one line (issue table rows)."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import ROOT, make_run, run_cli, tiny_classifier, write_images

from kd_keras.config import DataConfig, build_config
from kd_keras.data.checks import check_splits
from kd_keras.data.sources import load_npz, load_splits
from kd_keras.distill.callbacks import FiniteGuard, HistoryCSV, SelectBest, StageCheckpoint
from kd_keras.distill.distiller import Distiller
from kd_keras.errors import KDError
from kd_keras.models.loading import load_model
from kd_keras.run.files import stage_hash
from kd_keras.run.folder import RunFolder

XRAY = str(ROOT / "configs" / "xray.toml")


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def tiny_run_sets(npz, out, name, *extra):
    return sets(f"data.path={npz}", f"run.output_dir={out}", f"run.name={name}",
                "data.limit_train=400", "teacher.variant=tiny", "student.variant=tiny",
                "teacher.epochs=1", "student.epochs=3", "train.verbose=2", *extra)  # fmt: skip


def stray_files(folder):
    """Temporary (atomic-write) files, caches and checkpoints a finished run must not keep."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.name in
            ("checkpoints", "teacher_cache")]  # fmt: skip


# ---------------------------------------------------------------- resume after SIGKILL


@pytest.mark.slow
def test_sigkill_in_distillation_then_resume(real_npz, tmp_path):
    """Kill the training process in the distillation stage's second epoch, resume, and get the
    run an uninterrupted one gives. Tolerance 0.03 balanced accuracy / AUC: the resumed run
    restores weights, optimizer and schedule state, best-so-far and the data streams exactly,
    but float reductions on a multi-threaded CPU are not bit-reproducible, so two runs of the
    same seed (interrupted or not) differ slightly."""
    stages = ["--stages", "teacher,distill"]
    code, _, err = run_cli("distill", "--config", XRAY, *stages,
                           *tiny_run_sets(real_npz, tmp_path, "reference"))  # fmt: skip
    assert code == 0, err[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "distill", "--config", XRAY, *stages,
         *tiny_run_sets(real_npz, tmp_path, "killed")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        latest = run / "checkpoints" / "distill" / "latest.json"
        while not latest.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert latest.is_file(), "the distillation stage never finished an epoch"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = json.loads((run / "run_state.json").read_text())["stages"]
    assert state["teacher"]["status"] == "done" and state["distill"]["status"] == "running"
    teacher_stamp = (run / "teacher.keras").stat().st_mtime_ns
    assert not (run / "report.json").exists() and not (run / "student.keras").exists()

    code, out, err = run_cli("distill", "--config", XRAY, *stages, "--resume",
                             *tiny_run_sets(real_npz, tmp_path, "killed"))  # fmt: skip
    assert code == 0, err[-2000:]
    assert "stage teacher: finished earlier, kept" in out
    assert "resuming after epoch" in out
    assert (run / "teacher.keras").stat().st_mtime_ns == teacher_stamp, "teacher not retrained"
    resumed = json.loads((run / "report.json").read_text())["models"]["student"]["test"]
    reference = json.loads((tmp_path / "reference" / "report.json").read_text())
    reference = reference["models"]["student"]["test"]
    for key in ("balanced_accuracy", "roc_auc"):
        assert resumed[key] == pytest.approx(reference[key], abs=0.03), key
    assert stray_files(run) == []
    assert len((run / "history_distill.csv").read_text().strip().splitlines()) == 1 + 3


def test_checkpoint_restores_student_adapter_and_optimizer_not_the_teacher(tmp_path):
    """What an epoch's checkpoint holds comes back exactly in a fresh trainer (weights, batch-
    norm statistics, adapter, Adam slots and step); the frozen teacher is not written."""
    from conftest import build

    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.array([0, 1] * 4)
    teacher = build("resnet50")

    def trainer():
        d = Distiller(build("resnet18"), teacher, alpha=0.5, beta=1.0)
        d.compile(optimizer=keras.optimizers.Adam(1e-3))
        return d

    def callbacks(d):
        select = SelectBest(d.student, None, y, ["a", "b"], "val_balanced_accuracy", "distill")
        return select, StageCheckpoint(tmp_path / "ck", select, HistoryCSV(tmp_path / "h.csv"))

    first = trainer()
    first.fit(x, y, batch_size=4, epochs=1, verbose=0)
    select, checkpoint = callbacks(first)
    checkpoint.set_model(first)
    select.best_weights = first.student.get_weights()
    checkpoint.on_epoch_end(0)
    checkpoint.on_train_end()
    saved = dict(np.load(tmp_path / "ck" / "epoch_1" / "trainer.npz"))
    n_teacher = len(teacher.weights)
    assert len(saved) == len(checkpoint._state_variables()) and n_teacher > 0

    second = trainer()
    _, restored = callbacks(second)
    restored.set_model(second)
    restored.on_train_begin()
    for a, b in zip(checkpoint._state_variables(), restored._state_variables()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert int(second.optimizer.iterations) == 2 and restored.initial_epoch == 1


# ---------------------------------------------------------------- run folders


def finished_run(tmp_path, npz):
    """A finished run as the current code leaves it: models, report, and its state."""
    folder = make_run(tmp_path / "runs" / "r", npz, {"teacher": tiny_classifier(),
                                                     "student": tiny_classifier()})  # fmt: skip
    run = RunFolder(folder)
    for stage in ("teacher", "distill"):
        run.set_stage(stage, "done", run.cfg)
    os.utime(run.report_path)  # the report is newer than the models
    return run


def cfg_of(run, *overrides):
    from kd_keras.config import load_config

    return load_config(run.config_path, [f"run.output_dir={run.path.parent}", *overrides])


def test_a_finished_run_is_never_silently_replaced(tmp_path, tiny_npz):
    run = finished_run(tmp_path, tiny_npz)
    with pytest.raises(KDError, match="already holds results.*--resume.*--overwrite"):
        RunFolder.create(cfg_of(run))
    with pytest.raises(KDError, match=r"cannot resume .*data.image_size \(32 -> 48\)"):
        RunFolder.create(cfg_of(run, "data.image_size=48"), "resume")
    RunFolder.create(cfg_of(run), "resume")  # same config: fine
    assert run.model_path("student").is_file()
    # overwrite the teacher stage at another size: the students no longer belong, go too
    RunFolder.create(cfg_of(run, "data.image_size=48"), "overwrite", ["teacher"])
    assert not run.model_path("teacher").exists() and not run.model_path("student").exists()
    assert not run.report_path.exists()


def test_overwrite_keeps_stages_that_still_belong(tmp_path, tiny_npz):
    run = finished_run(tmp_path, tiny_npz)
    RunFolder.create(cfg_of(run, "distill.alpha=0.3"), "overwrite", ["distill"])
    assert run.model_path("teacher").is_file(), "the teacher does not depend on distill.*"
    assert not run.model_path("student").exists()
    assert stage_hash(cfg_of(run), "teacher") == stage_hash(cfg_of(run, "distill.alpha=0.3"),
                                                            "teacher")  # fmt: skip


def test_parts_that_do_not_belong_together_are_refused(tmp_path, tiny_npz):
    run = finished_run(tmp_path, tiny_npz)
    run.check_consistent()
    run.set_stage("distill", "running", run.cfg)  # a killed re-run
    with pytest.raises(KDError, match="student.keras does not belong.*--resume"):
        run.check_consistent()
    run.set_stage("distill", "done", run.cfg)
    os.utime(run.model_path("student"), (time.time() + 5, time.time() + 5))
    with pytest.raises(KDError, match="older than student.keras.*cli.py evaluate"):
        run.check_consistent()
    run.check_consistent(report=False)  # evaluate itself rewrites the report


def test_resume_of_nothing_is_an_error(tmp_path):
    cfg = build_config({"run": {"name": "none", "output_dir": str(tmp_path)},
                        "data": {"path": str(tmp_path / "x.npz")}}, tmp_path)  # fmt: skip
    with pytest.raises(KDError, match="nothing to resume"):
        RunFolder.create(cfg, "resume")


# ---------------------------------------------------------------- faults during training


def test_non_finite_loss_stops_naming_stage_epoch_and_term():
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    student = tiny_classifier()
    kernel = student.get_layer("logits").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))  # as a diverged step leaves it
    d = Distiller(student, None, alpha=1.0)
    d.compile(optimizer="sgd")
    message = "diverged in stage distill, epoch 1, batch 1: ce, loss not finite"
    with pytest.raises(KDError, match=message):
        d.fit(x, np.zeros(8, "int32"), batch_size=8, epochs=2, verbose=0,
              callbacks=[FiniteGuard("distill")])  # fmt: skip


def test_ctrl_c_says_where_and_how_to_resume(tmp_path, tiny_npz, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "fit", interrupted)
    code, _, err = run_cli("distill", "--config", XRAY,
                           *sets(f"data.path={tiny_npz}", f"run.output_dir={tmp_path}",
                                 "run.name=c", "eval.imbalanced_subset=false",
                                 "teacher.variant=tiny", "student.variant=tiny"))  # fmt: skip
    assert code == 130, err
    assert "interrupted in stage teacher" in err and "--resume" in err and "error:" not in err


# ---------------------------------------------------------------- data checked up front


def data_cfg(**data):
    return build_config({"data": data, "eval": {"imbalanced_subset": False}}, ROOT)


def test_csv_label_outside_train_labels_is_an_error(tmp_path):
    root = tmp_path / "csv"
    for split, labels in (("train", "01"), ("test", "0c")):
        names = write_images(root / split, len(labels), ext=".png")
        lines = [f"{n},{'cat' if lab == 'c' else lab}" for n, lab in zip(names, labels)]
        (root / f"{split}.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")
    with pytest.raises(KDError, match="label 'cat' is not among the labels of train.csv"):
        load_splits(DataConfig(source="csv", path=str(root)))
    (root / "train.csv").write_text("filename,label\nimg0.png,-1\nimg1.png,1\n")
    with pytest.raises(KDError, match="label -1 is negative"):
        load_splits(DataConfig(source="csv", path=str(root)))


def test_empty_class_folder_and_corrupt_images_are_caught_before_training(tmp_path):
    root = tmp_path / "xray"
    for split in ("train", "val", "test"):
        write_images(root / split / "NORMAL", 3)
        write_images(root / split / "PNEUMONIA", 3)
    (root / "test" / "PNEUMONIA" / "img9.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = data_cfg(source="folder", path=str(root))
    with pytest.raises(KDError, match=r"1 file\(s\) of the test split .*img9.jpeg.*skip_bad"):
        check_splits(load_splits(cfg.data), cfg)
    skipping = data_cfg(source="folder", path=str(root), skip_bad_files=True)
    splits = check_splits(load_splits(skipping.data), skipping)
    assert len(splits.test) == 6
    (root / "test" / "PNEUMONIA" / "img9.jpeg").unlink()
    for f in (root / "val" / "NORMAL").iterdir():
        f.unlink()
    with pytest.raises(KDError, match=r"val split has no images of class\(es\) \['NORMAL'\]"):
        check_splits(load_splits(cfg.data), cfg)


def test_subset_evaluation_needs_are_checked_up_front(tiny_npz):
    cfg = build_config({"data": {"path": str(tiny_npz)}}, ROOT)
    message = "has 5 images of class 'normal'.*needs 21: set eval.imbalanced_subset = false"
    with pytest.raises(KDError, match=message):
        check_splits(load_splits(cfg.data), cfg)


def test_negative_label_in_an_npz(tmp_path):
    labels = np.array([0, 1, -1, 1]).reshape(-1, 1)
    images = np.zeros((4, 28, 28), "uint8")
    np.savez(tmp_path / "neg.npz", train_images=images, train_labels=labels,
             test_images=images, test_labels=labels)  # fmt: skip
    with pytest.raises(KDError, match="negative label"):
        load_splits(DataConfig(path=str(tmp_path / "neg.npz")))


# ---------------------------------------------------------------- one line per mistake


def test_config_folder_corrupt_model_and_empty_config(tmp_path):
    code, _, err = run_cli("distill", "--config", str(tmp_path))
    assert code == 2 and "is a folder" in err
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(KDError, match="not a .keras archive"):
        load_model(tmp_path / "broken.keras")  # what every command loads models with
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    code, _, err = run_cli("distill", "--config", str(empty), "--set",
                           f"data.path={tmp_path / 'absent.npz'}")  # fmt: skip
    assert code == 2 and "sets no keys: every value is a default" in err
    assert not (tmp_path / "runs").exists() and not (ROOT / "runs" / "empty").exists(), (
        "a run that fails its data checks leaves no folder"
    )


# ---------------------------------------------------------------- fuzzed inputs


def test_fuzzed_data_files_give_only_clear_errors(tmp_path, real_npz):
    """Random bytes, truncated files and wrong formats, fed to every loader."""
    rng = np.random.default_rng(0)
    real = real_npz.read_bytes()
    blobs = [rng.bytes(n) for n in (0, 10, 1000)] + [real[: len(real) // 3], b"PK\x03\x04"]
    for i, blob in enumerate(blobs):
        npz = tmp_path / f"f{i}.npz"
        npz.write_bytes(blob)
        with pytest.raises(KDError):
            load_npz(npz, None)
        root = tmp_path / f"csv{i}"
        (root / "train").mkdir(parents=True)
        (root / "train.csv").write_bytes(blob)
        (root / "test.csv").write_bytes(blob)
        with pytest.raises(KDError):
            load_splits(DataConfig(source="csv", path=str(root)))
        cifar = tmp_path / f"cifar{i}"
        cifar.mkdir()
        for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
            (cifar / name).write_bytes(blob)
        with pytest.raises(KDError):
            load_splits(DataConfig(source="cifar10", path=str(cifar)))
    np.savez(tmp_path / "wrong.npz", pictures=np.zeros(3))
    with pytest.raises(KDError, match="train_images"):
        load_npz(tmp_path / "wrong.npz", None)
    root = tmp_path / "folder"
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            write_images(root / split / cls, 2, ext=".png")
            (root / split / cls / "junk.png").write_bytes(rng.bytes(200))
    cfg = data_cfg(source="folder", path=str(root))
    with pytest.raises(KDError, match="not readable images"):
        check_splits(load_splits(cfg.data), cfg)
