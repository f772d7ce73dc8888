"""The one place kd_keras touches private Keras / TensorFlow names, each with the reason.

Everything else in kd_keras uses public APIs only; when an upgrade of Keras or TensorFlow
breaks something here, this module is where to look.
"""

from __future__ import annotations


def tf_onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels in this process.

    Private: TensorFlow has no public query; its own start-up log line ("oneDNN custom
    operations are on") is printed from the same flag (`IsMklEnabled`, `util/port.cc`)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def inbound_nodes(layer) -> list:
    """The graph nodes at which `layer` was called (Keras's `_inbound_nodes`).

    Private: Keras 3 has no public way to ask which call of a layer belongs to which
    functional graph; feature taps need the tensor a layer produced inside one enclosing model
    (`kd_keras.models`), and training views must not be mistaken for it
    (`kd_keras.matmul_conv`)."""
    return list(layer._inbound_nodes)
