"""Shared command line of the training experiments."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from symat_jax import cli
from symat_jax.data import registry


def train_main(dataset: str, argv: Sequence[str] | None, doc: str | None) -> int:
    """Parse the experiment's arguments, train ``dataset`` and return the exit status."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    cli.add_train_args(parser, workdir_default=f"workdirs/{dataset}")
    args = parser.parse_args(argv)
    args.dataset = dataset
    cli.setup_logging()
    try:
        cli.run_training(args)
    except (registry.DatasetNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
