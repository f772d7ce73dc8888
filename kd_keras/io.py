"""File utilities: atomic writes, JSON read/write, checksums, writable-folder checks, download
failures."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
from collections.abc import Callable
from pathlib import Path

from kd_keras.errors import KDError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file via a temporary sibling and rename it into place.

    `write(tmp_path)` must create the file at `tmp_path`. A crash or an exception leaves any
    previous file untouched and no half-written file behind. The temporary file keeps the
    target's suffix because some writers (Keras, matplotlib) choose the format from it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KDError(f"cannot create output folder {path.parent}: {err.strerror}") from err
    if not os.access(path.parent, os.W_OK):
        raise KDError(f"output folder {path.parent} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        tmp_path.unlink()
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def check_writable_dir(path: Path) -> Path:
    """Create `path` and prove a file can be written there, before any slow work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise KDError(f"output folder {path} is not writable: {err.strerror or err}") from err
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` as UTF-8, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write `data` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file; a missing or malformed file is a `KDError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise KDError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KDError(f"{path} is not valid JSON: {err}") from err


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file, or of a folder's files (relative names and contents, in order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def newest_mtime(folder: Path) -> float:
    """The modification time of `folder` or of the newest entry directly inside it."""
    return max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()])


# What `keras.utils.get_file` (so also `keras.applications` weights and `keras.datasets`) raises
# when a download fails (keras/src/utils/file_utils.py): OSError for the disk and sockets, and
# ValueError for a file that fails its hash. An HTTPError / URLError it re-raises as a plain
# `Exception("URL fetch failure on ...")`, recognised by `is_download_error` from its context.
DOWNLOAD_ERRORS = (OSError, ValueError)


def is_download_error(err: BaseException) -> bool:
    """Whether `err` is how `keras.utils.get_file` reports a failed download (not a bug)."""
    if isinstance(err, DOWNLOAD_ERRORS):
        return True
    return type(err) is Exception and isinstance(err.__context__, urllib.error.URLError)
