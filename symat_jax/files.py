"""The project's file conventions: atomic writes, JSON reads whose errors name the file, output-path checks.

Host-side only (no JAX): the CSV reader, the metrics and the run folder all use it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import zipfile
from typing import Any, Sequence

log = logging.getLogger(__name__)

# What reading a truncated, foreign or damaged ``.npz`` raises (numpy, zipfile, a missing key).
UNREADABLE_NPZ = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile)


def set_aside(path: pathlib.Path, why: Exception) -> None:
    """Move an unreadable cache file out of the way (``<name>.corrupt``, kept for the user) with a warning; it is rebuilt."""
    aside = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, aside)
    except OSError:
        aside = path  # a read-only cache folder: the file stays, and the cache is only ignored
    log.warning("the cache file %s is unreadable (%s: %s): moved to %s and rebuilt", path, type(why).__name__, why, aside)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, keys: Sequence[str] = ()) -> Any:
    """Return the JSON content of ``path``; a ValueError naming the file when it is empty, not JSON or lacks ``keys``."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path} is empty (a half-written or truncated file?)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(repr(k) for k in missing)}")
    return data


def _check_parent(path: pathlib.Path, option: str, writable: bool) -> None:
    """Raise ValueError naming ``option`` when the nearest existing parent of ``path`` is a file (or not writable)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None:
        return
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
    if writable and not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path}: cannot write in {parent}")


def check_new_file(path: str | os.PathLike, option: str) -> pathlib.Path:
    """Return ``path`` as a Path after checking a file can be written there (ValueError naming ``option`` otherwise).

    Checked before any work, so a finished job is never lost to its output path.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name (e.g. {path / 'metrics.json'})")
    _check_parent(path, option, writable=True)
    return path


def check_folder_path(path: str | os.PathLike, option: str) -> pathlib.Path:
    """Return ``path`` as a Path after checking it is a folder or can become one (ValueError naming ``option``)."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder")
    _check_parent(path, option, writable=False)
    return path
