"""Shared command line of the training experiments."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from symat_jax import cli, configs, geometry, input_pipeline, latents, loop, run
from symat_jax.crystals import CrystalSet
from symat_jax.data import CrystalDataset, load_split, registry


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
    except KeyboardInterrupt:
        print(f"interrupted; the last finished epoch is saved in {args.workdir}: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    except (registry.DatasetNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except loop.TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


class TestCrystals(NamedTuple):
    """A trained run (sampled as the `default` preset samples it) and real test crystals in its dense layout."""

    loaded: run.LoadedRun
    test: CrystalDataset
    z_pos: jax.Array  # [b, latent_pos] each crystal's own posterior mean
    lattice: jax.Array  # [b, 3, 3]
    frac: jax.Array  # [b, n, 3]
    mask: jax.Array  # [b, n]
    types: jax.Array  # [b, n]


def load_test_crystals(workdir: str, data_root: str | None, num: int, max_atoms: int) -> TestCrystals:
    """Return the run's `default` weights and its first ``num`` test crystals with at most ``max_atoms`` atoms."""
    default = configs.get_sampler_preset(run.read_config(workdir).dataset, "default")
    loaded = run.load_run(workdir, default.checkpoint, default.weights)
    config, statics, params, _ = loaded
    m = config.model
    test = load_split(config.dataset, "test", data_root, progress=False)
    test = test.subset(np.flatnonzero(test.num_atoms <= max_atoms)[:num])
    z = latents.encode_means(params, config, statics, test)
    dense = input_pipeline.dense_batch(test, np.arange(len(test)), max_atoms)
    lattice = geometry.lattice_matrix(jnp.asarray(dense["lengths"]), jnp.asarray(dense["angles"]))
    return TestCrystals(loaded, test, jnp.asarray(z[:, m.latent_comp : m.latent_comp + m.latent_pos]), lattice,
                        jnp.asarray(dense["frac_coords"]), jnp.asarray(dense["atom_mask"]),
                        jnp.asarray(dense["atomic_numbers"]))


def dense_crystal_set(types: np.ndarray, mask: np.ndarray, lengths: np.ndarray, angles: np.ndarray,
                      frac: np.ndarray) -> CrystalSet:
    """Return padded crystals (``types``/``mask [b, n]``, ``frac [b, n, 3]``) as a CrystalSet of their real atoms."""
    types, mask = np.asarray(types), np.asarray(mask)
    return CrystalSet(mask.sum(1).astype(np.int64), types[mask].astype(np.int64), np.asarray(frac)[mask].astype(float),
                      np.asarray(lengths, float), np.asarray(angles, float))


def append_jsonl(path: str | pathlib.Path | None, row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
