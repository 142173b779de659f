"""``symat sample``: write what :func:`symat_jax.sampling.sample` returns (samples.npz, stage files, CIF files, rejects, summary)."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import numpy as np
from pymatgen.io.cif import CifWriter

from symat_jax import configs, sampling
from symat_jax.data.canonical import to_structure
from symat_jax.outputs import OutputFolder, check_output
from symat_jax.sampling.stages import Samples


def write_samples(samples: Samples, out: str | pathlib.Path, cif: bool = True) -> pathlib.Path:
    """Write every ``.npz`` file of ``samples`` (CDVAE layout), ``cif/<index>.cif`` and ``rejects.json`` under ``out``; return ``out``."""
    out = pathlib.Path(out)
    (out / "cif").mkdir(parents=True, exist_ok=True)
    for name, arrays in samples.npz_files().items():
        np.savez(out / name, **arrays)
    if cif:
        for k, i in enumerate(samples.index):
            CifWriter(to_structure(*samples.crystals.crystal(k))).write_file(out / "cif" / f"{int(i)}.cif")
    (out / "rejects.json").write_text(json.dumps(samples.rejects, indent=1))
    return out


def summarize(samples: Samples, run: sampling.SamplingRun, preset: configs.SamplerPreset, *, workdir: str,
              seconds: float) -> dict[str, Any]:
    """Return the JSON summary of a sample set: the run's epochs, counts, timings, what each stage did, the preset."""
    rec = samples.records
    chain = rec.get("chain", {})
    counts = np.bincount(samples.crystals.num_atoms, minlength=run.model.max_atoms + 1)
    retry = rec.get("retry")
    return {
        "workdir": str(workdir),
        **run.epochs,
        "preset": preset.name,
        "num_requested": rec["decode"]["num_requested"],
        "num_written": len(samples),
        "num_rejected": len(samples.rejects),
        "neighbor_overflow": int(samples.overflow.sum()),
        "compile_seconds": round(chain.get("compile_seconds", 0.0) + (retry or {}).get("compile_seconds", 0.0), 2),
        "run_seconds": round(chain.get("run_seconds", 0.0) + (retry or {}).get("run_seconds", 0.0), 2),
        "total_seconds": round(seconds, 2),
        "padded_atom_share": round(chain.get("padded_atom_share", 0.0), 4),
        "stages": {name: _rounded(r) for name, r in rec.items()},
        "atom_count_histogram": {int(n): int(c) for n, c in enumerate(counts) if c},
        "sampler": preset.to_dict(),
    }


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    """Return a stage record with its seconds rounded to 0.01."""
    return {k: round(v, 2) if k.endswith("seconds") else v for k, v in record.items()}


def run_sample(workdir: str, num: int, out: str, *, preset: configs.SamplerPreset | str = configs.DEFAULT_SAMPLER_PRESET,
               batch_size: int = 256, seed: int = 0, score_checkpoint: str | None = None,
               overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Sample ``num`` crystals of ``preset`` from the run in ``workdir`` into ``out``; return the summary written there.

    ``preset``: a :class:`~symat_jax.configs.SamplerPreset` or a built-in's
    name; ``score_checkpoint`` takes the score network from another kept
    checkpoint. ``out`` is claimed before any work (:class:`~symat_jax.outputs.OutputFolder`):
    never the run or a folder around or inside it, a non-empty folder only with
    ``overwrite`` and only where a symat command wrote it, one writer at a
    time; the samples appear there whole once everything is written.
    """
    from symat_jax.run import read_config

    check_output(out, inputs=[workdir], overwrite=overwrite)
    if isinstance(preset, str):
        preset = configs.get_sampler_preset(read_config(workdir).dataset, preset)
    with OutputFolder(out, command="symat sample", inputs=[workdir], overwrite=overwrite,
                      record={"workdir": str(workdir), "preset": preset.name, "seed": seed, "num": num}) as tmp:
        t0 = time.perf_counter()
        run = sampling.load_sampling_run(workdir, preset, score_checkpoint=score_checkpoint)
        samples = sampling.sample(run, preset, num, seed, batch_size=batch_size, progress=progress)
        summary = summarize(samples, run, preset, workdir=workdir, seconds=time.perf_counter() - t0)
        write_samples(samples, tmp)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
