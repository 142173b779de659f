"""``symat relax``: relax a folder of generated carbon crystals under Tersoff's potential into a new folder.

The source folder is only read. The new folder holds ``samples.npz`` (the
source's arrays with the relaxed coordinates and cells, same order),
``unrelaxed.npz`` (the source's crystals as sampled), ``relax.npz`` (per
crystal: energy per atom, residual force, FIRE steps, converged, kept,
reverted by the coordination rule, basin-hopping moves accepted),
``rejects.json`` (the source's, so evaluation still counts them), CIF files
and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any

import numpy as np
from pymatgen.io.cif import CifWriter

from symat_jax import relax
from symat_jax.crystal_sets import CrystalSet
from symat_jax.data.canonical import to_structure
from symat_jax.files import check_folder_path, read_json

UNRELAXED_FILE = "unrelaxed.npz"


def _source_file(samples: str | pathlib.Path) -> pathlib.Path:
    """Return the ``samples.npz`` that ``samples`` (a file or the folder holding one) names."""
    path = pathlib.Path(samples)
    return path / "samples.npz" if path.is_dir() else path


def relax_samples(samples: str | pathlib.Path, out: str | pathlib.Path, cfg: relax.RelaxConfig = relax.RelaxConfig(),
                  *, batch_size: int = 256, overwrite: bool = False, cif: bool = True,
                  progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Relax the crystals of ``samples`` into the folder ``out`` and return the summary written there.

    ``out`` must be new or empty (``overwrite`` clears it once the relaxed
    crystals exist) and must not be the source folder: what was sampled stays.
    """
    src = _source_file(samples)
    out = check_folder_path(out, "--out")
    if out.resolve() == src.parent.resolve():
        raise ValueError(f"--out {out} is the folder of the samples; relax into a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose a new folder or pass --overwrite to replace its contents")
    crystals, arrays = _load_arrays(src)
    rejects = src.parent / "rejects.json"
    relaxed, summary = _relax_arrays(crystals, arrays, cfg, batch_size, progress, seed=seed)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rejects.json").write_text(json.dumps(read_json(rejects) if rejects.exists() else [], indent=1))
    _write_relaxed(out, arrays, relaxed, cif)
    summary = {"source": str(src), **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def relax_in_place(folder: str | pathlib.Path, cfg: relax.RelaxConfig, *, batch_size: int = 256, cif: bool = True,
                   progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Relax the ``samples.npz`` that ``symat sample`` just wrote in ``folder``; the sampled crystals move to ``unrelaxed.npz``. Return the relaxation's summary.

    The sampled crystals are written before this runs, so a failed
    relaxation leaves them as they were.
    """
    folder = pathlib.Path(folder)
    with np.load(folder / "samples.npz") as z:
        if not len(z["num_atoms"]):  # every crystal rejected: nothing to relax
            return {"relax": dataclasses.asdict(cfg), "num_crystals": 0}
    crystals, arrays = _load_arrays(folder / "samples.npz")
    # A carbon run's decoder that gave other elements (an untrained one) leaves those crystals unrelaxed, with a
    # warning: the sampled crystals are the work to keep.
    relaxed, summary = _relax_arrays(crystals, arrays, cfg, batch_size, progress, strict=False, seed=seed)
    _write_relaxed(folder, arrays, relaxed, cif)
    return summary


def _load_arrays(file: pathlib.Path) -> tuple[CrystalSet, dict[str, np.ndarray]]:
    """Return ``(its crystals, every array)`` of a one-batch CDVAE-layout ``samples.npz`` (checked by :meth:`CrystalSet.from_samples`)."""
    crystals = CrystalSet.from_samples(file)
    with np.load(file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if arrays["num_atoms"].ndim != 1:
        raise ValueError(f"{file}: relax one evaluation batch at a time (num_atoms has shape {arrays['num_atoms'].shape})")
    return crystals, arrays


def _relax_arrays(crystals: CrystalSet, arrays: dict[str, np.ndarray], cfg: relax.RelaxConfig, batch_size: int,
                  progress: bool, strict: bool = True,
                  seed: int = 0) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Return ``({"samples": the arrays with relaxed coordinates and cells, "record": per-crystal record}, a summary)``."""
    t0 = time.perf_counter()
    result = relax.relax_crystals(crystals, cfg, batch_size=batch_size, progress=progress, strict=strict, seed=seed)
    seconds = time.perf_counter() - t0
    relaxed = dict(arrays, frac_coords=result.crystals.frac_coords, lengths=result.crystals.lengths,
                   angles=result.crystals.angles)
    record = dict(energy_per_atom=result.energy_per_atom, fmax=result.fmax, steps=result.steps,
                  converged=result.converged, kept=result.kept, reverted=result.reverted, hops=result.hops)
    energy = result.energy_per_atom[result.kept]
    summary = {
        "relax": dataclasses.asdict(cfg),
        "potential": "Tersoff 1988 carbon (Phys. Rev. Lett. 61, 2879)",
        "num_crystals": len(crystals),
        "num_kept": int(result.kept.sum()),
        "num_converged": int(result.converged.sum()),
        "num_reverted": int(result.reverted.sum()),
        "num_hopped": int((result.hops > 0).sum()),
        "hop_seed": seed,
        "median_steps": float(np.median(result.steps)) if len(crystals) else None,
        "energy_per_atom_quantiles": np.quantile(energy, [0.05, 0.5, 0.95]).round(4).tolist() if energy.size else [],
        "relax_seconds": round(seconds, 2),
    }
    return {"samples": relaxed, "record": record}, summary


def _write_relaxed(out: pathlib.Path, arrays: dict[str, np.ndarray], relaxed: dict[str, Any], cif: bool) -> None:
    """Write ``unrelaxed.npz`` and ``relax.npz``, then replace ``samples.npz`` with the relaxed crystals (and their CIF files)."""
    np.savez(out / UNRELAXED_FILE, **arrays)
    np.savez(out / "relax.npz", **relaxed["record"])
    tmp = out / ".samples.tmp.npz"
    np.savez(tmp, **relaxed["samples"])
    os.replace(tmp, out / "samples.npz")
    if cif:
        (out / "cif").mkdir(exist_ok=True)
        crystals = CrystalSet.from_samples(out / "samples.npz")
        index = relaxed["samples"].get("sample_index", np.arange(len(crystals)))
        for k in range(len(crystals)):
            CifWriter(to_structure(*crystals.crystal(k))).write_file(out / "cif" / f"{int(index[k])}.cif")
