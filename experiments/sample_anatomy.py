"""Where generated carbon misses the test crystals: bonds, precision and the fingerprint's own tolerance.

``python -m experiments.sample_anatomy --samples DIR --data-root D [--noise 0.01 0.02 0.05 0.1]``

For the samples in ``DIR`` (``samples.npz``, Carbon-24) it prints:

* the nearest-neighbour distance of every atom with no neighbour within
  1.8 A (a stray atom far from all others, or a bond stretched just past 1.8 A?);
* the share of crystals whose atoms are all 3- or 4-fold, and for them and for
  the rest the structure-fingerprint distance to the nearest test crystal (COV-P
  needs <= 0.2 under CDVAE's cut-offs);
* the same distance from each test crystal to the nearest training crystal;
* how far Gaussian noise of each ``--noise`` sigma (A) moves a test crystal's
  own fingerprint: the positional precision a generated crystal needs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
from scipy.spatial.distance import cdist

from symat_jax import geometry, metrics
from symat_jax.coordination import crystal_coordination
from symat_jax.crystals import CrystalSet
from symat_jax.data import load_split


def quantiles(x: np.ndarray, qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> str:
    """Return the quantiles of ``x`` as text."""
    return " / ".join(f"{v:.3f}" for v in np.quantile(x, qs)) if len(x) else "-"


def noisy_copy(crystals: CrystalSet, sigma: float, rng: np.random.Generator) -> CrystalSet:
    """Return the crystals with cartesian Gaussian noise of ``sigma`` (A) on every atom."""
    frac = []
    for i in range(len(crystals)):
        _, lengths, angles, f = crystals.crystal(i)
        lattice = geometry.lattice_matrix_np(lengths, angles)
        frac.append((f @ lattice + sigma * rng.standard_normal(f.shape)) @ np.linalg.inv(lattice))
    return CrystalSet(crystals.num_atoms, crystals.atom_types, np.concatenate(frac), crystals.lengths, crystals.angles)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the anatomy of one sample folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="folder holding samples.npz (or the file)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--noise", type=float, nargs="*", default=[0.01, 0.02, 0.05, 0.1])
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    gen = CrystalSet.from_samples(args.samples)
    test = (load_split("carbon_24", "test", args.data_root, with_graph=False, progress=False)).crystal_set()
    train = (load_split("carbon_24", "train", args.data_root, with_graph=False, progress=False)).crystal_set()

    per_crystal = crystal_coordination(gen)  # per crystal: (neighbours within 1.8 A, nearest-neighbour distance)
    coordination = [c[0] if c is not None else np.zeros(0, int) for c in per_crystal]
    isolated_nn = np.concatenate([c[1][c[0] == 0] for c in per_crystal if c is not None] or [np.zeros(0)])
    print(f"atoms with no neighbour within 1.8 A: {len(isolated_nn)} of {int(gen.num_atoms.sum())}; their nearest "
          f"neighbour 10/25/50/75/90%: {quantiles(isolated_nn)} A; beyond 2.2 A: {np.mean(isolated_nn > 2.2) * 100:.1f}%")

    scores = {name: metrics.score_crystals(c, workers=args.workers, progress=False)
              for name, c in (("gen", gen), ("test", test), ("train", train))}
    ref = scores["test"].has_fingerprint
    nearest = np.full(len(gen), np.inf)  # a crystal without fingerprints is near nothing
    has = scores["gen"].has_fingerprint
    nearest[has] = cdist(scores["gen"].struct_fp[has], scores["test"].struct_fp[ref]).min(axis=1)
    bonded = np.array([len(cn) > 0 and bool(((cn == 3) | (cn == 4)).all()) for cn in coordination])
    print(f"crystals with every atom 3- or 4-fold: {100 * bonded.mean():.1f}%")
    for name, sel in (("all 3-4-fold", bonded), ("others", ~bonded)):
        print(f"  {name}: fingerprint distance to the nearest test crystal 10/25/50/75/90% {quantiles(nearest[sel])}, "
              f"within 0.2: {100 * np.mean(nearest[sel] <= 0.2):.1f}%")
    test_train = cdist(scores["test"].struct_fp, scores["train"].struct_fp).min(axis=1)
    print(f"test crystals to the nearest training crystal: {quantiles(test_train)}, within 0.2: "
          f"{100 * np.mean(test_train <= 0.2):.1f}%")
    rng = np.random.default_rng(0)
    for sigma in args.noise:
        moved = metrics.score_crystals(noisy_copy(test, sigma, rng), workers=args.workers, progress=False, cache=False)
        d = np.linalg.norm(moved.struct_fp - scores["test"].struct_fp, axis=1)
        print(f"noise sigma {sigma} A moves a test crystal's fingerprint by {quantiles(d)}; within 0.2: "
              f"{100 * np.mean(d <= 0.2):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
