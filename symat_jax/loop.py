"""The epoch loop shared by every trainer (SyMat, the property model): shuffle, step, validate, checkpoint, log.

A trainer supplies its batches, its jitted step and an end-of-epoch function
(validation and the metrics record); the loop owns the rest, so resume,
best-checkpoint tracking and the metrics log behave the same for every model.
Step metrics stay on the device until the epoch ends: the host never waits
on a step inside the epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from symat_jax.checkpoints import RunStart

log = logging.getLogger(__name__)
PyTree = Any
# (state, step metrics on device, weights of the epoch's batches, seconds since the epoch started)
#   -> (validation score, lower is better; metrics record; extra checkpoint meta; log line)
EndEpoch = Callable[[PyTree, list[dict[str, Any]], list[int], float], tuple[float, dict[str, Any], dict[str, Any], str]]


def epoch_order(seed: int, epoch: int, num_examples: int, attempt: int = 0) -> np.ndarray:
    """Return the shuffled example order of an epoch (a function of seed, epoch and retry only, so resume repeats it)."""
    return np.random.default_rng([seed, epoch] + ([attempt] if attempt else [])).permutation(num_examples)


class TrainingDiverged(RuntimeError):
    """An epoch's training loss jumped past the divergence guard on every retry; the run stopped at its last good epoch."""


@dataclasses.dataclass(frozen=True)
class DivergenceGuard:
    """Reject an epoch whose training loss exceeds ``factor`` x the median of the last ``window`` accepted epochs.

    A rejected epoch is never checkpointed: the state goes back to where the
    epoch started and the epoch is rerun with a new PRNG stream and example
    order, up to ``retries`` times; then the run stops with
    :class:`TrainingDiverged`, its newest checkpoint the last good epoch.
    The loss of a healthy run falls or wobbles by tens of per cent; a
    diverged one jumps by orders of magnitude (Carbon-24, batch 32: the KL
    went from 35 to 48,758 in one epoch), so ``factor`` 10 separates them.
    """

    factor: float = 10.0
    window: int = 5
    retries: int = 3
    min_history: int = 3  # the first epochs fall by orders of magnitude: judged only once this many are accepted

    def rejects(self, value: float, history: list[float]) -> bool:
        """Return whether ``value`` (an epoch's training loss) is a divergence given the accepted epochs' ``history``."""
        if not np.isfinite(value):
            return True
        if len(history) < self.min_history:
            return False
        reference = float(np.median(history[-self.window:]))
        return reference > 0 and value > self.factor * reference


def _host_copy(state: PyTree) -> PyTree:
    """Return a host copy of ``state`` that outlives donated device buffers."""
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(state))


def _reseeded(state: PyTree, attempt: int) -> PyTree:
    """Return ``state`` (host copy) on the device with its PRNG stream moved to retry ``attempt``."""
    state = jax.device_put(state)
    return state.replace(key=jax.random.fold_in(state.key, attempt))


def _history(metrics_path, guard_metric: Callable[[dict[str, Any]], float]) -> list[float]:
    """Return the guard metric of every epoch logged in ``metrics_path`` (a resumed run keeps its history)."""
    if not metrics_path.exists():
        return []
    out = []
    for line in metrics_path.read_text().splitlines():
        try:
            out.append(float(guard_metric(json.loads(line))))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def weighted_means(rows: list[dict[str, Any]], weights: list[int], sums: tuple[str, ...] = (),
                   skipped: str | None = None) -> dict[str, float]:
    """Return per-metric means of step metrics weighted by ``weights`` (plain sums for the names in ``sums``).

    Steps whose ``skipped`` metric is set did not update the state: they are
    left out of the means (their loss is the non-finite one that had them
    skipped), counted only in the sums. The device values are fetched once, here.
    """
    rows = jax.device_get(rows)
    w = np.asarray(weights, float)
    if skipped is not None:
        w = np.where([bool(r[skipped]) for r in rows], 0.0, w)
    out: dict[str, float] = {}
    total = w.sum()
    for name in rows[0]:
        vals = np.array([float(r[name]) for r in rows])
        if name in sums:
            out[name] = float(vals.sum())
        else:
            out[name] = float(np.sum(np.where(w > 0, vals, 0.0) * w) / total) if total > 0 else float("nan")
    return out


