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

from symat_jax import configs, relax_cli, run, sampling
from symat_jax.generate_cli import summarize
from symat_jax.tersoff import CARBON_DATASETS

log = logging.getLogger("quality_sample")

# name -> (sampler preset, checkpoint, changes); each row adds one change to the one above it. Changes: "prior"
# ("fitted"), "weights" ("raw" | "ema"; default: the preset's), "score_checkpoint" (the score network of a kept
# epoch), "retry" (a RetryConfig, or None for none), and ChainConfig fields.
LANGEVIN = dict(step_schedule="norm", noise_schedule="sigma", temp_coord=1.0)
SHORT = dict(num_levels=25, steps_per_level=10, band=None)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "paper": ("paper", "best", {}),
    "paper_latest": ("paper", "latest", {}),
    "gmm": ("paper", "latest", dict(prior="fitted")),
    "gmm_langevin": ("paper", "latest", dict(prior="fitted", step_scale=0.05, **LANGEVIN)),
    "gmm_langevin_denoise": ("paper", "latest", dict(prior="fitted", step_scale=0.05, final_denoise=0.35, **LANGEVIN)),
    "gmm_langevin_50x10": ("paper", "latest", dict(prior="fitted", step_scale=0.05, steps_per_level=10, **LANGEVIN)),
    "gmm_langevin_25x10": ("paper", "latest", dict(prior="fitted", step_scale=0.05, num_levels=25, steps_per_level=10,
                                                   **LANGEVIN)),
    "default": ("default", "latest", {}),
    # The default chain before the band: 50 x 100, and its short versions.
    "default_50x100": ("default", "latest", dict(num_levels=50, steps_per_level=100, band=None)),
    "default_50x10": ("default", "latest", dict(num_levels=50, steps_per_level=10, band=None)),
    "default_25x10": ("default", "latest", SHORT),
    "default_band300": ("default", "latest", dict(band=(0.03, 0.1, 300))),
    "default_raw": ("default", "latest", dict(weights="raw")),
    "default_ema": ("default", "latest", dict(weights="ema")),
    "default_25x10_raw": ("default", "latest", dict(SHORT, weights="raw")),
    "default_25x10_ema": ("default", "latest", dict(SHORT, weights="ema")),
    # The score network from an earlier checkpoint of the run (which must be kept), the rest from the latest.
    "default_score40": ("default", "latest", dict(score_checkpoint="40")),
    "default_score60": ("default", "latest", dict(score_checkpoint="60")),
    # `default` runs a second chain for Carbon-24 crystals with an atom not 3- or 4-fold within 1.8 A, with the
    # score network of epoch 40 (configs.DEFAULT_STAGES_BY_DATASET); without it, and with the same network.
    "default_noretry": ("default", "latest", dict(retry=None)),
    "default_retry_same": ("default", "latest", dict(retry=configs.RetryConfig(checkpoint="latest"))),
    # The default chain and retry before the relaxation (the `default` preset relaxes after them, RELAXED_OF).
    "default_unrelaxed": ("default", "latest", {}),
}
# The crystals of another variant (sampled first where missing), relaxed in Tersoff's carbon potential at fixed
# cell, as the `default` preset does after its chains: kept where no atom leaves 3-4-fold coordination within
# 1.8 A (GUARDED) or always (ALL), then (HOPS) rounds of basin hopping for crystals above the data's energy.
# `default` relaxes as the Carbon-24 preset does. The chain's settings are the base variant's; every other
# variant's crystals are the chain's, unrelaxed.
RULE = configs.CoordinationRule(3, 4, 1.8)
GUARDED = configs.RelaxConfig(guard=RULE)
ALL = configs.RelaxConfig()
HOPS, GUARDED_HOPS = configs.HopConfig(rounds=6), configs.HopConfig(rounds=6, guard=RULE)
_DEFAULT = configs.get_sampler_preset("carbon_24", "default")
RELAXED_OF: dict[str, tuple[str, configs.RelaxConfig, configs.HopConfig | None]] = {
    "default": ("default_unrelaxed", _DEFAULT.stage(configs.RelaxConfig), _DEFAULT.stage(configs.HopConfig)),
    "default_guarded": ("default_unrelaxed", GUARDED, None), "default_relax_all": ("default_unrelaxed", ALL, None),
    "default_hops_all": ("default_unrelaxed", ALL, HOPS),
    "default_hops_guarded": ("default_unrelaxed", GUARDED, GUARDED_HOPS),
    "default_noretry_relaxed": ("default_noretry", ALL, None), "default_25x10_relaxed": ("default_25x10", GUARDED, None),
    "default_25x10_hops": ("default_25x10", ALL, HOPS)}
VARIANTS.update({name: VARIANTS[base] for name, (base, _, _) in RELAXED_OF.items()})
# Variants whose first chain is another variant's chain (same preset, checkpoint, weights and chain): reused where
# that variant is sampled.
FIRST_PASS_OF = {"default_unrelaxed": "default_noretry", "default_retry_same": "default_noretry"}


