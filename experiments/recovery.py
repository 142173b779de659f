"""Recovery check: perturb real crystals to a noise level, run the Langevin chain down from there, count the bonds.

``python -m experiments.recovery --workdir RUN --data-root D [--levels 5 10 20 25 30 40 49] [--step-sizes 1e-4 1e-5]``

For each start level and sampler variant: the test crystals (with at most
``--max-atoms`` atoms, their own posterior ``z_pos``) are perturbed with that
level's sigma, then annealed from that level to the lowest. Reported per row:
the share of atoms with 3 or 4 neighbours within 1.8 A and with none, the
median nearest-neighbour distance (the data's own values on the first row),
and, per level, the accuracy of the score (relative squared error of the
per-atom prediction against its target) and the mean step length against the
mean distance still to go. Writes ``recovery.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from symat_jax import configs, geometry, input_pipeline, latents, run, sampling, score
from symat_jax.coordination import local_structure
from symat_jax.data import load_split
from symat_jax.model import coordinate_scores

log = logging.getLogger("recovery")


def score_accuracy(params: Any, config: configs.TrainConfig, statics: run.RunStatics, dense: dict[str, np.ndarray],
                   z_pos: np.ndarray, key: jax.Array) -> list[dict[str, float]]:
    """Return per level: relative squared error of the predicted normalised per-atom score, and the step/target ratio."""
    m = config.model
    sigmas = score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max)
    lattice = geometry.lattice_matrix(jnp.asarray(dense["lengths"]), jnp.asarray(dense["angles"]))
    clean = geometry.frac_to_cart(jnp.asarray(dense["frac_coords"]), lattice)
    mask = jnp.asarray(dense["atom_mask"])
    types = jnp.asarray(dense["atomic_numbers"])
    graph_config = score.ScoreGraphConfig(m.score_cutoff, m.score_neighbors, statics.max_images)

    @jax.jit
    def one(level_sigma, norm, alpha, k):
        eps = jax.random.normal(k, clean.shape)
        noisy = jax.vmap(score.perturb)(clean, lattice, mask, jnp.broadcast_to(level_sigma, mask.shape[:1]), eps)
        pred, nl = coordinate_scores(params, m, noisy, lattice, types, mask, jnp.asarray(z_pos), graph_config=graph_config)
        target = jax.vmap(score.score_target)(clean, noisy, lattice, nl) / norm
        w = mask[..., None]
        rel = jnp.sum(jnp.where(w, (pred - target) ** 2, 0)) / jnp.maximum(jnp.sum(jnp.where(w, target**2, 0)), 1e-12)
        aligned = jax.vmap(geometry.nearest_image)(clean, noisy, lattice)
        to_go = jnp.sum(jnp.where(mask, jnp.linalg.norm(aligned - noisy, axis=-1), 0)) / jnp.sum(mask)
        step = jnp.sum(jnp.where(mask, jnp.linalg.norm(alpha * pred / norm, axis=-1), 0)) / jnp.sum(mask)
        return rel, to_go, step

    out = []
    alphas = configs.ChainConfig().step_scale * (sigmas / sigmas[0]) ** 2  # the paper's step at every level
    for level, sigma in enumerate(sigmas):
        rel, to_go, step = one(jnp.float32(sigma), jnp.float32(statics.score_norm[level]), jnp.float32(alphas[level]),
                               jax.random.fold_in(key, level))
        out.append({"level": level, "sigma": float(sigma), "relative_score_error": float(rel),
                    "mean_distance_to_go": float(to_go), "mean_step_at_1e-4": float(step)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recovery check and print its table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="latest", choices=run.CHECKPOINT_CHOICES)
    p.add_argument("--levels", type=int, nargs="+", default=[5, 10, 15, 20, 25, 30, 40, 49])
    p.add_argument("--step-sizes", type=float, nargs="*", default=[1e-4, 1e-5], help="paper schedule's base step sizes")
    p.add_argument("--fractions", type=float, nargs="+", default=[],
                   help="step fractions of the 'norm' schedule (alpha_t = f norm(sigma_t)^2)")
    p.add_argument("--steps", type=int, default=100, help="Langevin steps per level")
    p.add_argument("--langevin-fractions", type=float, nargs="+", default=[],
                   help="step fractions of annealed Langevin at unit temperature (norm steps, noise sigma_t)")
    p.add_argument("--denoise-scales", type=float, nargs="+", default=[0.0])
    p.add_argument("--max-atoms", type=int, default=8)
    p.add_argument("--num", type=int, default=64, help="test crystals used")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config, statics, params, meta = run.load_run(args.workdir, args.checkpoint)
    test = load_split(config.dataset, "test", args.data_root, progress=False)
    keep = np.flatnonzero(test.num_atoms <= args.max_atoms)[: args.num]
    test = test.subset(keep)
    z_all = latents.encode_means(params, config, statics, test)
    z_pos = z_all[:, config.model.latent_comp : config.model.latent_comp + config.model.latent_pos]
    n_pad = args.max_atoms
    dense = input_pipeline.dense_batch(test, np.arange(len(test)), n_pad)
    data_stats = local_structure(test.crystal_set())
    rows: list[dict[str, Any]] = [{"start_level": None, "variant": "data", **{k: v for k, v in data_stats.items()
                                                                              if k != "nn_distances"}}]
    key = jax.random.PRNGKey(args.seed)
    accuracy = score_accuracy(params, config, statics, dense, z_pos, jax.random.fold_in(key, 1))

    lattice = geometry.lattice_matrix(jnp.asarray(dense["lengths"]), jnp.asarray(dense["angles"]))
    clean = geometry.frac_to_cart(jnp.asarray(dense["frac_coords"]), lattice)
    mask = jnp.asarray(dense["atom_mask"])
    types = jnp.asarray(dense["atomic_numbers"])
    sigmas = score.noise_levels(config.model.num_levels, config.model.sigma_min, config.model.sigma_max)
    for level in args.levels:
        eps = jax.random.normal(jax.random.fold_in(key, 100 + level), clean.shape)
        noisy = jax.vmap(score.perturb)(clean, lattice, mask, jnp.full(mask.shape[:1], sigmas[level], jnp.float32), eps)
        start_frac = np.asarray(jax.vmap(geometry.wrap_frac)(geometry.cart_to_frac(noisy, lattice), mask))
        start_stats = local_structure(common.dense_crystal_set(dense["atomic_numbers"], dense["atom_mask"], dense["lengths"],
                                                dense["angles"], start_frac))
        rows.append({"start_level": level, "variant": "perturbed start", "sigma": float(sigmas[level]),
                     **{k: v for k, v in start_stats.items() if k != "nn_distances"}})
        variants = [("paper", v, f"step {v:g}") for v in args.step_sizes]
        variants += [("norm", v, f"norm-step f={v:g}") for v in args.fractions]
        variants += [("langevin", v, f"langevin f={v:g}") for v in args.langevin_fractions]
        for schedule, value, name in variants:
            for scale in args.denoise_scales:
                step = {"step_scale": value}
                if schedule == "langevin":
                    schedule, step = "norm", {**step, "noise_schedule": "sigma", "temp_coord": 1.0}
                chain = dataclasses.replace(configs.get_sampler_preset(config.dataset, "paper").chain,
                                            steps_per_level=args.steps, step_schedule=schedule, **step,
                                            final_denoise=scale or None)
                # Every trained level from the start level down: the study's own schedule.
                plan = sampling.build_schedule(chain, config.model, statics.score_norm, levels=range(level, -1, -1))
                t0 = time.perf_counter()
                frac, _ = jax.jit(lambda k, x0: sampling.run_chain(params, k, types, mask, lattice, jnp.asarray(z_pos), x0,
                                                                   schedule=plan, model=config.model,
                                                                   max_images=tuple(statics.max_images)))(
                    jax.random.fold_in(key, 200 + level), noisy)
                stats = local_structure(common.dense_crystal_set(dense["atomic_numbers"], dense["atom_mask"], dense["lengths"],
                                                  dense["angles"], np.asarray(frac)))
                row = {"start_level": level, "variant": name + (f", denoise x{scale:g}" if scale else ""),
                       "sigma": float(sigmas[level]), "seconds": round(time.perf_counter() - t0, 1),
                       **{k: v for k, v in stats.items() if k != "nn_distances"}}
                rows.append(row)
                log.info("level %2d %-22s 3-4-fold %.3f  isolated %.3f  NN median %.3f", level, row["variant"],
                         row["share_3_or_4"], row["share_isolated"], row["nn_distance_quantiles"][2])
    report = {"workdir": str(args.workdir), "checkpoint_epoch": int(meta["epoch"]) + 1, "crystals": len(test),
              "steps_per_level": args.steps, "rows": rows, "score_accuracy": accuracy}
    (out / "recovery.json").write_text(json.dumps(report, indent=1))
    print(f"{'start':>5} {'variant':<24} {'3-4 fold':>8} {'isolated':>8} {'NN median':>9}")
    for r in rows:
        q = r["nn_distance_quantiles"]
        print(f"{str(r['start_level']):>5} {r['variant']:<24} {r['share_3_or_4']:8.3f} {r['share_isolated']:8.3f} "
              f"{(q[2] if q else float('nan')):9.3f}")
    print("level  sigma   rel. score error  distance to go  step at 1e-4")
    for a in accuracy[::5] + [accuracy[-1]]:
        print(f"{a['level']:5d} {a['sigma']:7.3f} {a['relative_score_error']:17.3f} {a['mean_distance_to_go']:15.3f} "
              f"{a['mean_step_at_1e-4']:13.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
