"""Does the Tersoff relaxation leave real crystals where they are, and bring noisy ones back? Fingerprint distances before and after.

``python -m experiments.relax_probe --data-root D [--num 48] [--sigmas 0 0.05 0.1 0.2] [--cells fixed free free:10]``

Takes the first ``--num`` test crystals of Carbon-24, moves every atom by
Gaussian noise of each sigma (A), relaxes them (``symat_jax.relax``: fixed
cell, or free cell at a pressure in GPa) and reports the CrystalNN structure
fingerprint distance to the crystal each started as (median, share within
CDVAE's 0.2), the density change and the relaxation's convergence. A
relaxation that moved real crystals away from themselves would cost coverage
rather than buy it; sigma 0.1 A is about as far as the generated bonded
crystals lie from their nearest test crystal (docs/quality-history.md, "Why COV-P stays low").
Prints one JSON line per sigma and cell mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np

from experiments.fingerprint_recovery import distance_summary, fingerprint_distances
from symat_jax import metrics, relax
from symat_jax.configs import RelaxConfig
from symat_jax.sampling import relax_crystals
from symat_jax.data.dataset import load_split


def cell_mode(text: str) -> RelaxConfig:
    """Return the relaxation ``fixed``, ``free`` or ``free:GPA`` names (argparse type)."""
    cell, _, pressure = text.partition(":")
    try:
        return RelaxConfig(cell=cell, pressure=float(pressure or 0.0))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe and print one JSON line per noise level and relaxation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None)
    p.add_argument("--num", type=int, default=48, help="the first test crystals")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    p.add_argument("--cells", type=cell_mode, nargs="+", default=[cell_mode("fixed")],
                   help="fixed, free (0 GPa) or free:GPA")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    test = (load_split("carbon_24", "test", args.data_root, with_graph=False, progress=False)).crystal_set()
    test = test.subset(np.arange(min(args.num, len(test))))
    reference = metrics.score_crystals(test, progress=False, cache=False)
    for sigma in args.sigmas:
        start = relax.rattle(test, sigma, np.random.default_rng(args.seed)) if sigma > 0 else test
        d0 = fingerprint_distances(start, reference)
        for cfg in args.cells:
            t0 = time.perf_counter()
            out = relax_crystals(start, cfg, progress=False)
            seconds = time.perf_counter() - t0
            d1 = fingerprint_distances(out.crystals, reference)
            rec = out.arrays["relax"]
            row = {"sigma": sigma, "cell": cfg.cell, "pressure_gpa": cfg.pressure, "crystals": len(test),
                   **distance_summary(d0, d1),
                   "density_ratio_median": float(np.median(out.crystals.densities() / test.densities())),
                   "kept": float(rec["kept"].mean()), "converged": float(rec["converged"].mean()),
                   "median_steps": float(np.median(rec["steps"])),
                   "energy_per_atom_median": float(np.nanmedian(rec["energy_per_atom"])), "seconds": round(seconds, 1)}
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
