"""Fingerprint recovery: how close to a real crystal can the chain end? Perturb test crystals, run the chain down, compare.

``python -m experiments.fingerprint_recovery --workdir RUN --data-root D [--levels 12 20] [--variants default quench_steps=100 band=none]``

COV-P counts a generated crystal only when its CrystalNN structure
fingerprint lies within 0.2 of a test crystal's, which on Carbon-24 needs
positions to about 0.05 A (noise of sigma 0.05 A alone moves 12% of the test
crystals past 0.2). This check takes test crystals (their own posterior
``z_pos``), perturbs them at a trained level, runs the `default` preset from
that level down (with each variant's overrides; the preset's level spacing is
kept) and reports the fingerprint distance to the crystal it started from,
before and after the chain. A chain that cannot bring a perturbed real crystal
back within 0.2 cannot reach COV-P from noise either. ``--z-pos shuffled``
conditions each chain on the next test crystal's latent instead of its own:
equal recovery means the score network does not use the latent (BENCHMARKS.md,
session 8). Writes JSON lines to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from symat_jax import configs, geometry, metrics, sampling, score
from symat_jax.crystal_sets import CrystalSet

Array = jax.Array


def override(text: str) -> dict[str, Any]:
    """Return the sampler overrides of ``default`` or ``KEY=VALUE[,KEY=VALUE]`` (``none`` for an empty band) (argparse type)."""
    if text == "default":
        return {}
    out: dict[str, Any] = {}
    for item in re.split(r",(?![^\[]*\])", text):  # commas inside [..] belong to a list value
        key, _, value = item.partition("=")
        try:
            if key not in configs.SamplerConfig.__dataclass_fields__ or not value:
                raise ValueError(item)
            parsed = None if value == "none" else json.loads(value.lower() if value in ("True", "False") else value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a variant is default or KEY=VALUE of SamplerConfig, got {item!r}") from None
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def fingerprint_distances(crystals: CrystalSet, reference: metrics.CrystalScores) -> np.ndarray:
    """Return per crystal the structure-fingerprint distance to the same row of ``reference`` (NaN without fingerprints)."""
    scores = metrics.score_crystals(crystals, progress=False, cache=False)
    d = np.linalg.norm(scores.struct_fp - reference.struct_fp, axis=1)
    return np.where(scores.has_fingerprint & reference.has_fingerprint, d, np.nan)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and print one line per start level and variant."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--levels", type=int, nargs="+", default=[12, 20], help="start levels (of the trained 50)")
    p.add_argument("--variants", type=override, nargs="+", default=[{}])
    p.add_argument("--num", type=int, default=64, help="test crystals (the first with at most --max-atoms atoms)")
    p.add_argument("--max-atoms", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append each row to this JSON-lines file")
    p.add_argument("--z-pos", choices=("own", "shuffled"), default="own",
                   help="condition each crystal's chain on its own posterior z_pos or on another test crystal's "
                        "(does the chain use the latent?)")
    args = p.parse_args(argv)

    data = common.load_test_crystals(args.workdir, args.data_root, args.num, args.max_atoms)
    config, statics, params, meta = data.loaded
    m = config.model
    lattice, mask, types, z_pos, test = data.lattice, data.mask, data.types, data.z_pos, data.test
    if args.z_pos == "shuffled":
        z_pos = jnp.roll(z_pos, 1, axis=0)
    real = CrystalSet.from_dataset(test)
    reference = metrics.score_crystals(real, progress=False)
    clean = geometry.frac_to_cart(data.frac, lattice)
    sigmas = score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max)
    images = tuple(int(i) for i in np.maximum(np.asarray(statics.max_images), 3))

    def as_set(frac: Array) -> CrystalSet:
        return common.dense_crystal_set(types, mask, real.lengths, real.angles, frac)

    default = configs.get_sampler_config(config.dataset, "default")
    spacing = (m.num_levels - 1) / max(default.num_levels - 1, 1)  # the preset's levels are this far apart
    for level in args.levels:
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), level)
        noisy = jax.vmap(score.perturb)(clean, lattice, mask, jnp.full(mask.shape[:1], sigmas[level], jnp.float32),
                                        jax.random.normal(key, clean.shape))
        start = jax.vmap(geometry.wrap_frac)(geometry.cart_to_frac(noisy, lattice), mask)
        d0 = fingerprint_distances(as_set(start), reference)
        for variant in args.variants:
            cfg = configs.get_sampler_config(config.dataset, "default", top_level=level,
                                             num_levels=int(round(level / spacing)) + 1, **variant)
            t0 = time.perf_counter()
            frac, _ = jax.jit(lambda k, x0: sampling.langevin(params, k, types, mask, lattice, z_pos, statics=statics,
                                                              model=m, cfg=cfg, max_images=images, x0=x0))(
                jax.random.fold_in(key, 1), noisy)
            d1 = fingerprint_distances(as_set(frac), reference)
            row = {"start_level": level, "sigma": float(sigmas[level]), "variant": variant or "default", "z_pos": args.z_pos,
                   "crystals": len(test), "epoch": int(meta["epoch"]) + 1,
                   "start_median": float(np.nanmedian(d0)), "start_within_0.2": float(np.nanmean(d0 <= 0.2)),
                   "end_median": float(np.nanmedian(d1)), "end_within_0.2": float(np.nanmean(d1 <= 0.2)),
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(f"start sigma {row['sigma']:.3f} A, {variant or 'default'}, {args.z_pos} z_pos: fingerprint distance median "
                  f"{row['start_median']:.3f} -> {row['end_median']:.3f}, within 0.2: {100 * row['start_within_0.2']:.0f}% -> "
                  f"{100 * row['end_within_0.2']:.0f}% ({row['seconds']} s)", flush=True)
            common.append_jsonl(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
