"""Sweep the `default` chain's step fraction and length on a trained run, judged by local structure (no CDVAE scoring).

``python -m experiments.step_sweep --workdir RUN --num 256 --fractions 0.05 0.02 --schedules 25x10 50x10 [--bands none 0.1:1:100] [--weights raw ema]``

Each setting samples the same latents (same seed) and prints the share of
atoms with 3 or 4 neighbours within 1.8 A, of isolated atoms, and the
nearest-neighbour distance quantiles; ``--out`` appends them as JSON lines.
A fast probe for choosing the sampler: the full table is
``experiments.quality_study``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from typing import Any, Sequence

from experiments import common
from symat_jax import configs, run, sampling
from symat_jax.coordination import local_structure
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


def probe(loaded: run.LoadedRun, prior: MixturePrior, fraction: float, levels: int, steps: int, num: int, seed: int,
          batch_size: int, level_band: tuple[float, float, int] | None = None) -> dict[str, Any]:
    """Return the local structure of ``num`` crystals of the `default` preset's chain and retry (one network) at one setting."""
    config, statics, params, meta = loaded
    default = configs.get_sampler_preset(config.dataset, "default").without(configs.RelaxConfig)
    chain = dataclasses.replace(default.chain, step_scale=fraction, num_levels=levels, steps_per_level=steps,
                                band=level_band)
    preset = default.replace_stage(chain)
    t0 = time.perf_counter()
    result = sampling.sample(sampling.SamplingRun(config.dataset, config.model, statics, params, prior), preset, num,
                             seed, batch_size=batch_size, progress=False)
    local = local_structure(result.crystals)
    return {"weights": meta["weights"], "epoch": int(meta["epoch"]) + 1, "step_fraction": fraction,
            "schedule": f"{levels}x{steps}", "band": level_band, "num": num,
            "seconds": round(time.perf_counter() - t0, 1), **{k: v for k, v in local.items() if k != "nn_distances"}}


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
    p.add_argument("--weights", nargs="+", choices=("raw", "ema"), default=["ema"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="append each setting's line to this JSON-lines file")
    args = p.parse_args(argv)
    prior = run.load_prior(args.workdir)
    for weights in args.weights:
        default = configs.get_sampler_preset(run.read_config(args.workdir).dataset, "default")
        loaded = run.load_run(args.workdir, default.checkpoint, weights)
        for levels, steps in args.schedules:
            for fraction, level_band in itertools.product(args.fractions, args.bands):
                row = probe(loaded, prior, fraction, levels, steps, args.num, args.seed, args.batch_size, level_band)
                q = row["nn_distance_quantiles"]
                print(f"{weights} {row['schedule']} f={fraction} band={level_band}: 3-4-fold {100 * row['share_3_or_4']:.1f}%, "
                      f"isolated {100 * row['share_isolated']:.1f}%, nearest neighbour 5/50/95% "
                      f"{q[0]:.2f}/{q[2]:.2f}/{q[4]:.2f} A ({row['seconds']} s)", flush=True)
                common.append_jsonl(args.out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
