"""Structural validity of generated crystals: ``python -m experiments.structural_validity --samples DIR [--dataset D]``.

Reads ``DIR/samples.npz`` (CDVAE layout) and ``DIR/rejects.json``, prints the
share of crystals that are constructed with every periodic distance >= 0.5 A
(rejects count as invalid), and the atom-count distribution of the samples
beside that of the dataset's test split.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import Counter

import numpy as np

from symat_jax.data import load_split
from symat_jax.metrics import build_crystal, structure_validity


def main() -> None:
    """Print structural validity and atom-count distributions as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--dataset", default="carbon_24")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    folder = pathlib.Path(args.samples)
    z = np.load(folder / "samples.npz")
    rejects = json.loads((folder / "rejects.json").read_text()) if (folder / "rejects.json").exists() else []
    starts = np.concatenate([[0], np.cumsum(z["num_atoms"])])
    crystals = [
        build_crystal(z["atom_types"][a:b], z["lengths"][i], z["angles"][i], z["frac_coords"][a:b])
        for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))
    ]
    valid = structure_validity(crystals)
    total = len(crystals) + len(rejects)
    test = load_split(args.dataset, "test", args.data_root, with_graph=False, progress=False)
    print(json.dumps({
        "samples": total,
        "written": len(crystals),
        "rejected": len(rejects),
        "struct_validity": round(float(valid.sum()) / max(total, 1), 4),
        "atom_counts_samples": dict(sorted(Counter(int(n) for n in z["num_atoms"]).items())),
        "atom_counts_test": dict(sorted(Counter(int(n) for n in test.num_atoms).items())),
    }, indent=1))


if __name__ == "__main__":
    main()
