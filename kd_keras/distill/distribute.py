"""Scale-out on tf.distribute: the strategy of a run, which worker writes, and global-batch sums.

`[distribute] strategy` picks the engine:

- `none`: the default strategy (one device), exactly what runs without this module;
- `mirrored`: `tf.distribute.MirroredStrategy`, every visible GPU of this machine (one device,
  the CPU, on a machine without GPUs);
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy` across the machines that the
  `TF_CONFIG` environment variable describes; every worker runs the same command.

`data.batch_size` is the GLOBAL batch: each of R replicas sees batch_size / R images of the
same batch the single-device run would see, and learning rates are not rescaled. The
Distiller divides each replica's loss terms by the global batch (see `global_count`) because
Keras 3's TF optimizer SUMS the replicas' gradients (`TFOptimizer._all_reduce_sum_gradients`):
the summed update is then the single-device update of the same global batch.

Only the chief writes the run folder; every other worker trains in a temporary folder that is
deleted at the end (`worker_config`, `cleanup_worker`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

from kd_keras import compat
from kd_keras.errors import KDError

WORKER_DIR_PREFIX = "kd_keras_worker_"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Worker:
    """This process's place in the cluster: its strategy, task type and index, the number of
    workers and of replicas in sync."""

    strategy: object
    task_type: str | None
    task_id: int
    num_workers: int
    num_replicas: int

    @property
    def is_chief(self) -> bool:
        """The chief writes the run: task `chief`, or worker 0 of a cluster without one."""
        return self.task_type in (None, "chief") or (
            self.task_type == "worker" and self.task_id == 0 and not _has_chief_task()
        )

    def describe(self) -> str:
        """One line: who this process is in the cluster."""
        role = "chief" if self.is_chief else "worker (writes nothing)"
        where = f"{self.task_type} {self.task_id}" if self.task_type else "single process"
        return (f"distribute: {where} of {self.num_workers} worker(s), {self.num_replicas} "
                f"replica(s) in sync; this process is the {role}")  # fmt: skip


def tf_config() -> dict:
    """The parsed `TF_CONFIG` environment variable ({} when unset); a KDError when malformed."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise KDError(f"TF_CONFIG is not valid JSON ({err}); see docs/scale_out.md") from err
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise KDError('TF_CONFIG must hold "cluster" and "task" (docs/scale_out.md)')
    return config


def _has_chief_task() -> bool:
    return "chief" in tf_config().get("cluster", {})


def make_strategy(name: str, devices: list[str] | None = None):
    """The `tf.distribute.Strategy` for `distribute.strategy = name`.

    `devices` (MirroredStrategy only; default: every GPU, else the CPU) is for tests that split
    the CPU into logical devices. `multi_worker` must be created before TensorFlow runs any
    operation, and needs `TF_CONFIG` (a KDError naming the key otherwise).
    """
    if name == "multi_worker":
        config = tf_config()
        if not config:
            raise KDError(
                'config key distribute.strategy = "multi_worker" needs the TF_CONFIG '
                "environment variable (the cluster's workers and this process's task); see "
                'docs/scale_out.md — or use strategy = "mirrored" on one machine'
            )
        workers = config["cluster"].get("worker", []) + config["cluster"].get("chief", [])
        if len(workers) < 1:
            raise KDError("TF_CONFIG names no worker in its cluster")
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "none":
        return tf.distribute.get_strategy()
    raise ValueError(f"unknown strategy {name!r}")


