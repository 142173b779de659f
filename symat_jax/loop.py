"""The epoch loop shared by every trainer (SyMat, the property model): shuffle, step, validate, checkpoint, log.

A trainer supplies its batches, its jitted step and an end-of-epoch function
(validation and the metrics record); the loop owns the rest, so resume,
best-checkpoint tracking and the metrics log behave the same for every model.
Step metrics stay on the device until the epoch ends: the host never waits
on a step inside the epoch.
"""

from __future__ import annotations

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


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Return the shuffled example order of an epoch (a function of seed and epoch only, so resume repeats it)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def weighted_means(rows: list[dict[str, Any]], weights: list[int], sums: tuple[str, ...] = ()) -> dict[str, float]:
    """Return per-metric means of step metrics weighted by ``weights`` (plain sums for the names in ``sums``).

    The device values are fetched once, here.
    """
    rows = jax.device_get(rows)
    out: dict[str, float] = {}
    total = max(sum(weights), 1)
    for name in rows[0]:
        vals = np.array([float(r[name]) for r in rows])
        out[name] = float(vals.sum()) if name in sums else float(np.sum(vals * np.asarray(weights)) / total)
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
) -> tuple[PyTree, dict[str, Any], float]:
    """Run epochs ``start.start_epoch .. epochs - 1``; return ``(final state, last metrics record, best score)``.

    ``batches(order)`` yields ``(batch, weight)`` (weight: real examples in
    the batch). After each epoch its record is appended to ``metrics.jsonl``,
    then the state is checkpointed (as the best too when its validation score
    is the lowest so far).
    """
    state, best, last = start.state, start.best, {}
    for epoch in range(start.start_epoch, epochs):
        t0 = time.perf_counter()
        rows, weights = [], []
        bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch, weight in batches(epoch_order(seed, epoch, num_examples)):
            state, metrics = train_step(state, batch)
            rows.append(metrics)
            weights.append(weight)
            bar.update(1)
        bar.close()
        score, record, meta, message = end_epoch(state, rows, weights, t0)
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
