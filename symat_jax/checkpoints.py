"""Orbax checkpoints of a run: the latest N train states, plus the best on validation."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class _ReaderNotices(logging.Filter):
    """Drops orbax's notices that a reader's managers are read-only and its log lines about files it cannot parse
    (a damaged checkpoint is reported once, as a ``DamagedCheckpointError`` naming it)."""

    NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only", "Failed to json parse")

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for the notices above."""
        return not any(n in record.getMessage() for n in self.NOTICES)


logging.getLogger("absl").addFilter(_ReaderNotices())


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files cannot be read back (truncated, deleted or corrupted)."""

    def __init__(self, directory: Any, step: int, cause: Exception) -> None:
        """Record which checkpoint (0-based ``step`` in ``directory``) failed and why."""
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        super().__init__(f"the checkpoint of epoch {step + 1} ({directory}/{step}) is damaged ({first})")
        self.directory, self.step = directory, step


class RunCheckpoints:
    """The checkpoints of one work directory: ``checkpoints/`` (latest N), ``best/`` (best validation loss) and
    ``kept/`` (chosen epochs kept for good)."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, keep_epochs: tuple[int, ...] = (),
                 read_only: bool = False) -> None:
        """Open (or create) the checkpoint folders of ``workdir``; ``keep_epochs`` (1-based) are kept for good.

        ``read_only``: a reader's view (sampling, evaluation, fitting a prior):
        nothing is created, cleaned up or deleted, and a folder that does not
        exist is not opened (``best`` or ``kept`` is then None).
        """
        root = pathlib.Path(workdir).resolve()
        self.root, self.read_only = root, read_only
        # A reader leaves orbax's temporary folders alone: they may be a save in progress of a training still running.
        options = (dict(create=False, enable_async_checkpointing=False, cleanup_tmp_directories=False, read_only=True,
                        save_interval_steps=0)
                   if read_only else dict(create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True))

        def manager(name: str, **kw: Any) -> ocp.CheckpointManager | None:
            if read_only and not (root / name).is_dir():
                return None
            kw = {} if read_only else kw  # a reader keeps no count of checkpoints: it deletes none
            return ocp.CheckpointManager(root / name, options=ocp.CheckpointManagerOptions(**kw, **options))

        if read_only and not (root / "checkpoints").is_dir():
            raise FileNotFoundError(f"{root / 'checkpoints'} does not exist: {workdir} holds no checkpoint")
        self.latest = manager("checkpoints", max_to_keep=keep)
        self.best = manager("best", max_to_keep=1)
        self.keep_epochs = tuple(keep_epochs)
        # Opened only where it exists or will be written: reading a run must not add a folder to it.
        self.kept = manager("kept") if keep_epochs or (root / "kept").is_dir() else None

    def save(self, epoch: int, state: PyTree, meta: dict[str, Any], is_best: bool) -> None:
        """Write ``state`` and JSON ``meta`` as epoch ``epoch`` (and as the best one when ``is_best``, and in
        ``kept/`` when it is one of ``keep_epochs``)."""
        managers = [self.latest] + ([self.best] if is_best else [])
        managers += [self.kept] if self.kept is not None and epoch + 1 in self.keep_epochs else []
        for mngr in managers:
            if epoch in mngr.all_steps():
                # An epoch trained again after a resume from an older checkpoint (the newest was damaged):
                # the same seed and data order give the same state, which replaces the stored one.
                mngr.delete(epoch)
            mngr.save(
                epoch,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            mngr.wait_until_finished()

    def latest_epoch(self) -> int | None:
        """Return the epoch of the newest checkpoint, or None."""
        return self.latest.latest_step()

    def restore(self, target: PyTree, best: bool = False, epoch: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Return ``(state, meta)`` of the newest (or ``best``, or given ``epoch``) checkpoint shaped like ``target``."""
        mngr = self.best if best else self.latest
        step = epoch if epoch is not None else mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
        try:
            out = mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
        except ValueError as err:
            try:
                return self._restore_older(mngr, step, target, err)
            except Exception as again:  # noqa: BLE001  (tensorstore raises several types for damaged files)
                raise DamagedCheckpointError(mngr.directory, step, again) from again
        except Exception as err:  # noqa: BLE001
            raise DamagedCheckpointError(mngr.directory, step, err) from err
        return out["state"], dict(out["meta"])

    def restore_newest_intact(self, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """Return ``(state, meta)`` of the newest checkpoint that restores; damaged newer ones are moved aside.

        They go to ``damaged_checkpoints/<step>`` beside ``checkpoints/`` (kept
        for the user, out of the way of the epochs that are trained again).
        """
        errors = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self.restore(target, epoch=step)
            except DamagedCheckpointError as err:
                errors.append(err)
                log.warning("%s; trying the one before it", err)
                continue
            for err in errors:
                aside = self.latest.directory.parent / "damaged_checkpoints" / str(err.step)
                aside.parent.mkdir(exist_ok=True)
                (self.latest.directory / str(err.step)).rename(aside)
                log.warning("moved the damaged checkpoint to %s", aside)
            if errors:
                self.latest.reload()
            return restored
        raise errors[0] if errors else FileNotFoundError(f"no checkpoint in {self.latest.directory}")

    def _restore_older(
        self, mngr: ocp.CheckpointManager, step: int, target: PyTree, err: ValueError
    ) -> tuple[PyTree, dict[str, Any]]:
        """Return ``(state, meta)`` of a checkpoint written before ``target`` gained fields (a train state's EMA).

        The stored fields are restored into ``target``'s structure and the
        state's ``restore_older`` fills the others; anything else raises ``err``.
        """
        stored, _ = self._restore_step(mngr, step)
        names = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
        if not names or not set(stored) < names or not hasattr(target, "restore_older"):
            raise err
        partial = {name: getattr(target, name) for name in stored}
        out = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(partial), meta=ocp.args.JsonRestore())
        )
        log.warning("checkpoint %d of %s predates the fields %s; they start fresh (an EMA at its parameters)", step,
                    mngr.directory, sorted(names - set(stored)))
        return target.restore_older(dict(out["state"])), dict(out["meta"])

    @staticmethod
    def _restore_step(mngr: ocp.CheckpointManager, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(state as nested dicts, meta)`` of one checkpoint, no target needed."""
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return dict(out["state"]), dict(out["meta"])

    def restore_raw(self, best: bool = True, epoch: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(state as nested dicts, meta)`` of the best (else newest, or given 0-based ``epoch``) checkpoint."""
        has_best = self.best is not None and self.best.latest_step() is not None
        if best and epoch is None and not has_best and self.read_only:
            epochs = ", ".join(str(s + 1) for s in self.kept_steps()) or "none"
            raise FileNotFoundError(f"{self.root} has no best checkpoint (best/ is missing or empty; kept epochs: "
                                    f"{epochs}); load `--checkpoint latest` or a kept epoch's number")
        mngr = self.best if best and epoch is None and has_best else self.latest
        step = mngr.latest_step() if epoch is None else epoch
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
        if step not in mngr.all_steps() and self.kept is not None and step in self.kept.all_steps():
            mngr = self.kept
        if step not in mngr.all_steps():
            kept = ", ".join(str(s + 1) for s in self.kept_steps()) or "none"
            raise FileNotFoundError(f"no checkpoint of epoch {step + 1} in {mngr.directory} (kept epochs: {kept})")
        try:
            return self._restore_step(mngr, step)
        except Exception as err:  # noqa: BLE001  (tensorstore raises several types for damaged files)
            raise DamagedCheckpointError(mngr.directory, step, err) from err

    def kept_steps(self) -> list[int]:
        """Return the 0-based epochs with a checkpoint in ``checkpoints/`` or ``kept/``, oldest first."""
        steps = set(self.latest.all_steps()) | (set(self.kept.all_steps()) if self.kept is not None else set())
        return sorted(steps)

    def close(self) -> None:
        """Release the managers."""
        for mngr in (self.latest, self.best, self.kept):
            if mngr is not None:
                mngr.close()


@dataclasses.dataclass
class RunStart:
    """Where a training loop starts: its open checkpoints, state, first epoch (0-based) and best validation score."""

    ckpt: RunCheckpoints
    state: PyTree
    start_epoch: int
    best: float
    metrics_path: pathlib.Path


def start_run(workdir: str | pathlib.Path, keep: int, state: PyTree, resume: bool, best_key: str,
              keep_epochs: tuple[int, ...] = ()) -> RunStart:
    """Open the checkpoints of ``workdir``: a fresh run (refused where one exists) or the newest checkpoint when ``resume``.

    ``state`` is the freshly initialised train state (the restore target);
    ``best_key`` names the best-score entry of the checkpoint meta. Lines of
    ``metrics.jsonl`` written after the restored epoch (before a kill) are dropped.
    """
    ckpt = RunCheckpoints(workdir, keep, keep_epochs)
    metrics_path = pathlib.Path(workdir) / "metrics.jsonl"
    if ckpt.latest_epoch() is None:
        if metrics_path.exists():
            metrics_path.unlink()
        return RunStart(ckpt, state, 0, float("inf"), metrics_path)
    if not resume:
        ckpt.close()
        raise ValueError(f"{workdir} already holds a run; pass --resume to continue it, or choose another workdir")
    try:
        state, meta = ckpt.restore_newest_intact(state)
    except Exception:
        ckpt.close()
        raise
    epoch = int(meta["epoch"])
    log.info("resumed %s from epoch %d", workdir, epoch + 1)
    if metrics_path.exists():
        lines = [line for line in metrics_path.read_text().splitlines() if _epoch_of(line) <= epoch + 1]
        tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(metrics_path)
    return RunStart(ckpt, state, epoch + 1, float(meta[best_key]), metrics_path)


def _epoch_of(line: str) -> float:
    """Return the epoch of a ``metrics.jsonl`` line; infinity for a blank or half-written one (so it is dropped)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