def variant_preset(dataset: str, name: str) -> tuple[configs.SamplerPreset, str | None]:
    """Return ``(the variant's preset without its relaxation, the score network's checkpoint or None)``."""
    preset_name, checkpoint, changes = VARIANTS[name]
    changes = dict(changes)
    # The relaxation is a stage of its own here (relax_variant), so a variant's folder holds the chains' crystals.
    preset = configs.get_sampler_preset(dataset, preset_name).without(configs.RelaxConfig)
    score_checkpoint = changes.pop("score_checkpoint", None)
    preset = dataclasses.replace(preset, checkpoint=checkpoint, weights=changes.pop("weights", preset.weights))
    if changes.pop("prior", None) == "fitted":
        preset = dataclasses.replace(preset, prior=configs.FittedPrior())
    if "retry" in changes:
        retry = changes.pop("retry")
        preset = preset.without(configs.RetryConfig) if retry is None else preset.replace_stage(retry)
    return preset.replace_stage(dataclasses.replace(preset.chain, **changes)), score_checkpoint


def sample_variant(workdir: str | pathlib.Path, name: str, out: pathlib.Path, num: int, batch_size: int,
                   bucket_multiple: int, seed: int) -> dict[str, Any]:
    """Sample ``num`` crystals with variant ``name`` into ``out``; return its summary."""
    # The relaxation knows carbon: on other datasets a relaxed variant is its base chain's crystals.
    if name in RELAXED_OF and run.read_config(workdir).dataset in CARBON_DATASETS:
        return relax_variant(workdir, name, out, num, batch_size, bucket_multiple, seed)
    preset, score_checkpoint = variant_preset(run.read_config(workdir).dataset, name)
    loaded = sampling.load_sampling_run(workdir, preset, score_checkpoint=score_checkpoint)
    t0 = time.perf_counter()
    base = out.parent / FIRST_PASS_OF.get(name, "")
    first = None
    if name in FIRST_PASS_OF and preset.stage(configs.RetryConfig) is not None:
        sampling.check_preset(loaded, preset)
        first = _first_pass(base, sampling.decode(loaded, preset, num, seed, batch_size=batch_size), seed, batch_size)
    if first is not None:
        log.info("%s: the first chain from %s", name, base)
        ctx = sampling.context(loaded, seed, batch_size=batch_size, bucket_multiple=bucket_multiple)
        result = first
        for stage in sampling.build_stages(preset.stages)[1:]:
            result = stage(result, ctx)
    else:
        result = sampling.sample(loaded, preset, num, seed, batch_size=batch_size, bucket_multiple=bucket_multiple)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", **result.cdvae())
    (out / "rejects.json").write_text(json.dumps(result.rejects, indent=1))
    summary = summarize(result, loaded, preset, workdir=str(workdir), seconds=time.perf_counter() - t0)
    summary.update(variant=name, checkpoint=preset.checkpoint, device=jax.devices()[0].device_kind,
                   first_pass_from=str(base) if first is not None else None)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def relax_variant(workdir: str | pathlib.Path, name: str, out: pathlib.Path, num: int, batch_size: int,
                  bucket_multiple: int, seed: int) -> dict[str, Any]:
    """Relax the crystals of the variant ``name`` builds on (sampling it first where missing) into ``out``; return the summary."""
    base_name, cfg, hops = RELAXED_OF[name]
    base = out.parent / base_name
    if not (base / "summary.json").exists():
        sample_variant(workdir, base_name, base, num, batch_size, bucket_multiple, seed)
    base_summary = json.loads((base / "summary.json").read_text())
    if base_summary.get("num_requested") != num:
        raise ValueError(f"{base} holds {base_summary.get('num_requested')} samples, not {num}: relax in a new --root")
    relaxed = relax_cli.relax_samples(base, out, cfg, hops, cif=False, overwrite=True, seed=seed)
    # The sampling's time counts: a relaxed variant costs its chains plus the relaxation per crystal.
    summary = dict(base_summary, variant=name, relaxed_from=str(base), relax=relaxed,
                   run_seconds=round(base_summary["run_seconds"] + relaxed["relax_seconds"], 2))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _first_pass(folder: pathlib.Path, decoded: sampling.Samples, seed: int, batch_size: int) -> sampling.Samples | None:
    """Return ``decoded`` with the coordinates (and chain time) another variant's chain gave the same crystals, or None if it has not run."""
    if not (folder / "summary.json").exists():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    with np.load(folder / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    c = decoded.crystals
    same = (summary.get("num_requested") == len(decoded) + len(decoded.rejects)
            and np.array_equal(arrays["sample_index"], decoded.index)
            and np.array_equal(arrays["atom_types"], c.atom_types) and np.allclose(arrays["lengths"], c.lengths))
    if not same:
        raise ValueError(f"{folder} holds other crystals than seed {seed}, batch size {batch_size} decodes: "
                         "sample this variant in a new --root")
    # Its time counts: a variant that reuses the chain costs both chains' time per crystal.
    return decoded.recorded("chain", {"run_seconds": float(summary["run_seconds"]), "compile_seconds": 0.0,
                                      "padded_atom_share": 0.0},
                            crystals=dataclasses.replace(c, frac_coords=arrays["frac_coords"]))


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
