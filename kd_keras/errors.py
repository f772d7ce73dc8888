"""User-facing errors (the file utilities are in `kd_keras.io`).

A `KDError` is a mistake the user can fix (bad config, missing file, no run found).
The CLI prints its message on one line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class KDError(Exception):
    """An error caused by user input; its message says what to fix."""

    exit_code = 2


class Interrupted(KDError):
    """Ctrl-C: the message says where the work stopped and how to continue (exit 130)."""

    exit_code = 130