def worker_of(strategy) -> Worker:
    """This process's `Worker` under `strategy`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None) if resolver is not None else None
    task_id = getattr(resolver, "task_id", None) if resolver is not None else None
    cluster = tf_config().get("cluster", {}) if task_type else {}
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", [])) or 1
    return Worker(strategy, task_type, int(task_id or 0), workers,
                  int(strategy.num_replicas_in_sync))  # fmt: skip


def start(cfg, mode: str = "new", devices: list[str] | None = None) -> Worker:
    """This process's `Worker` for `cfg` (call it before TensorFlow runs any operation): the
    strategy made, the global batch checked, a line printed when distributed. `--resume` is
    refused across machines (the other workers keep no checkpoint to resume from)."""
    name = cfg.distribute.strategy
    if name == "multi_worker" and mode == "resume":
        raise KDError(
            'config key distribute.strategy = "multi_worker" cannot --resume (only the chief '
            "keeps checkpoints); resume that run on one machine, or start it again"
        )
    worker = worker_of(make_strategy(name, devices))
    check_batch(cfg.data.batch_size, worker)
    if name != "none":
        logger.info(worker.describe())
    return worker


def check_batch(batch_size: int, worker: Worker) -> None:
    """The global batch must split evenly over the replicas (a KDError naming the key)."""
    if batch_size % worker.num_replicas:
        raise KDError(
            f"config key data.batch_size = {batch_size} is the global batch and must be a "
            f"multiple of the {worker.num_replicas} replicas in sync"
        )


def worker_config(cfg, worker: Worker):
    """`cfg` for this process: unchanged on the chief; elsewhere its run goes to a new
    temporary folder (deleted by `cleanup_worker`), so no other worker writes a result."""
    if worker.is_chief:
        return cfg
    tmp = tempfile.mkdtemp(prefix=f"{WORKER_DIR_PREFIX}{worker.task_id}_")
    logger.info(f"worker {worker.task_id}: training in temporary folder {tmp} (deleted at the end)")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=tmp))


def cleanup_worker(cfg, worker: Worker) -> None:
    """Delete a non-chief worker's temporary output folder."""
    if not worker.is_chief:
        shutil.rmtree(cfg.run.output_dir, ignore_errors=True)


def sync_batch_norm(model, enabled: bool = True) -> list:
    """With more than one replica in sync, switch every BatchNormalization layer of `model`
    (nested models included) to statistics over the global batch (`synchronized=True`: an
    all-reduce per layer), so each replica normalises as the single device would. Returns the
    layers switched, for `unsync_batch_norm` (the saved model keeps its plain layers)."""
    import keras

    if not enabled or num_replicas() == 1:
        return []
    layers = compat.all_sublayers(model)
    bn = keras.layers.BatchNormalization
    switched = [layer for layer in layers if isinstance(layer, bn) and not layer.synchronized]
    for layer in switched:
        layer.synchronized = True
    return switched


def unsync_batch_norm(layers: list) -> None:
    """Undo `sync_batch_norm`."""
    for layer in layers:
        layer.synchronized = False


def shard_by_data(dataset):
    """`dataset` sharded by element across workers (each worker keeps its part of every global
    batch; tf.data's AUTO policy would first try to shard by file, which in-memory data lacks)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def replica_sum(value):
    """`value` summed over the replicas in sync (the value itself with one replica). Call it
    inside a train or test step (replica context)."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def num_replicas() -> int:
    """Replicas in sync in the current context (1 outside any strategy)."""
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def global_count(batch):
    """The global batch size of this step: the replicas' local batch sizes summed (float32)."""
    import tensorflow as tf

    return replica_sum(tf.cast(tf.shape(batch)[0], tf.float32))


def step_logs(logs: dict) -> dict:
    """A train or test step's logs in a shape Keras 3.15 can reduce over workers.

    Under MultiWorkerMirroredStrategy, Keras's TF trainer reduces every log with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalars a step returns
    ("Invalid reduction dimension 0 for input with 0 dimensions": keras-team/keras#20585,
    tensorflow/tensorflow#72388); a shape-(1,) value is reduced to the scalar. Elsewhere the
    logs are returned unchanged."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if not _multi_worker(strategy):
        return logs
    return {name: tf.reshape(value, (1,)) for name, value in logs.items()}


def _multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and compat.in_multi_worker_mode(strategy)
