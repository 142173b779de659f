"""Host-side parallel map over processes with a progress bar (CSV parsing, fingerprints).

Workers run pymatgen/matminer only, never JAX, so fork is safe despite
JAX's warning about forking a threaded process; where a pool cannot start,
the work finishes in this process instead of failing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import warnings
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Below this many items, a process pool costs more than it saves.
MIN_ITEMS_FOR_POOL = 32


def pool_context() -> multiprocessing.context.BaseContext:
    """Return fork where the platform has it, else spawn.

    spawn re-runs the caller's unguarded script in every worker, which is far
    worse than fork's caveat with JAX (a warning about threads).
    """
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run_chunk(fn: Callable[..., R], chunk: list[tuple[int, T]], args: tuple) -> list[tuple[int, R]]:
    """Return ``(index, fn(item, *args))`` for each ``(index, item)`` of ``chunk``."""
    return [(i, fn(item, *args)) for i, item in chunk]


def parallel_map(
    fn: Callable[..., R],
    items: Sequence[T],
    *args: Any,
    workers: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    unit: str = "crystal",
    max_chunk: int = 16,
) -> list[R]:
    """Return ``[fn(item, *args) for item in items]``, computed in ``workers`` processes (default: all cores).

    ``fn`` must be a module-level function (picklable) that handles its own
    expected errors: an exception it raises stops the whole map.
    """
    workers = workers or os.cpu_count() or 1
    indexed = list(enumerate(items))
    results: list[Any] = [None] * len(indexed)
    done = [False] * len(indexed)
    bar = tqdm(total=len(indexed), desc=desc, unit=unit, disable=not progress)

    def collect(pairs: list[tuple[int, R]]) -> None:
        for i, res in pairs:
            results[i], done[i] = res, True
        bar.update(len(pairs))

    if workers > 1 and len(indexed) >= MIN_ITEMS_FOR_POOL:
        chunk = max(1, min(max_chunk, len(indexed) // (workers * 8)))
        chunks = [indexed[i : i + chunk] for i in range(0, len(indexed), chunk)]
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=pool_context()) as pool, \
                    warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
                futures = [pool.submit(_run_chunk, fn, c, args) for c in chunks]
                for fut in concurrent.futures.as_completed(futures):
                    collect(fut.result())
        except concurrent.futures.process.BrokenProcessPool:
            log.warning(
                "worker processes failed to start (guard your script with `if __name__ == '__main__':` "
                "for parallel work); continuing in this process"
            )
    todo = [pair for pair in indexed if not done[pair[0]]]
    for pair in todo:
        collect(_run_chunk(fn, [pair], args))
    bar.close()
    return results
