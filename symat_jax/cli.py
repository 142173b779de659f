"""The ``symat`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from symat_jax.data import registry


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add the dataset and data-root options shared by every sub-command."""
    parser.add_argument("--dataset", default="carbon_24", choices=sorted(registry.DATASETS))
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"folder holding <dataset>/<split>.csv (default: ${registry.DATA_ROOT_ENV}, else ./data)",
    )


def preprocess(dataset: str, data_root: str | None, splits: Sequence[str], workers: int | None) -> dict[str, float]:
    """Return seconds spent per split after reading (and caching) each split of ``dataset``."""
    from symat_jax.data import load_split

    timings = {}
    for split in splits:
        t0 = time.perf_counter()
        data = load_split(dataset, split, data_root, num_workers=workers)
        timings[split] = time.perf_counter() - t0
        counts = data.num_atoms
        print(
            f"{dataset}/{split}: {len(data)} crystals, atoms per cell {counts.min()}..{counts.max()} "
            f"(mean {counts.mean():.1f}), {int(data.num_edges.sum())} encoder edges, "
            f"{len(data.skipped)} rows skipped, {timings[split]:.2f} s"
        )
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``symat`` command line and return its exit status."""
    parser = argparse.ArgumentParser(prog="symat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preprocess", help="canonicalise a dataset and cache its CrystalNN graphs")
    _add_data_args(p)
    p.add_argument("--splits", nargs="+", default=list(registry.SPLITS), choices=registry.SPLITS)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "preprocess":
            preprocess(args.dataset, args.data_root, args.splits, args.workers)
    except (registry.DatasetNotFoundError, ValueError) as err:
        print(f"symat {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
