"""Trace the generation chain level by level: at which noise level generated carbon forms, or loses, its bonds.

``python -m experiments.chain_trace --workdir RUN [RUN2 ...] --data-root D [--num 128] [--schedule LxS] [--out FILE.json]``

For each run (its `default` weights and fitted prior): ``--num`` latents
drawn and decoded as ``symat sample`` does, then the `default` chain with
``sampling.trace_chain`` (``--schedule LxS``: that many levels and steps
instead, without the band). After each level of the schedule it
reports, for the chain's state:

* the share of atoms with 3 or 4 neighbours within 1.8 A, with none, and the
  median nearest-neighbour distance;
* the same for **the data at that level**: ``--num`` test crystals (at most
  ``--max-atoms`` atoms) perturbed with the level's sigma, i.e. what the
  chain's state would look like if it followed the noised training
  distribution the score was trained on;
* the 1-Wasserstein distance between the two nearest-neighbour distance
  distributions (A): where it grows, the chain has left the distribution the
  network has seen;
* the network's relative squared score error on those perturbed test crystals
  (their own posterior ``z_pos``): how well it knows the data at that level.

Two runs side by side (e.g. epochs 80 and 160 of one run) say at which level
the longer-trained score's chain goes a different way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import wasserstein_distance

from experiments import common
from experiments.recovery import score_accuracy
from experiments.step_sweep import schedule
from symat_jax import configs, geometry, input_pipeline, run, sampling, score
from symat_jax.coordination import local_structure


def _stats(types: np.ndarray, mask: np.ndarray, lengths: np.ndarray, angles: np.ndarray,
           frac: np.ndarray) -> dict[str, Any]:
    """Return the local structure of padded crystals (3-4-fold and isolated shares, nearest-neighbour distances)."""
    out = local_structure(common.dense_crystal_set(types, mask, lengths, angles, frac))
    nn, q = out["nn_distances"], out["nn_distance_quantiles"]  # quantiles of the finite distances: 5/25/50/75/95%
    return {"share_3_or_4": out["share_3_or_4"], "share_isolated": out["share_isolated"],
            "nn_median": q[2] if q else float("nan"), "nn_distances": nn[np.isfinite(nn)]}


def trace_run(workdir: str, data_root: str | None, num: int, max_atoms: int, seed: int,
              **overrides: Any) -> dict[str, Any]:
    """Return the per-level trace of one run's `default` chain (``overrides``: ChainConfig fields) beside perturbed test crystals."""
    test = common.load_test_crystals(workdir, data_root, num, max_atoms)
    config, statics, params, meta = test.loaded
    m = config.model
    preset = configs.get_sampler_preset(config.dataset, "default")
    schedule = sampling.build_schedule(dataclasses.replace(preset.chain, **overrides), m, statics.score_norm)
    prior = run.load_prior(workdir)
    key = jax.random.PRNGKey(seed)
    kz, kd, kx, kn, ka = jax.random.split(key, 5)

    t0 = time.perf_counter()
    z = sampling.sample_latents(kz, num, m, preset.prior, prior)
    dec = sampling.decode_crystals(params, z, kd, model=m, decode=preset.decode, statics=statics)
    mask = dec.atom_types > 0
    lattice = geometry.lattice_matrix(dec.lengths, dec.angles)
    images = tuple(statics.max_images)
    frac, _, states = jax.jit(lambda p, k: sampling.trace_chain(p, k, dec.atom_types, mask, lattice, z.z_pos,
                                                                schedule=schedule, model=m, max_images=images))(params, kx)
    frac, states = np.asarray(frac), np.asarray(states)  # waits for the chain: the time below is its own
    seconds = time.perf_counter() - t0
    gen = [np.asarray(a) for a in (dec.atom_types, mask, dec.lengths, dec.angles)]

    levels, steps = schedule.levels, schedule.steps
    sigmas = score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max)
    dense = input_pipeline.dense_batch(test.test, np.arange(len(test.test)), max_atoms)
    data = [np.asarray(a) for a in (test.types, test.mask, dense["lengths"], dense["angles"])]
    clean = geometry.frac_to_cart(test.frac, test.lattice)
    accuracy = {a["level"]: a["relative_score_error"]
                for a in score_accuracy(params, config, statics, dense, np.asarray(test.z_pos), ka)}

    rows = []
    for i, level in enumerate(levels):
        eps = jax.random.normal(jax.random.fold_in(kn, int(level)), clean.shape)
        noisy = jax.vmap(score.perturb)(clean, test.lattice, test.mask,
                                        jnp.full(test.mask.shape[:1], sigmas[level], jnp.float32), eps)
        noisy_frac = jax.vmap(geometry.wrap_frac)(geometry.cart_to_frac(noisy, test.lattice), test.mask)
        chain = _stats(*gen, np.asarray(states[i]))
        ref = _stats(*data, np.asarray(noisy_frac))
        rows.append({"level": int(level), "sigma": float(sigmas[level]), "steps": int(steps[i]),
                     "chain": {k: v for k, v in chain.items() if k != "nn_distances"},
                     "data": {k: v for k, v in ref.items() if k != "nn_distances"},
                     "nn_w1": float(wasserstein_distance(chain["nn_distances"], ref["nn_distances"])),
                     "relative_score_error": float(accuracy[int(level)])})
    final = _stats(*gen, np.asarray(frac))
    return {"workdir": workdir, "epoch": int(meta["epoch"]) + 1, "weights": meta["weights"], "num": num,
            "seconds": round(seconds, 1), "rows": rows,
            "final": {k: v for k, v in final.items() if k != "nn_distances"}}


def main(argv: Sequence[str] | None = None) -> int:
    """Trace each run's chain and print the per-level tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", nargs="+", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--num", type=int, default=128, help="generated crystals, and test crystals perturbed per level")
    p.add_argument("--max-atoms", type=int, default=24, help="test crystals with at most this many atoms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", type=schedule, default=None,
                   help="LEVELSxSTEPS instead of the preset's chain (drops its band)")
    p.add_argument("--out", default=None, help="write the traces here as JSON")
    args = p.parse_args(argv)
    overrides = {} if args.schedule is None else dict(num_levels=args.schedule[0], steps_per_level=args.schedule[1],
                                                      band=None)
    traces = [trace_run(w, args.data_root, args.num, args.max_atoms, args.seed, **overrides) for w in args.workdir]
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(traces, indent=1))
    for t in traces:
        print(f"\n{t['workdir']} (epoch {t['epoch']}, {t['weights']} weights, {t['num']} crystals, {t['seconds']} s)")
        print(f"{'level':>5} {'sigma':>7} {'steps':>5} | {'chain 3-4':>9} {'isol':>5} {'NN med':>6} | "
              f"{'data 3-4':>8} {'isol':>5} {'NN med':>6} | {'NN W1':>6} {'score err':>9}")
        for r in t["rows"]:
            c, d = r["chain"], r["data"]
            print(f"{r['level']:5d} {r['sigma']:7.3f} {r['steps']:5d} | {c['share_3_or_4']:9.3f} "
                  f"{c['share_isolated']:5.3f} {c['nn_median']:6.3f} | {d['share_3_or_4']:8.3f} "
                  f"{d['share_isolated']:5.3f} {d['nn_median']:6.3f} | {r['nn_w1']:6.3f} {r['relative_score_error']:9.3f}")
        f = t["final"]
        print(f"final (after the denoising step): 3-4-fold {f['share_3_or_4']:.3f}, isolated {f['share_isolated']:.3f}, "
              f"NN median {f['nn_median']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
