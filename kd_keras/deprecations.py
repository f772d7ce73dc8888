"""Names kept for one release after a rename, each read with a one-line deprecation note.

Config keys (`RENAMED_KEYS`) are rewritten to their new names before the config is checked, so
an old config file or `--set` override keeps working; the note goes to the `kd_keras` logger
(the command line shows it). Renamed Python names and keywords warn with `DeprecationWarning`
(`warn_renamed`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from kd_keras.errors import KDError

log = logging.getLogger(__name__)

# old "section.key" -> new "section.key"
RENAMED_KEYS = {"eval.seed_subset": "eval.imbalanced_subset"}


def _note(old: str, new: str) -> None:
    log.warning(f"note: config key {old} is deprecated; it is read as {new} (rename it)")


def renamed_keys(
    raw: dict[str, Any], overrides: list[str] | None
) -> tuple[dict[str, Any], list[str]]:
    """`raw` (a TOML dict) and `overrides` (`section.key=value`) with every deprecated key
    under its new name; both spellings of one key at once is an error."""
    raw = {s: dict(body) if isinstance(body, dict) else body for s, body in raw.items()}
    for old, new in RENAMED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split(".", 1), new.split(".", 1)
        body = raw.get(old_section)
        if isinstance(body, dict) and old_key in body:
            _note(old, new)
            target = raw.setdefault(new_section, {})
            if isinstance(target, dict) and new_key in target:
                raise KDError(f"config sets both {old} and {new}; keep {new} only")
            value = body.pop(old_key)
            if isinstance(target, dict):
                target[new_key] = value
    renamed = []
    for text in overrides or []:
        dotted, sep, rest = text.partition("=")
        if dotted.strip() in RENAMED_KEYS:
            new = RENAMED_KEYS[dotted.strip()]
            _note(dotted.strip(), new)
            text = f"{new}{sep}{rest}"
        renamed.append(text)
    return raw, renamed


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """A `DeprecationWarning`: `old` is now `new` (the old name goes in the next release)."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)
