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
