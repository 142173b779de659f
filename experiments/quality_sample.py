"""Sampling stage of the quality study: every sampler variant from one run into ``ROOT/<variant>/``.

``python -m experiments.quality_sample --workdir RUN --root ROOT [--num 1000] [--variants paper gmm ...]``

Writes ``samples.npz`` (CDVAE layout), ``rejects.json`` and ``summary.json``
per variant, skipping variants already sampled (resumable). Needs neither
pymatgen nor the data files, so it runs as a batch job on an accelerator;
``experiments.quality_study`` scores the folders on the host.
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
import numpy as np

from symat_jax import configs, relax, relax_cli, run, sampling

log = logging.getLogger("quality_sample")

# name -> (sampler preset, checkpoint, overrides); each row adds one change to the one above it. An override
# "weights" ("raw" | "ema") picks the parameters (default: the preset's, configs.sampler_weights).
LANGEVIN = dict(step_schedule="norm", noise_schedule="sigma", temp_coord=1.0)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "paper": ("paper", "best", {}),
    "paper_latest": ("paper", "latest", {}),
    "gmm": ("paper", "latest", dict(prior="fitted")),
    "gmm_langevin": ("paper", "latest", dict(prior="fitted", step_fraction=0.05, **LANGEVIN)),
    "gmm_langevin_denoise": ("paper", "latest", dict(prior="fitted", step_fraction=0.05, final_denoise=True,
                                                     denoise_scale=0.35, **LANGEVIN)),
    "gmm_langevin_quiet": ("paper", "latest", dict(prior="fitted", step_fraction=0.05, quiet_levels=10, **LANGEVIN)),
    "gmm_langevin_50x10": ("paper", "latest", dict(prior="fitted", step_fraction=0.05, steps_per_level=10, **LANGEVIN)),
    "gmm_langevin_25x10": ("paper", "latest", dict(prior="fitted", step_fraction=0.05, num_levels=25, steps_per_level=10,
                                                   **LANGEVIN)),
    "default": ("default", "latest", {}),
    # The default chain before the band (sessions 3-5): 50 x 100, and its short versions.
    "default_50x100": ("default", "latest", dict(num_levels=50, steps_per_level=100, band=None)),
    "default_50x10": ("default", "latest", dict(num_levels=50, steps_per_level=10, band=None)),
    "default_25x10": ("default", "latest", dict(num_levels=25, steps_per_level=10, band=None)),
    "default_band300": ("default", "latest", dict(band_steps=300)),
    "default_quench100": ("default", "latest", dict(quench_steps=100)),
    "default_bandtemp05": ("default", "latest", dict(band_temp=0.5)),
    "default_bandtemp02": ("default", "latest", dict(band_temp=0.2)),
    "default_raw": ("default", "latest", dict(weights="raw")),
    "default_ema": ("default", "latest", dict(weights="ema")),
    "default_25x10_raw": ("default", "latest", dict(num_levels=25, steps_per_level=10, band=None, weights="raw")),
    "default_25x10_ema": ("default", "latest", dict(num_levels=25, steps_per_level=10, band=None, weights="ema")),
    # The score network from an earlier checkpoint of the run (which must be kept), the rest from the latest.
    "default_score40": ("default", "latest", dict(score_checkpoint="40")),
    "default_score60": ("default", "latest", dict(score_checkpoint="60")),
    # `default` runs a second chain for Carbon-24 crystals with an atom not 3- or 4-fold within 1.8 A, with the
    # score network of epoch 40 (configs.DEFAULT_SAMPLER_BY_DATASET); without it, and with the same network.
    "default_noretry": ("default", "latest", dict(retry_coordination=())),
    "default_retry_same": ("default", "latest", dict(retry_coordination=(3, 4), retry_checkpoint="latest")),
    # The default chain and retry before the relaxation (the `default` preset relaxes after them, RELAXED_OF).
    "default_unrelaxed": ("default", "latest", {}),
}
# The crystals of another variant (sampled first where missing), relaxed in Tersoff's carbon potential at fixed
# cell (symat_jax.relax), as the `default` preset does after its chains: kept where no atom leaves 3-4-fold
# coordination within 1.8 A (GUARDED) or always (ALL), then (HOPS) rounds of basin hopping for crystals above the
# data's energy. `default` relaxes as the Carbon-24 preset does (configs.SamplerConfig.relax_config). The chain's
# settings are the base variant's; every other variant's crystals are the chain's, unrelaxed.
GUARDED = relax.RelaxConfig(keep_coordination=(3, 4), bond_cutoff=1.8)
ALL = relax.RelaxConfig()
HOPS = 6
RELAXED_OF: dict[str, tuple[str, relax.RelaxConfig]] = {
    "default": ("default_unrelaxed", configs.get_sampler_config("carbon_24", "default").relax_config()),
    "default_guarded": ("default_unrelaxed", GUARDED), "default_relax_all": ("default_unrelaxed", ALL),
    "default_hops_all": ("default_unrelaxed", dataclasses.replace(ALL, hops=HOPS)),
    "default_hops_guarded": ("default_unrelaxed", dataclasses.replace(GUARDED, hops=HOPS)),
    "default_noretry_relaxed": ("default_noretry", ALL), "default_25x10_relaxed": ("default_25x10", GUARDED),
    "default_25x10_hops": ("default_25x10", dataclasses.replace(ALL, hops=HOPS))}
VARIANTS.update({name: VARIANTS[base] for name, (base, _) in RELAXED_OF.items()})
# Variants whose first chain is another variant's chain (same preset, checkpoint, weights and sampler settings):
# reused where that variant is sampled.
FIRST_PASS_OF = {"default_unrelaxed": "default_noretry", "default_retry_same": "default_noretry"}


def sample_variant(workdir: str | pathlib.Path, name: str, out: pathlib.Path, num: int, batch_size: int,
                   bucket_multiple: int, seed: int) -> dict[str, Any]:
    """Sample ``num`` crystals with variant ``name`` into ``out``; return its summary."""
    # The relaxation knows carbon: on other datasets a relaxed variant is its base chain's crystals.
    if name in RELAXED_OF and run.read_config(workdir).dataset in relax.CARBON_DATASETS:
        return relax_variant(workdir, name, out, num, batch_size, bucket_multiple, seed)
    preset, checkpoint, overrides = VARIANTS[name]
    overrides = dict(overrides)
    weights = overrides.pop("weights", configs.sampler_weights(preset))
    config, statics, params, meta = run.load_run(workdir, checkpoint, weights, overrides.pop("score_checkpoint", None))
    retry_checkpoint = overrides.pop("retry_checkpoint", None)
    # The relaxation is a stage of its own here (relax_variant), so this folder holds the chains' crystals.
    cfg = configs.get_sampler_config(config.dataset, preset, **dict(overrides, relax=None))
    retry_params, retry_epoch = run.load_retry_params(workdir, run.LoadedRun(config, statics, params, meta), cfg,
                                                      preset, checkpoint, weights, retry_checkpoint)
    prior = run.load_prior(workdir) if cfg.prior == "fitted" else None
    key = jax.random.PRNGKey(seed)
    kwargs = dict(statics=statics, model=config.model, cfg=cfg, batch_size=batch_size)
    t0 = time.perf_counter()
    base = out.parent / FIRST_PASS_OF.get(name, "")
    first = (_first_pass(base, sampling.decode_samples(params, key, num, prior=prior, **kwargs), seed, batch_size)
             if name in FIRST_PASS_OF and cfg.retry_coordination is not None else None)
    if first is not None:
        log.info("%s: the first chain from %s", name, base)
        result = sampling.retry_unbonded(params if retry_params is None else retry_params, jax.random.fold_in(key, 1), first,
                                         bucket_multiple=bucket_multiple, **kwargs)
    else:
        result = sampling.sample(params, key, num, bucket_multiple=bucket_multiple, prior=prior, progress=True,
                                 retry_params=retry_params, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", **result.to_cdvae())
    (out / "rejects.json").write_text(json.dumps(result.rejects, indent=1))
    summary = {
        "variant": name, "preset": preset, "checkpoint": checkpoint, "checkpoint_epoch": int(meta["epoch"]) + 1,
        "score_epoch": meta["score_epoch"], "weights": meta["weights"], "num_requested": num, "num_written": len(result.atom_types), "num_rejected": len(result.rejects),
        "neighbor_overflow": int(result.overflow.sum()), "compile_seconds": round(result.compile_seconds, 2),
        "run_seconds": round(result.run_seconds, 2), "total_seconds": round(time.perf_counter() - t0, 2),
        "device": jax.devices()[0].device_kind,
        "retry": result.retry_summary(retry_epoch),
        "first_pass_from": str(base) if first is not None else None,
        "sampler": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def relax_variant(workdir: str | pathlib.Path, name: str, out: pathlib.Path, num: int, batch_size: int,
                  bucket_multiple: int, seed: int) -> dict[str, Any]:
    """Relax the crystals of the variant ``name`` builds on (sampling it first where missing) into ``out``; return the summary."""
    base_name, cfg = RELAXED_OF[name]
    base = out.parent / base_name
    if not (base / "summary.json").exists():
        sample_variant(workdir, base_name, base, num, batch_size, bucket_multiple, seed)
    base_summary = json.loads((base / "summary.json").read_text())
    if base_summary.get("num_requested") != num:
        raise ValueError(f"{base} holds {base_summary.get('num_requested')} samples, not {num}: relax in a new --root")
    relaxed = relax_cli.relax_samples(base, out, cfg, cif=False, overwrite=True, seed=seed)
    # The sampling's time counts: a relaxed variant costs its chains plus the relaxation per crystal.
    sampler = dict(base_summary.get("sampler", {}), relax=cfg.cell, relax_guard=cfg.keep_coordination is not None,
                   relax_hops=cfg.hops)
    summary = dict(base_summary, variant=name, relaxed_from=str(base), relax=relaxed, sampler=sampler,
                   run_seconds=round(base_summary["run_seconds"] + relaxed["relax_seconds"], 2))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _first_pass(folder: pathlib.Path, decoded: sampling.SampleResult, seed: int,
                batch_size: int) -> sampling.SampleResult | None:
    """Return ``decoded`` with the coordinates (and run time) another variant's chain gave the same crystals, or None if it has not run."""
    if not (folder / "summary.json").exists():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    with np.load(folder / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    same = (summary.get("num_requested") == len(decoded.index) + len(decoded.rejects)
            and np.array_equal(arrays["sample_index"], decoded.index)
            and np.array_equal(arrays["atom_types"], np.concatenate(decoded.atom_types))
            and np.allclose(arrays["lengths"], decoded.lengths))
    if not same:
        raise ValueError(f"{folder} holds other crystals than seed {seed}, batch size {batch_size} decodes: "
                         "sample this variant in a new --root")
    starts = np.concatenate([[0], np.cumsum(arrays["num_atoms"])])
    frac = [arrays["frac_coords"][a:b] for a, b in zip(starts[:-1], starts[1:])]
    # Its time counts: a variant that reuses the chain costs both chains' time per crystal.
    return dataclasses.replace(decoded, frac_coords=frac, run_seconds=float(summary["run_seconds"]))


def main(argv: Sequence[str] | None = None) -> int:
    """Sample every requested variant and print one summary line each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--bucket-multiple", type=int, default=4, help="atom-count buckets (max_atoms: one program)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = pathlib.Path(args.root)
    for name in args.variants:
        if (root / name / "summary.json").exists():
            log.info("%s: already sampled", name)
            continue
        s = sample_variant(args.workdir, name, root / name, args.num, args.batch_size, args.bucket_multiple, args.seed)
        print(json.dumps({k: s[k] for k in ("variant", "num_written", "num_rejected", "compile_seconds",
                                             "run_seconds", "device")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
