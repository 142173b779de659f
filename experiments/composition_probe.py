"""Decoded compositions and lattices without the chain: rejects, SMACT validity, novelty and density by prior temperature.

``python -m experiments.composition_probe --workdir RUN [--num 1000] [--temperatures 1.0 0.8 0.6] [--data-root D]``

Composition validity and the cells rejected for too many atoms depend only
on the decoded compositions, so this check decodes ``--num`` latents from
the run's `default` preset (its fitted prior, EMA weights) and scores them
in seconds, before any Langevin chain. Each row: the prior temperature,
``fit_counts`` off (each count's argmax, the reference's decoding) or on
(the most likely counts that fit ``max_atoms``), rejected cells, SMACT
composition validity over all ``--num`` (a rejected cell counts as invalid,
as in the quality tables) and the number of distinct compositions; with
``--data-root``, also the share of written cells whose reduced formula is
in no training crystal (novel compositions: a prior that only returns the
training set scores well on coverage and finds nothing new) and the density
EMD against the test split (density depends on composition and lattice
only, which the chain does not change).
"""

from __future__ import annotations

import argparse
import dataclasses
import collections
import sys
from typing import Any, Sequence

import jax
import numpy as np

from symat_jax import configs, metrics, run, sampling
from symat_jax.crystals import CrystalSet
from symat_jax.data import load_split


def reduced_formula(atomic_numbers: Sequence[int]) -> str:
    """Return the reduced formula of one cell's atoms."""
    from pymatgen.core import Composition, Element

    return Composition({Element.from_Z(int(z)).symbol: n for z, n in collections.Counter(atomic_numbers).items()}).reduced_formula


def probe(loaded: run.LoadedRun, prior: Any, num: int, temperature: float, fit_counts: bool, seed: int = 0,
          known: set[str] | None = None, test_densities: np.ndarray | None = None) -> dict:
    """Return rejects, composition validity (%), distinct compositions, and (given ``known`` formulas / the test
    split's densities) the novel share (%) and the density EMD of ``num`` decoded latents."""
    config, statics, params, _ = loaded
    default = configs.get_sampler_preset(config.dataset, "default")
    z = sampling.sample_latents(jax.random.PRNGKey(seed), num, config.model, configs.FittedPrior(temperature), prior)
    dec = sampling.decode_crystals(params, z, jax.random.PRNGKey(seed + 1), model=config.model,
                                   decode=dataclasses.replace(default.decode, fit_counts=fit_counts), statics=statics)
    types, counts = np.asarray(dec.atom_types), np.asarray(dec.num_atoms)
    written = counts <= config.model.max_atoms
    kept = [t[t > 0].tolist() for t, ok in zip(types, written) if ok]
    valid = sum(metrics.smact_validity(t) for t in kept)
    novel = density_emd = None
    if known is not None and kept:
        novel = 100.0 * sum(reduced_formula(t) not in known for t in kept) / len(kept)
    if test_densities is not None and kept:
        cells = CrystalSet(counts[written], np.concatenate([np.asarray(t, np.int64) for t in kept]),
                           np.zeros((int(counts[written].sum()), 3)), np.asarray(dec.lengths, float)[written],
                           np.asarray(dec.angles, float)[written])
        d = cells.densities()
        density_emd = metrics.emd(d[np.isfinite(d)], test_densities)
    return {"prior_temperature": temperature, "fit_counts": fit_counts, "num": num, "rejected": num - len(kept),
            "comp_valid_pct": 100.0 * valid / num, "distinct": len({tuple(sorted(t)) for t in kept}),
            "novel_pct": novel, "density_emd": density_emd}


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per prior temperature and decoding."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.8, 0.6])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="also report novel compositions (not in the training split) and the density EMD against the test split")
    args = p.parse_args(argv)
    default = configs.get_sampler_preset(run.read_config(args.workdir).dataset, "default")
    loaded = run.load_run(args.workdir, default.checkpoint, default.weights)
    prior = run.load_prior(args.workdir)
    known = test_densities = None
    if args.data_root is not None:
        train, test = ((load_split(loaded.config.dataset, split, args.data_root,
                                                          with_graph=False, progress=False)).crystal_set() for split in ("train", "test"))
        known = {reduced_formula(train.crystal(i)[0]) for i in range(len(train))}
        test_densities = test.densities()
    print(f"{args.workdir}: epoch {int(loaded.meta['epoch']) + 1}, {args.num} latents from the fitted prior")
    for temperature in args.temperatures:
        for fit in (False, True):
            r = probe(loaded, prior, args.num, temperature, fit, args.seed, known, test_densities)
            novel = "" if r["novel_pct"] is None else f", {r['novel_pct']:.1f}% novel, density EMD {r['density_emd']:.3f}"
            print(f"prior temperature {temperature}, fit_counts {'on ' if fit else 'off'}: {r['rejected']} rejected, "
                  f"composition validity {r['comp_valid_pct']:.1f}%, {r['distinct']} distinct compositions{novel}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
