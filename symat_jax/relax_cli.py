"""``symat relax``: the sampler's ``Relax`` (and ``Hop``) stages on a folder of generated carbon crystals, into a new folder.

The source folder is only read. The new folder holds ``samples.npz`` (the
source's arrays with the relaxed coordinates and cells, same order),
``unrelaxed.npz`` (the source's crystals as sampled), ``relax.npz`` (per
crystal: energy per atom, residual force, FIRE steps, converged, kept,
reverted by the guard, basin-hopping moves accepted), ``rejects.json`` (the
source's, so evaluation still counts them), CIF files and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import numpy as np
from pymatgen.io.cif import CifWriter

from symat_jax import ragged
from symat_jax.configs import HopConfig, RelaxConfig
from symat_jax.crystals import CrystalSet
from symat_jax.data.canonical import to_structure
from symat_jax.crystals import crystal_problems
from symat_jax.outputs import OutputFolder, check_output, check_readable
from symat_jax.sampling.stages import RELAX_FILE, UNRELAXED_FILE, relax_crystals


def _source_file(samples: str | pathlib.Path) -> pathlib.Path:
    """Return the ``samples.npz`` that ``samples`` (a file or the folder holding one) names."""
    path = pathlib.Path(samples)
    return path / "samples.npz" if path.is_dir() else path


def relax_samples(samples: str | pathlib.Path, out: str | pathlib.Path, cfg: RelaxConfig = RelaxConfig(),
                  hops: HopConfig | None = None, *, batch_size: int = 256, overwrite: bool = False, cif: bool = True,
                  progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Relax the crystals of ``samples`` (then hop, with ``hops``) into the folder ``out``; return the summary written there.

    ``out`` is claimed before any work (:class:`~symat_jax.outputs.OutputFolder`):
    never the samples' file or a folder around it, a non-empty folder only
    with ``overwrite`` and only where a symat command wrote it. Crystals that
    are not crystals (no atoms, a NaN or collapsed cell) join the rejects with their reason.
    """
    check_readable(samples if pathlib.Path(samples).suffix != ".npz" else pathlib.Path(samples).parent)
    src = _source_file(samples)
    check_output(out, inputs=[src], overwrite=overwrite)
    crystals = CrystalSet.from_samples(src)
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if arrays["num_atoms"].ndim != 1:
        raise ValueError(f"{src}: relax one evaluation batch at a time (num_atoms has shape {arrays['num_atoms'].shape})")
    problems = crystal_problems(arrays["num_atoms"], arrays["atom_types"], arrays["frac_coords"], arrays["lengths"],
                                arrays["angles"])
    good = np.array([i for i, p in enumerate(problems) if p is None], np.int64)
    arrays = _take(arrays, good)
    with OutputFolder(out, command="symat relax", inputs=[src], overwrite=overwrite,
                      record={"samples": str(src), "seed": seed}) as tmp:
        t0 = time.perf_counter()
        result = relax_crystals(crystals, cfg, hops, seed=seed, batch_size=batch_size, progress=progress,
                                strict=True)
        relaxed = result.crystals
        summary = {"source": str(src), "relax": dataclasses.asdict(cfg),
                   "hops": dataclasses.asdict(hops) if hops else None, "hop_seed": seed,
                   **{k: v for k, v in result.records["relax"].items() if k not in ("config", "seconds")},
                   "num_rejected": crystals.num_rejected, "relax_seconds": round(time.perf_counter() - t0, 2)}
        index = arrays.get("sample_index", good)
        rejects = list(crystals.rejects)
        (tmp / "rejects.json").write_text(json.dumps(rejects, indent=1, default=int))
        np.savez(tmp / UNRELAXED_FILE, **arrays)
        np.savez(tmp / RELAX_FILE, **result.arrays["relax"])
        np.savez(tmp / "samples.npz", **dict(arrays, frac_coords=relaxed.frac_coords, lengths=relaxed.lengths,
                                             angles=relaxed.angles))
        if cif:
            (tmp / "cif").mkdir()
            for k in range(len(relaxed)):
                CifWriter(to_structure(*relaxed.crystal(k))).write_file(tmp / "cif" / f"{int(index[k])}.cif")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _take(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Return the arrays of crystals ``rows`` (per-crystal arrays by row, per-atom arrays by their atoms)."""
    num = arrays["num_atoms"]
    atoms = ragged.take_rows(num, rows)
    per_atom = int(num.sum())
    out = {}
    for k, v in arrays.items():
        if k in ("atom_types", "frac_coords") or (len(v) == per_atom and len(v) != len(num)):
            out[k] = v[atoms]
        else:
            out[k] = v[rows]
    return out
