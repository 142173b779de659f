"""One chain, two score networks: a later epoch's above a switch sigma, an earlier epoch's from there down.

``python -m experiments.two_score_chain --workdir RUN --low 40 [--high latest] [--switch 0.1] [--num 256] --out DIR``

The decoders, the prior and the latents are the ``--high`` checkpoint's
(``sampling.decode_batches``, the ``default`` preset's prior and decoding); the
chain runs ``--high``'s score network down to the last level above
``--switch`` (A), then continues from that state with ``--low``'s on the
remaining levels (band, final step). Writes ``DIR/samples.npz`` (CDVAE
layout) and ``DIR/summary.json``; prints the local structure. It asks
whether the later network's placement above the bonding band and the
earlier one's bonds in it combine (docs/quality-history.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from symat_jax import configs, geometry, input_pipeline, run, sampling
from symat_jax.coordination import local_structure

from experiments.common import dense_crystal_set


def main(argv: Sequence[str] | None = None) -> int:
    """Sample with the two-network chain and print its local structure."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--high", default="latest", help="checkpoint of the decoders and of the score above --switch")
    p.add_argument("--low", required=True, help="kept checkpoint whose score network runs from --switch down")
    p.add_argument("--switch", type=float, default=0.1, help="sigma (A) from which --low's network drives the chain")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    high = run.load_run(args.workdir, args.high, "ema")
    low = run.load_run(args.workdir, args.high, "ema", score_checkpoint=args.low)
    config, statics, params, meta = high
    model = config.model
    preset = configs.get_sampler_preset(config.dataset, "default")
    prior = run.load_prior(args.workdir) if isinstance(preset.prior, configs.FittedPrior) else None
    schedule = sampling.build_schedule(preset.chain, model, statics.score_norm)
    sigmas = np.asarray(schedule.sigmas)
    k = int(np.argmax(sigmas <= args.switch))
    if not 0 < k < len(schedule) or sigmas[k] > args.switch:
        raise ValueError(f"--switch {args.switch} leaves no level on one side (levels' sigma {sigmas[0]:.3g}-{sigmas[-1]:.3g} A)")
    t0 = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)
    dec = sampling.decode_batches(params, key, args.num, model=model, prior_cfg=preset.prior, decode=preset.decode,
                                  statics=statics, batch_size=args.num, prior=prior)
    atoms = np.concatenate(dec.atom_types)
    types, _, mask = input_pipeline.pad_atoms([len(t) for t in dec.atom_types], atoms, np.zeros((len(atoms), 3)),
                                              model.max_atoms)
    types, mask, z_pos = jnp.asarray(types), jnp.asarray(mask), jnp.asarray(dec.z_pos)
    lattice = jax.vmap(geometry.lattice_matrix)(jnp.asarray(dec.lengths), jnp.asarray(dec.angles))
    kx, ky = jax.random.split(jax.random.fold_in(key, 2))
    # Above the switch: the levels above it at their own step counts (they lie above the band), traced.
    upper = sampling.build_schedule(dataclasses.replace(preset.chain, band=None, final_denoise=None), model,
                                    statics.score_norm)
    images = tuple(statics.max_images)
    _, _, states = jax.jit(lambda prm: sampling.trace_chain(prm, kx, types, mask, lattice, z_pos, schedule=upper,
                                                            model=model, max_images=images))(params)
    lower = schedule.tail(k)
    frac, _ = jax.jit(lambda prm, x0: sampling.run_chain(prm, ky, types, mask, lattice, z_pos, x0, schedule=lower,
                                                         model=model, max_images=images))(
        low.params, geometry.frac_to_cart(states[k - 1], lattice))
    seconds = time.perf_counter() - t0
    cs = dense_crystal_set(types, mask, dec.lengths, dec.angles, np.asarray(frac))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", num_atoms=cs.num_atoms, atom_types=cs.atom_types, frac_coords=cs.frac_coords,
             lengths=cs.lengths, angles=cs.angles, sample_index=dec.index)
    ls = local_structure(cs)
    summary = {"workdir": args.workdir, "high_epoch": meta["score_epoch"], "low_epoch": low.meta["score_epoch"],
               "switch_sigma": float(sigmas[k]), "num_requested": args.num, "num_written": len(cs),
               "num_rejected": len(dec.rejects), "run_seconds": round(seconds, 2),
               "share_3_or_4": ls["share_3_or_4"], "share_isolated": ls["share_isolated"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
