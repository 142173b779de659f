"""``symat sample``: load a trained run and write generated crystals (samples.npz, CIF files, rejects)."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from symat_jax import sampling
from symat_jax.checkpoints import RunCheckpoints
from symat_jax.configs import TrainConfig
from symat_jax.train import RunStatics


def load_run(workdir: str | pathlib.Path, best: bool = True) -> tuple[TrainConfig, RunStatics, Any, dict[str, Any]]:
    """Return ``(config, statics, params, checkpoint meta)`` of a trained run."""
    workdir = pathlib.Path(workdir)
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    statics = RunStatics.from_json((workdir / "normalizers.json").read_text())
    ckpt = RunCheckpoints(workdir)
    state, meta = ckpt.restore_raw(best=best)
    ckpt.close()
    return config, statics, state["params"], meta


def to_structure(atom_types: np.ndarray, lengths: np.ndarray, angles: np.ndarray, frac: np.ndarray) -> Structure:
    """Return a pymatgen Structure of one generated crystal."""
    return Structure(Lattice.from_parameters(*lengths, *angles), atom_types.tolist(), frac, coords_are_cartesian=False)


def write_samples(result: sampling.SampleResult, out: str | pathlib.Path, cif: bool = True) -> pathlib.Path:
    """Write ``samples.npz`` (CDVAE layout), ``cif/<index>.cif`` and ``rejects.json`` under ``out``; return ``out``."""
    out = pathlib.Path(out)
    (out / "cif").mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", **result.to_cdvae())
    if cif:
        for k, i in enumerate(result.index):
            s = to_structure(result.atom_types[k], result.lengths[k], result.angles[k], result.frac_coords[k])
            CifWriter(s).write_file(out / "cif" / f"{int(i)}.cif")
    (out / "rejects.json").write_text(json.dumps(result.rejects, indent=1))
    return out


def run_sample(
    workdir: str,
    num: int,
    out: str,
    batch_size: int = 256,
    levels: int | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    seed: int = 0,
    decode: str = "argmax",
    decode_temperature: float = 1.0,
    checkpoint: str = "best",
) -> dict[str, Any]:
    """Sample ``num`` crystals from the run in ``workdir`` into ``out``; return a summary."""
    config, statics, params, meta = load_run(workdir, best=checkpoint == "best")
    overrides = {k: v for k, v in (("num_levels", levels), ("steps_per_level", steps), ("step_size", step_size))
                 if v is not None}
    cfg = sampling.SamplerConfig.paper(config.dataset, decode=decode, decode_temperature=decode_temperature,
                                       **overrides)
    t0 = time.perf_counter()
    result = sampling.sample(
        params, jax.random.PRNGKey(seed), num, np.asarray(statics.score_norm), np.asarray(statics.lattice.mean),
        np.asarray(statics.lattice.std), config.model, cfg, batch_size=batch_size,
    )
    write_samples(result, out)
    counts = np.bincount([len(t) for t in result.atom_types], minlength=config.model.max_atoms + 1)
    summary = {
        "workdir": str(workdir),
        "checkpoint_epoch": int(meta["epoch"]) + 1,
        "num_requested": num,
        "num_written": len(result.atom_types),
        "num_rejected": len(result.rejects),
        "neighbor_overflow": int(result.overflow.sum()),
        "compile_seconds": round(result.compile_seconds, 2),
        "run_seconds": round(result.run_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "padded_atom_share": round(result.padded_atom_share, 4),
        "atom_count_histogram": {int(n): int(c) for n, c in enumerate(counts) if c},
        "sampler": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    (pathlib.Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
