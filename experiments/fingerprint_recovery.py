"""Fingerprint recovery: how close to a real crystal can the chain end? Perturb test crystals, run the chain down, compare.

``python -m experiments.fingerprint_recovery --workdir RUN --data-root D [--levels 12 20] [--variants default final_denoise=none band=none]``

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
equal recovery means the score network does not use the latent (docs/quality-history.md,
"Where the chain loses the crystal"). Writes JSON lines to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from symat_jax import configs, geometry, metrics, sampling, score
from symat_jax.crystals import CrystalSet
from symat_jax.sampling.schedule import spread_levels

Array = jax.Array


def override(text: str) -> dict[str, Any]:
    """Return the chain overrides of ``default`` or ``KEY=VALUE[,KEY=VALUE]`` of ChainConfig (``none``: None) (argparse type)."""
    if text == "default":
        return {}
    out: dict[str, Any] = {}
    for item in re.split(r",(?![^\[]*\])", text):  # commas inside [..] belong to a list value
        key, _, value = item.partition("=")
        try:
            if key not in configs.ChainConfig.__dataclass_fields__ or not value:
                raise ValueError(item)
            parsed = None if value == "none" else json.loads(value.lower() if value in ("True", "False") else value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a variant is default or KEY=VALUE of ChainConfig, got {item!r}") from None
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


class Probe(NamedTuple):
    """Test crystals ready to perturb: the loaded run and crystals, their fingerprints, cartesian positions, levels."""

    data: common.TestCrystals
    reference: metrics.CrystalScores
    clean: Array
    sigmas: np.ndarray
    max_images: tuple[int, ...]


def load_probe(workdir: str, data_root: str | None, num: int, max_atoms: int) -> Probe:
    """Return the run's first ``num`` test crystals of at most ``max_atoms`` atoms with what both recovery checks need."""
    data = common.load_test_crystals(workdir, data_root, num, max_atoms)
    config, statics, _, _ = data.loaded
    m = config.model
    reference = metrics.score_crystals(data.test.crystal_set(), progress=False)
    images = tuple(int(i) for i in np.maximum(np.asarray(statics.max_images), 3))
    return Probe(data, reference, geometry.frac_to_cart(data.frac, data.lattice),
                 score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max), images)


def perturb_at(probe: Probe, level: int, key: Array) -> Array:
    """Return ``[b, n, 3]`` the probe's crystals (cartesian, wrapped) perturbed at trained ``level``."""
    d = probe.data
    sigma = jnp.full(d.mask.shape[:1], probe.sigmas[level], jnp.float32)
    return jax.vmap(score.perturb)(probe.clean, d.lattice, d.mask, sigma, jax.random.normal(key, probe.clean.shape))


def distance_summary(start: np.ndarray, end: np.ndarray) -> dict[str, float]:
    """Return the median and the share within CDVAE's 0.2 of fingerprint distances before and after a chain."""
    return {"start_median": float(np.nanmedian(start)), "start_within_0.2": float(np.nanmean(start <= 0.2)),
            "end_median": float(np.nanmedian(end)), "end_within_0.2": float(np.nanmean(end <= 0.2))}


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

    probe = load_probe(args.workdir, args.data_root, args.num, args.max_atoms)
    data, reference, sigmas, images = probe.data, probe.reference, probe.sigmas, probe.max_images
    config, statics, params, meta = data.loaded
    m = config.model
    lattice, mask, types, z_pos, test = data.lattice, data.mask, data.types, data.z_pos, data.test
    if args.z_pos == "shuffled":
        z_pos = jnp.roll(z_pos, 1, axis=0)

    def as_set(frac: Array) -> CrystalSet:
        return common.dense_crystal_set(types, mask, test.lengths, test.angles, frac)

    default = configs.get_sampler_preset(config.dataset, "default").chain
    spacing = (m.num_levels - 1) / max(default.num_levels - 1, 1)  # the preset's levels are this far apart
    for level in args.levels:
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), level)
        noisy = perturb_at(probe, level, key)
        start = jax.vmap(geometry.wrap_frac)(geometry.cart_to_frac(noisy, lattice), mask)
        d0 = fingerprint_distances(as_set(start), reference)
        for variant in args.variants:
            # The preset's level spacing, from the start level down: the study's own schedule.
            levels = spread_levels(int(round(level / spacing)) + 1, level)
            plan = sampling.build_schedule(dataclasses.replace(default, **variant), m, statics.score_norm, levels=levels)
            t0 = time.perf_counter()
            frac, _ = jax.jit(lambda k, x0: sampling.run_chain(params, k, types, mask, lattice, z_pos, x0, schedule=plan,
                                                               model=m, max_images=images))(
                jax.random.fold_in(key, 1), noisy)
            d1 = fingerprint_distances(as_set(frac), reference)
            row = {"start_level": level, "sigma": float(sigmas[level]), "variant": variant or "default", "z_pos": args.z_pos,
                   "crystals": len(test), "epoch": int(meta["epoch"]) + 1, **distance_summary(d0, d1),
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(f"start sigma {row['sigma']:.3f} A, {variant or 'default'}, {args.z_pos} z_pos: fingerprint distance median "
                  f"{row['start_median']:.3f} -> {row['end_median']:.3f}, within 0.2: {100 * row['start_within_0.2']:.0f}% -> "
                  f"{100 * row['end_within_0.2']:.0f}% ({row['seconds']} s)", flush=True)
            common.append_jsonl(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
