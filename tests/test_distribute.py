"""Scale-out on tf.distribute (`kd_keras.distill.distribute`, `[distribute]`).

The slow tests start their own processes: logical CPU devices must be set before TensorFlow
initialises, and MultiWorkerMirroredStrategy needs one process per worker (loopback only,
ports chosen free at run time, every process killed in `finally`).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli

from kd_keras.config import build_config
from kd_keras.errors import KDError

# Per-term losses of 2 replicas vs 1 device: float32 sums taken in another order (each
# replica's partial sums, the gradient all-reduce, synchronized BatchNorm's E[x^2] - E[x]^2)
# move the last bits (~1e-7 relative per operation), compounded over a few SGD steps; measured
# drift ~3e-6. 1e-4 relative is far above that and far below what a scaling error gives (a
# gradient summed instead of averaged doubles the step: differences of order 1).
STEP_RTOL, STEP_ATOL = 1e-4, 1e-5
# Chief's student vs the single-worker run after one epoch: per-image test probability within
# 0.02 (measured 0.005 max) and test ROC AUC within 0.01 (measured 0.002).
PROB_TOL, AUC_TOL = 0.02, 0.01
WORKER_TIMEOUT = 240


def test_multi_worker_without_tf_config_names_the_key(monkeypatch):
    from kd_keras.distill.distribute import make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(KDError, match="distribute.strategy.*TF_CONFIG"):
        make_strategy("multi_worker")


def test_strategy_is_validated_and_batch_must_split(tmp_path):
    from kd_keras.distill.distribute import Worker, check_batch

    with pytest.raises(KDError, match="distribute.strategy"):
        build_config({"distribute": {"strategy": "horovod"}}, tmp_path)
    assert build_config({}, tmp_path).distribute.strategy == "none"
    with pytest.raises(KDError, match="data.batch_size = 30 is the global batch"):
        check_batch(30, Worker(None, "worker", 0, 2, 4))


@pytest.mark.slow
def test_two_replicas_give_the_single_device_losses():
    """MirroredStrategy over 2 logical CPUs, the same global batch of 32 (16 per replica) and
    initial weights: every term of the first 3 steps (running means, sample weights from
    class_weight) equals the single-device run's within STEP_RTOL."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "distributed_steps.py"), "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["synced_bn"] > 0
    assert len(result["one"]) == len(result["two"]) == 3
    for one, two in zip(result["one"], result["two"]):
        assert set(one) == set(two) == {"loss", "ce", "kd", "feat", "accuracy"}
        for name in one:
            assert two[name] == pytest.approx(one[name], rel=STEP_RTOL, abs=STEP_ATOL), name


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_two_workers_match_one_worker_and_only_the_chief_writes(tmp_path, real_npz):
    """Two worker processes (MultiWorkerMirroredStrategy on 127.0.0.1) distil one epoch from a
    given tiny teacher; the chief's student matches a single-worker run of the same config, and
    only the chief wrote: the second worker's temporary folder is gone."""
    import keras

    from kd_keras.models.registry import build_teacher

    keras.utils.set_random_seed(0)
    teacher = tmp_path / "teacher.keras"
    build_teacher("resnet50", 2, 32, tiny=True).save(teacher)  # no dropout stage: exact runs
    config = tmp_path / "mw.toml"
    config.write_text(
        f'[run]\nname = "mw"\noutput_dir = "{tmp_path / "multi"}"\nseed = 0\n'
        f'[data]\npath = "{real_npz}"\nimage_size = 32\nbatch_size = 32\nlimit_train = 128\n'
        f'[teacher]\npath = "{teacher}"\n'
        '[student]\narch = "resnet18"\nvariant = "tiny"\n'
        '[train]\nstages = ["distill"]\nepochs = 1\nverbose = 2\n'
        '[eval]\nimbalanced_subset = false\n[distribute]\nstrategy = "multi_worker"\n'
    )
    code, _, err = run_cli("distill", "--force", "--config", str(config),
                           "--set", "distribute.strategy=none",
                           "--set", f"run.output_dir={tmp_path / 'single'}")  # fmt: skip
    assert code == 0, err

    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    worker_tmp = [tmp_path / f"tmp{i}" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            worker_tmp[i].mkdir()
            task = {"cluster": cluster, "task": {"type": "worker", "index": i}}
            env = dict(os.environ, TF_CONFIG=json.dumps(task), TMPDIR=str(worker_tmp[i]))
            procs.append(subprocess.Popen(
                [sys.executable, "cli.py", "distill", "--force", "--config", str(config)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))  # fmt: skip
        logs = [p.communicate(timeout=WORKER_TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "this process is the chief" in logs[0] and "run folder:" in logs[0]
    assert "worker (writes nothing)" in logs[1] and "worker done" in logs[1]

    multi, single = tmp_path / "multi" / "mw", tmp_path / "single" / "mw"
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    assert f"temporary folder {worker_tmp[1]}" in logs[1]
    assert not list(worker_tmp[1].iterdir()), "worker 1 left files behind"
    ours, ref = (np.load(d / "predictions_student.npz")["probs"] for d in (multi, single))
    assert np.abs(ours - ref).max() <= PROB_TOL
    auc = [json.loads((d / "report.json").read_text())["models"]["student"]["test"]["roc_auc"]
           for d in (multi, single)]  # fmt: skip
    assert auc[0] == pytest.approx(auc[1], abs=AUC_TOL)
