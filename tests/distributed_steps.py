"""Subprocess of tests/test_distribute.py: the first training steps of one Distiller on 1 device
and on 2 logical CPU devices under MirroredStrategy, same initial weights and global batch.

Logical devices must be configured before TensorFlow initialises its devices, hence a process
of its own. The optimizer is the fused SGD kd_keras trains with (`kd_keras.distill.fused_updates`:
its kernels update each replica's copy of a variable), with momentum and decoupled decay; the
fused AdamW under MultiWorkerMirroredStrategy is checked by the two-worker CLI test. Prints one
JSON object: {"one": [logs per step], "two": [...], "synced_bn": n}.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kd_keras.host import enable_onednn  # noqa: E402

enable_onednn()  # as in every kd_keras process (done by the import too): before TensorFlow

import tensorflow as tf  # noqa: E402

CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kd_keras.distill import distribute  # noqa: E402
from kd_keras.distill.distiller import Distiller  # noqa: E402
from kd_keras.distill.fused_updates import FusedSGD  # noqa: E402
from kd_keras.models.registry import build_student, build_teacher  # noqa: E402

STEPS, BATCH = int(sys.argv[1]), 32


def distiller() -> Distiller:
    """Tiny ResNet50 -> ResNet18, every term on (CE, soft KD, FitNet), coupled L2 too."""
    keras.utils.set_random_seed(1)
    teacher = build_teacher("resnet50", 2, 32, tiny=True)
    student = build_student("resnet18", 2, 32, tiny=True)
    return Distiller(student, teacher, alpha=0.5, temperature=4.0, beta=1.0, l2_weight_decay=1e-3)


class Steps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append({k: float(v) for k, v in logs.items()})


def first_steps(strategy, weights, x, y) -> tuple[list[dict], int]:
    with strategy.scope():
        model = distiller()
        synced = distribute.sync_batch_norm(model.student)
        model.set_weights(weights)
        model.compile(optimizer=FusedSGD(0.1, momentum=0.9, weight_decay=1e-2))
    steps = Steps()
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), epochs=1, verbose=0,
              callbacks=[steps], class_weight={0: 1.6, 1: 0.7}, shuffle=False)  # fmt: skip
    return steps.rows, len(synced)


rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (STEPS * BATCH, 32, 32, 3)).astype("float32")
y = (rng.uniform(size=STEPS * BATCH) < 0.7).astype("int32")
init = distiller().get_weights()
one, _ = first_steps(tf.distribute.get_strategy(), init, x, y)
two, synced = first_steps(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), init, x, y)
print(json.dumps({"one": one, "two": two, "synced_bn": synced}))
