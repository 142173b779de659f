"""``symat sample``: sample from a trained run and write the crystals (samples.npz, CIF files, rejects, summary)."""

from __future__ import annotations

import json
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np
from pymatgen.io.cif import CifWriter

from symat_jax import configs, relax, sampling
from symat_jax.data.canonical import to_structure
from symat_jax.files import check_folder_path
from symat_jax.relax_cli import relax_in_place
from symat_jax.run import load_prior, load_retry_params, load_run


# The crystals as the first chain left them, beside samples.npz when a retry ran (SamplerConfig.retry_coordination).
FIRST_PASS_FILE = "first_pass.npz"


def write_samples(result: sampling.SampleResult, out: str | pathlib.Path, cif: bool = True) -> pathlib.Path:
    """Write ``samples.npz`` (CDVAE layout), ``cif/<index>.cif`` and ``rejects.json`` under ``out``; return ``out``."""
    out = pathlib.Path(out)
    (out / "cif").mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", **result.to_cdvae())
    if result.first_frac_coords is not None:
        np.savez(out / FIRST_PASS_FILE, **result.to_cdvae(first_pass=True))
    if cif:
        for k, i in enumerate(result.index):
            s = to_structure(result.atom_types[k], result.lengths[k], result.angles[k], result.frac_coords[k])
            CifWriter(s).write_file(out / "cif" / f"{int(i)}.cif")
    (out / "rejects.json").write_text(json.dumps(result.rejects, indent=1))
    return out


def check_output_folder(out: str | pathlib.Path, overwrite: bool) -> None:
    """Raise ValueError when ``out`` cannot take a new sample set (a file, or a non-empty folder without ``overwrite``)."""
    out = check_folder_path(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose a new folder or pass --overwrite to replace its contents")


def run_sample(
    workdir: str,
    num: int,
    out: str,
    *,
    preset: str = configs.DEFAULT_SAMPLER_PRESET,
    batch_size: int = 256,
    seed: int = 0,
    checkpoint: str | None = None,
    weights: str | None = None,
    score_checkpoint: str | None = None,
    retry_checkpoint: str | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Sample ``num`` crystals from the run in ``workdir`` into ``out``; return a summary.

    ``preset`` names a sampler preset (:func:`symat_jax.configs.get_sampler_config`);
    ``overrides`` replace its fields (``None`` values are ignored). ``checkpoint``
    (best or latest) and ``weights`` (raw or ema) default to the preset's choice; ``score_checkpoint`` takes
    the score network from another kept checkpoint (:func:`symat_jax.run.load_run`); ``retry_checkpoint`` the
    retry chain's score network (``retry_coordination``; default: the sampling one). A non-empty ``out`` is
    refused before any work (outputs of two runs never mix) unless
    ``overwrite``, which clears it once the new samples exist.
    """
    check_output_folder(out, overwrite)
    ckpt, weights = checkpoint or configs.sampler_checkpoint(preset), weights or configs.sampler_weights(preset)
    loaded = load_run(workdir, ckpt, weights, score_checkpoint)
    config, statics, params, meta = loaded
    cfg = configs.get_sampler_config(config.dataset, preset, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.relax is not None and config.dataset not in relax.CARBON_DATASETS:
        raise ValueError(f"relax={cfg.relax!r}: the Tersoff relaxation knows carbon only, not {config.dataset}; "
                         "sample without it (--no-relax)")
    retry_params, retry_epoch = load_retry_params(workdir, loaded, cfg, preset, ckpt, weights, retry_checkpoint)
    prior = load_prior(workdir) if cfg.prior == "fitted" else None
    t0 = time.perf_counter()
    result = sampling.sample(params, jax.random.PRNGKey(seed), num, statics=statics, model=config.model, cfg=cfg,
                             batch_size=batch_size, prior=prior, retry_params=retry_params)
    if overwrite and pathlib.Path(out).exists():
        shutil.rmtree(out)
    write_samples(result, out)
    counts = np.bincount([len(t) for t in result.atom_types], minlength=config.model.max_atoms + 1)
    summary = {
        "workdir": str(workdir),
        "checkpoint_epoch": int(meta["epoch"]) + 1,
        "score_epoch": meta["score_epoch"],
        "weights": meta["weights"],
        "preset": preset,
        "num_requested": num,
        "num_written": len(result.atom_types),
        "num_rejected": len(result.rejects),
        "neighbor_overflow": int(result.overflow.sum()),
        "compile_seconds": round(result.compile_seconds, 2),
        "run_seconds": round(result.run_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "padded_atom_share": round(result.padded_atom_share, 4),
        "retry": result.retry_summary(retry_epoch),
        "atom_count_histogram": {int(n): int(c) for n, c in enumerate(counts) if c},
        "sampler": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    (pathlib.Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.relax is not None:
        # The sampled crystals are on disk first: a failed relaxation loses nothing that was sampled.
        summary["relax"] = relax_in_place(out, cfg.relax_config(), batch_size=batch_size, seed=seed)
        summary["total_seconds"] = round(time.perf_counter() - t0, 2)
        (pathlib.Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
