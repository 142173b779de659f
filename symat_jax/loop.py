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
import pathlib
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
    """An epoch diverged on every try the divergence guard allows; the run stopped at its last good epoch."""


def default_guard_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Return the losses the divergence guard watches: the epoch's training loss and its end state's validation loss."""
    return {"training loss": record["train"]["loss"], "validation loss": record["val"]["loss"]}


@dataclasses.dataclass(frozen=True)
class DivergenceGuard:
    """Reject an epoch whose watched losses exceed ``factor`` x their median over the last ``window`` accepted epochs.

    A rejected epoch is never checkpointed: the state goes back to where the
    epoch started and the epoch is rerun with a new PRNG stream and example
    order and the learning rate times ``lr_factor`` (kept from then on), up
    to ``retries`` times; then the run stops with :class:`TrainingDiverged`,
    its newest checkpoint the last good epoch. Measured on every Carbon-24
    run so far: a healthy epoch's loss is at most 1.11 x that median (Perov-5:
    1.06 until its one spike), a diverging one 3.7-114 x; the
    validation loss, taken at the epoch's end state, shows a blow-up late in
    the epoch that the epoch's mean training loss dilutes (3.7 x training,
    54 x validation).
    """

    factor: float = 3.0
    window: int = 5
    retries: int = 3
    lr_factor: float = 0.5
    min_history: int = 3  # the first epochs fall by orders of magnitude: judged only once this many are accepted

    def rejects(self, values: dict[str, float], history: list[dict[str, float]]) -> str | None:
        """Return why ``values`` (an epoch's watched losses) is a divergence given the accepted epochs' ``history``, or None."""
        for name, value in values.items():
            if not np.isfinite(value):
                return f"{name} {value}"
            past = [h[name] for h in history[-self.window:] if name in h]
            if len(past) < self.min_history:
                continue
            reference = float(np.median(past))
            if reference > 0 and value > self.factor * reference:
                return f"{name} {value:.4g} against {reference:.4g} over the last epochs"
        return None


def _host_copy(state: PyTree) -> PyTree:
    """Return a host copy of ``state`` that outlives donated device buffers."""
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(state))


def _retry_state(snapshot: PyTree, attempt: int, lr_factor: float) -> PyTree:
    """Return the epoch's starting state (a host copy) on the device for retry ``attempt``: new PRNG stream, lower rate."""
    state = jax.device_put(snapshot)
    return state.replace(key=jax.random.fold_in(state.key, attempt),
                         lr_scale=state.lr_scale * np.float32(lr_factor**attempt))


def _history(metrics_path: pathlib.Path, guard_metrics: Callable[[dict[str, Any]], dict[str, float]]) -> list[dict[str, float]]:
    """Return the watched losses of every epoch logged in ``metrics_path`` (a resumed run keeps its history)."""
    if not metrics_path.exists():
        return []
    out = []
    for line in metrics_path.read_text().splitlines():
        try:
            out.append({k: float(v) for k, v in guard_metrics(json.loads(line)).items()})
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
    guard_metrics: Callable[[dict[str, Any]], dict[str, float]] = default_guard_metrics,
) -> tuple[PyTree, dict[str, Any], float]:
    """Run epochs ``start.start_epoch .. epochs - 1``; return ``(final state, last metrics record, best score)``.

    ``batches(order)`` yields ``(batch, weight)`` (weight: real examples in
    the batch). After each epoch its record is appended to ``metrics.jsonl``,
    then the state is checkpointed (as the best too when its validation score
    is the lowest so far). With a ``guard``, an epoch whose
    ``guard_metrics(record)`` it rejects is rerun from its start instead
    (:class:`DivergenceGuard`); the accepted record says how many tries it took.
    """
    state, best, last = start.state, start.best, {}
    history = collections.deque(_history(start.metrics_path, guard_metrics) if guard else (),
                                maxlen=guard.window if guard else 1)
    for epoch in range(start.start_epoch, epochs):
        rejected: list[dict[str, float]] = []
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
            if guard is None:
                break
            values = {k: float(v) for k, v in guard_metrics(record).items()}
            why = guard.rejects(values, list(history))
            if why is None:
                break
            rejected.append(values)
            if len(rejected) > guard.retries:
                start.ckpt.close()
                raise TrainingDiverged(
                    f"{desc} {epoch + 1} diverged on {len(rejected)} tries (last: {why}); nothing of it was saved: "
                    f"the newest checkpoint is the last good {desc} ({epoch}). Sample it as it is, or resume with "
                    f"more tries (--resume --divergence-retries {2 * guard.retries}: the same tries again, then "
                    f"new ones, each at half the rate of the one before).")
            log.warning("%s %d diverged (%s): rerunning it from its start with a new random stream and the learning "
                        "rate x %g (retry %d of %d)", desc, epoch + 1, why, guard.lr_factor ** len(rejected),
                        len(rejected), guard.retries)
            state = _retry_state(snapshot, len(rejected), guard.lr_factor)
        if guard:
            history.append(values)
            if rejected:
                record = {**record, "retries": len(rejected), "rejected": rejected,
                          "lr_scale": float(jax.device_get(state.lr_scale))}
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
