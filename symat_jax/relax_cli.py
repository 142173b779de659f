"""``symat relax``: relax a folder of generated carbon crystals under Tersoff's potential into a new folder.

The source folder is only read. The new folder holds ``samples.npz`` (the
source's arrays with the relaxed coordinates and cells, same order),
``unrelaxed.npz`` (the source's crystals as sampled), ``relax.npz`` (per
crystal: energy per atom, residual force, FIRE steps, converged, kept),
``rejects.json`` (the source's, so evaluation still counts them), CIF files
and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
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
                  progress: bool = True) -> dict[str, Any]:
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
    crystals = CrystalSet.from_samples(src)
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if arrays["num_atoms"].ndim != 1:
        raise ValueError(f"{src}: relax one evaluation batch at a time (num_atoms has shape {arrays['num_atoms'].shape})")
    rejects = src.parent / "rejects.json"
    t0 = time.perf_counter()
    result = relax.relax_crystals(crystals, cfg, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    relaxed = dict(arrays, frac_coords=result.crystals.frac_coords, lengths=result.crystals.lengths,
                   angles=result.crystals.angles)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", **relaxed)
    np.savez(out / UNRELAXED_FILE, **arrays)
    np.savez(out / "relax.npz", energy_per_atom=result.energy_per_atom, fmax=result.fmax, steps=result.steps,
             converged=result.converged, kept=result.kept)
    (out / "rejects.json").write_text(json.dumps(read_json(rejects) if rejects.exists() else [], indent=1))
    if cif:
        (out / "cif").mkdir(exist_ok=True)
        index = arrays.get("sample_index", np.arange(len(crystals)))
        for k in range(len(crystals)):
            CifWriter(to_structure(*result.crystals.crystal(k))).write_file(out / "cif" / f"{int(index[k])}.cif")
    energy = result.energy_per_atom[result.kept]
    summary = {
        "source": str(src),
        "relax": dataclasses.asdict(cfg),
        "potential": "Tersoff 1988 carbon (Phys. Rev. Lett. 61, 2879)",
        "num_crystals": len(crystals),
        "num_kept": int(result.kept.sum()),
        "num_converged": int(result.converged.sum()),
        "median_steps": float(np.median(result.steps)) if len(crystals) else None,
        "energy_per_atom_quantiles": np.quantile(energy, [0.05, 0.5, 0.95]).round(4).tolist() if energy.size else [],
        "relax_seconds": round(seconds, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