def run_epochs(
    start: RunStart,
    *,
    epochs: int,
    seed: int,
    num_examples: int,
    steps_per_epoch: int,
    batches: Callable[[np.ndarray], Iterable[tuple[Any, int]]],
    train_step: Callable[[PyTree, Any], tuple[PyTree, dict[str, Any]]],
    end_epoch: EndEpoch,
    best_key: str,
    desc: str = "epoch",
    progress: bool = True,
    guard: DivergenceGuard | None = None,
    guard_metric: Callable[[dict[str, Any]], float] = lambda record: record["train"]["loss"],
) -> tuple[PyTree, dict[str, Any], float]:
    """Run epochs ``start.start_epoch .. epochs - 1``; return ``(final state, last metrics record, best score)``.

    ``batches(order)`` yields ``(batch, weight)`` (weight: real examples in
    the batch). After each epoch its record is appended to ``metrics.jsonl``,
    then the state is checkpointed (as the best too when its validation score
    is the lowest so far). With a ``guard``, an epoch whose
    ``guard_metric(record)`` it rejects is rerun from its start instead
    (:class:`DivergenceGuard`); the accepted record says how many tries it took.
    """
    state, best, last = start.state, start.best, {}
    history = collections.deque(_history(start.metrics_path, guard_metric), maxlen=guard.window if guard else 1)
    for epoch in range(start.start_epoch, epochs):
        rejected: list[float] = []
        # Steps donate the state's buffers: the copy to go back to lives on the host.
        snapshot = _host_copy(state) if guard else None
        while True:
            t0 = time.perf_counter()
            rows, weights = [], []
            attempt = len(rejected)
            bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}" + (f" (retry {attempt})" if attempt else ""),
                       disable=not progress, leave=False)
            for batch, weight in batches(epoch_order(seed, epoch, num_examples, attempt)):
                state, metrics = train_step(state, batch)
                rows.append(metrics)
                weights.append(weight)
                bar.update(1)
            bar.close()
            score, record, meta, message = end_epoch(state, rows, weights, t0)
            value = float(guard_metric(record)) if guard else 0.0
            if guard is None or not guard.rejects(value, list(history)):
                break
            rejected.append(value)
            reference = float(np.median(list(history))) if history else float("nan")
            if len(rejected) > guard.retries:
                start.ckpt.close()
                raise TrainingDiverged(
                    f"{desc} {epoch + 1} diverged on {len(rejected)} tries (training loss {value:.4g} against "
                    f"{reference:.4g} over the last epochs); nothing of it was saved: the newest checkpoint is the "
                    f"last good {desc} ({epoch}). Sample it as it is, or rerun with --resume for new tries.")
            log.warning("%s %d diverged (training loss %.4g against %.4g over the last epochs): rerunning it from "
                        "its start with a new random stream (retry %d of %d)", desc, epoch + 1, value, reference,
                        len(rejected), guard.retries)
            state = _reseeded(snapshot, len(rejected))
        if guard:
            history.append(value)
            if rejected:
                record = {**record, "retries": len(rejected), "rejected_loss": rejected}
        is_best = score < best
        best = min(best, score)
        record = {"epoch": epoch + 1, **record}
        # Log first, then checkpoint: a kill in between leaves a line for an epoch with no checkpoint, which
        # resume drops (start_run keeps only lines up to the restored epoch) before it reruns that epoch.
        # The other order lost the line of a checkpointed epoch for good.
        with open(start.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        start.ckpt.save(epoch, state, {"epoch": epoch, best_key: best, **meta}, is_best)
        log.info("%s %d: %s", desc, epoch + 1, message)
        last = record
    start.ckpt.close()
    return state, last, best
