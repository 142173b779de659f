"""Sampler throughput: ``python -m benchmarks.sampler_bench --workdir W [--levels L --steps S]``.

For batch sizes 64, 256 and 1024 it samples from the trained run in ``W`` and
prints compile time, run time, time per Langevin step, crystals per second at
the measured setting and at the paper setting (50 x 100 steps, extrapolated
from the measured per-step time: the loop is one compiled program with a
constant cost per step), and the share of padded atoms. The baseline in the
same run pads every crystal to ``max_atoms`` (one bucket).
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import time

import jax

from symat_jax import configs, sampling
from symat_jax.run import read_config

PAPER_STEPS = 50 * 100


def measure(run: sampling.SamplingRun, preset: configs.SamplerPreset, num: int, bucket_multiple: int,
            seed: int) -> dict:
    """Return timings of one sampling call of ``num`` crystals in one chunk."""
    t0 = time.perf_counter()
    res = sampling.sample(run, preset, num, seed, batch_size=num, bucket_multiple=bucket_multiple, progress=False)
    total = time.perf_counter() - t0
    steps = sampling.build_schedule(preset.chain, run.model, run.statics.score_norm).total_steps
    chain = res.records["chain"]
    n = len(res)
    return {
        "crystals": n,
        "rejected": len(res.rejects),
        "compile_s": round(chain["compile_seconds"], 2),
        "run_s": round(chain["run_seconds"], 2),
        "total_s": round(total, 2),
        "ms_per_step": round(1000 * chain["run_seconds"] / steps, 2),
        "crystals_per_s": round(n / chain["run_seconds"], 2),
        "paper_crystals_per_s": round(n / (chain["run_seconds"] / steps * PAPER_STEPS), 3),
        "padded_atom_share": round(chain["padded_atom_share"], 3),
    }


def main() -> None:
    """Run the benchmark and print one JSON line per (batch size, variant)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    args = parser.parse_args()
    paper = configs.get_sampler_preset(read_config(args.workdir).dataset, "paper")
    preset = dataclasses.replace(paper, stages=(dataclasses.replace(paper.chain, num_levels=args.levels,
                                                                   steps_per_level=args.steps),))
    run = sampling.load_sampling_run(args.workdir, preset)
    print(f"device: {jax.devices()[0].device_kind}; levels x steps = {args.levels} x {args.steps}")
    for b in args.batch_sizes:
        bucketed = measure(run, preset, b, 4, seed=b)
        padded = measure(run, preset, b, run.model.max_atoms, seed=b)
        bucketed["speedup_vs_padded"] = round(padded["run_s"] / bucketed["run_s"], 2)
        print(json.dumps({"batch": b, "variant": "size buckets", **bucketed}))
        print(json.dumps({"batch": b, "variant": "baseline: pad to max_atoms", **padded}))


if __name__ == "__main__":
    main()
