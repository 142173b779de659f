"""Output folders that appear whole or not at all, and are never another command's input or a folder symat did not write.

Every command that writes a folder (``symat sample``, ``symat relax``) claims
it with :class:`OutputFolder` before any work: the path is checked (not a
file, not an input of the command nor inside or around one, not a non-empty
folder without ``--overwrite``, and ``--overwrite`` only over a folder that a
symat command wrote, which carries :data:`MANIFEST`), a lock beside it refuses
a second writer, and the output is written into a temporary sibling that is
renamed into place once complete, with the manifest written last. A reader
(:func:`check_readable`) names a folder that a killed command left incomplete.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import time
from typing import Any, Iterable

from symat_jax.files import check_folder_path

MANIFEST = ".symat.json"
REQUEST = ".request.json"  # a resumable command's arguments, in its partial folder


def _partial(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f".{out.name}.partial"


def _old(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f".{out.name}.old"


def _lock(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    """Return whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(lock: pathlib.Path) -> int | None:
    """Return the live process that holds ``lock``, or None (no lock, or its writer is gone)."""
    try:
        pid = int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _alive(pid) else None


def _overlaps(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Return whether ``a`` is ``b``, lies inside it, or holds it."""
    return a == b or a in b.parents or b in a.parents


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Return the manifest a symat command wrote into ``folder`` (None where there is none or it is unreadable)."""
    try:
        data = json.loads((pathlib.Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_output(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 flag: str = "--out", locked: bool = False) -> pathlib.Path:
    """Return ``out`` resolved if a command may write it (ValueError naming the problem otherwise); creates nothing.

    ``locked``: the caller holds ``out``'s lock (its own claim is no other writer).
    """
    if not str(out).strip():
        raise ValueError(f"{flag} is empty; give a folder")
    path = check_folder_path(out, flag).resolve()
    for given in inputs:
        source = pathlib.Path(given).resolve()
        if _overlaps(path, source):
            raise ValueError(f"{flag} {out} is, holds or lies inside the input {given}; write into a folder of its own")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"{flag} {out} is not empty; choose a new folder or pass --overwrite to replace its contents")
        if read_manifest(path) is None:
            raise ValueError(f"{flag} {out} holds files no symat command wrote (no {MANIFEST}); --overwrite replaces "
                             "only a folder symat wrote: choose a new folder")
    owner = None if locked else _lock_owner(_lock(path))
    if owner is not None:
        raise ValueError(f"{flag} {out} is being written by another command (process {owner}); wait for it or "
                         "choose another folder")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: {parent} is not writable")
    return path


def check_readable(folder: str | os.PathLike, flag: str = "--samples") -> None:
    """Raise ValueError when ``folder`` is being written, or was left incomplete by a command that stopped."""
    path = pathlib.Path(folder).resolve()
    owner = _lock_owner(_lock(path))
    if owner is not None:
        raise ValueError(f"{flag} {folder} is being written by another command (process {owner}); wait for it")
    manifest = read_manifest(path)
    if not path.exists() and _partial(path).exists():
        raise ValueError(f"{flag} {folder} is incomplete: the command writing it stopped before it finished (its "
                         f"partial output is in {_partial(path)}); run that command again")
    if manifest is not None and not manifest.get("complete"):
        raise ValueError(f"{flag} {folder} is incomplete ({MANIFEST} does not mark it complete); run the command "
                         "that wrote it again")


class OutputFolder:
    """A claimed output folder: ``with OutputFolder(out, ...) as tmp:`` write into ``tmp``; it becomes ``out`` at the end.

    On an error inside the block nothing of ``out`` changes and the partial
    output is removed; after a kill it stays in a hidden sibling that the next
    writer of ``out`` clears, and readers name it (:func:`check_readable`).
    With ``resume`` (the command's request, JSON-ready) the next writer of the
    same request keeps what a killed one finished there instead, and an
    interrupted block (Ctrl-C) leaves it for that rerun.
    """

    def __init__(self, out: str | os.PathLike, *, command: str, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, flag: str = "--out", record: dict[str, Any] | None = None,
                 resume: dict[str, Any] | None = None) -> None:
        """Check ``out`` (:func:`check_output`) for ``command``; nothing is created until the block starts."""
        self.out = check_output(out, inputs=inputs, overwrite=overwrite, flag=flag)
        self.given, self.flag, self.command, self.overwrite = out, flag, command, overwrite
        self.record = dict(record or {})
        self.resume = None if resume is None else json.loads(json.dumps(resume))
        self.resumed = False
        self.tmp = _partial(self.out)
        self._locked = False

    def __enter__(self) -> pathlib.Path:
        """Take the lock, clear what a killed writer left, and return the empty temporary folder to write into."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._recover()
            # Checked again under the lock: another writer may have finished between the check and now.
            check_output(self.given, overwrite=self.overwrite, flag=self.flag, locked=True)
            if self.resume is not None and self.tmp.exists():
                request = self._request()
                if request == self.resume:
                    self.resumed = True
                    return self.tmp
                if request is not None and not self.overwrite:
                    changed = sorted(k for k in set(request) | set(self.resume) if request.get(k) != self.resume.get(k))
                    raise ValueError(f"{self.flag} {self.given} holds the unfinished output of another request "
                                     f"(differing in {', '.join(changed)}); rerun that command to finish it, or "
                                     "pass --overwrite to start this one")
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
            if self.resume is not None:
                (self.tmp / REQUEST).write_text(json.dumps(self.resume, indent=1))
        except BaseException:
            self._release()
            raise
        return self.tmp

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        """Put the finished folder in place (manifest last), or remove the partial one after an error."""
        try:
            if kind is not None:
                if self.resume is None or not issubclass(kind, KeyboardInterrupt):
                    shutil.rmtree(self.tmp, ignore_errors=True)
                return
            manifest = {"command": self.command, "complete": True, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "files": sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*") if p.is_file()),
                        **self.record}
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            old = _old(self.out)
            if self.out.exists():
                os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            self._release()

    def _request(self) -> Any:
        """Return the request a killed writer recorded in the partial folder (None where there is none)."""
        try:
            return json.loads((self.tmp / REQUEST).read_text())
        except (OSError, ValueError):
            return None

    def _recover(self) -> None:
        """Finish or undo a swap that a kill interrupted (the old folder set aside, the new one not yet in place)."""
        old = _old(self.out)
        if not old.exists():
            return
        if self.out.exists():
            shutil.rmtree(old)
        elif read_manifest(self.tmp) is not None:
            os.rename(self.tmp, self.out)  # the new folder was complete: put it in place
            shutil.rmtree(old)
        else:
            os.rename(old, self.out)

    def _take_lock(self) -> None:
        lock = _lock(self.out)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner is not None:
                    raise ValueError(f"{self.flag} {self.given} is being written by another command (process "
                                     f"{owner}); wait for it or choose another folder") from None
                lock.unlink(missing_ok=True)  # its writer is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "command": self.command}))
            self._locked = True
            return
        raise OSError(errno.EEXIST, f"could not lock {self.given}")

    def _release(self) -> None:
        if self._locked:
            _lock(self.out).unlink(missing_ok=True)
            self._locked = False
