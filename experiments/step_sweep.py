"""Sweep the `default` chain's step fraction and length on a trained run, judged by local structure (no CDVAE scoring).

``python -m experiments.step_sweep --workdir RUN --num 256 --fractions 0.05 0.02 --schedules 25x10 50x10 [--bands none 0.1:1:100] [--restarts none 2:0.3] [--weights raw ema]``

Each setting samples the same latents (same seed) and prints the share of
atoms with 3 or 4 neighbours within 1.8 A, of isolated atoms, and the
nearest-neighbour distance quantiles; ``--out`` appends them as JSON lines.
A fast probe for choosing the sampler: the full table is
``experiments.quality_study``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any, Sequence

import jax

from experiments import common
from symat_jax import configs, run, sampling
from symat_jax.coordination import local_structure
from symat_jax.crystals import CrystalSet
from symat_jax.prior import MixturePrior


def schedule(text: str) -> tuple[int, int]:
    """Return ``(levels, steps per level)`` of ``LxS`` (argparse type)."""
    try:
        levels, steps = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a schedule is LEVELSxSTEPS, e.g. 25x10; got {text!r}") from None
    return levels, steps


def band(text: str) -> tuple[float, float, int] | None:
    """Return ``(low sigma, high sigma, steps)`` of ``LOW:HIGH:STEPS``, or None for ``none`` (argparse type)."""
    if text.lower() == "none":
        return None
    try:
        lo, hi, steps = text.split(":")
        return float(lo), float(hi), int(steps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a band is LOW:HIGH:STEPS (sigma in A), e.g. 0.1:1:100, or none; got {text!r}") from None


# No restart, at the sampler's own restart_sigma.
NO_RESTART = (0, configs.SamplerConfig.restart_sigma)


def restart(text: str) -> tuple[int, float]:
    """Return ``(restarts, sigma)`` of ``COUNT:SIGMA``, or :data:`NO_RESTART` for ``none`` (argparse type)."""
    if text.lower() == "none":
        return NO_RESTART
    try:
        count, sigma = text.split(":")
        return int(count), float(sigma)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a restart is COUNT:SIGMA (sigma in A), e.g. 2:0.3, or none; got {text!r}") from None


def probe(loaded: run.LoadedRun, prior: MixturePrior, fraction: float, levels: int, steps: int, num: int, seed: int,
          batch_size: int, level_band: tuple[float, float, int] | None = None,
          restarts: tuple[int, float] = NO_RESTART) -> dict[str, Any]:
    """Return the local structure of ``num`` crystals sampled with the `default` preset at one setting."""
    config, statics, params, meta = loaded
    extra = dict(band=None) if level_band is None else dict(band=level_band[:2], band_steps=level_band[2])
    extra.update(restarts=restarts[0], restart_sigma=restarts[1])
    cfg = configs.get_sampler_config(config.dataset, "default", step_fraction=fraction, num_levels=levels,
                                     steps_per_level=steps, **extra)
    t0 = time.perf_counter()
    result = sampling.sample(params, jax.random.PRNGKey(seed), num, statics=statics, model=config.model, cfg=cfg,
                             batch_size=batch_size, prior=prior, progress=False)
    local = local_structure(CrystalSet(**{k: v for k, v in result.to_cdvae().items() if k != "sample_index"}))
    return {"weights": meta["weights"], "epoch": int(meta["epoch"]) + 1, "step_fraction": fraction,
            "schedule": f"{levels}x{steps}", "band": level_band, "restarts": list(restarts), "num": num, "seconds": round(time.perf_counter() - t0, 1),
            **{k: v for k, v in local.items() if k != "nn_distances"}}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and print one line per setting."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05])
    p.add_argument("--schedules", type=schedule, nargs="+", default=[(25, 10)])
    p.add_argument("--bands", type=band, nargs="+", default=[None],
                   help="LOW:HIGH:STEPS: levels with sigma in [LOW, HIGH] A run STEPS steps; none (default): every level runs "
                        "the schedule's steps (the `default` preset's band is 0.03:0.1:1000)")
    p.add_argument("--restarts", type=restart, nargs="+", default=[NO_RESTART],
                   help="COUNT:SIGMA: after the chain, noise back to SIGMA A and anneal again, COUNT times; none (default)")
    p.add_argument("--weights", nargs="+", choices=("raw", "ema"), default=["ema"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="append each setting's line to this JSON-lines file")
    args = p.parse_args(argv)
    prior = run.load_prior(args.workdir)
    for weights in args.weights:
        loaded = run.load_run(args.workdir, configs.sampler_checkpoint("default"), weights)
        for levels, steps in args.schedules:
            for fraction, level_band, rs in itertools.product(args.fractions, args.bands, args.restarts):
                row = probe(loaded, prior, fraction, levels, steps, args.num, args.seed, args.batch_size, level_band, rs)
                q = row["nn_distance_quantiles"]
                print(f"{weights} {row['schedule']} f={fraction} band={level_band} restarts={rs}: 3-4-fold {100 * row['share_3_or_4']:.1f}%, "
                      f"isolated {100 * row['share_isolated']:.1f}%, nearest neighbour 5/50/95% "
                      f"{q[0]:.2f}/{q[2]:.2f}/{q[4]:.2f} A ({row['seconds']} s)", flush=True)
                common.append_jsonl(args.out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
