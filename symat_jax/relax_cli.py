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
import shutil
import time
from typing import Any

import numpy as np
from pymatgen.io.cif import CifWriter

from symat_jax.configs import HopConfig, RelaxConfig
from symat_jax.crystals import CrystalSet
from symat_jax.data.canonical import to_structure
from symat_jax.files import check_folder_path, read_json
from symat_jax.sampling.stages import RELAX_FILE, UNRELAXED_FILE, relax_crystals


def _source_file(samples: str | pathlib.Path) -> pathlib.Path:
    """Return the ``samples.npz`` that ``samples`` (a file or the folder holding one) names."""
    path = pathlib.Path(samples)
    return path / "samples.npz" if path.is_dir() else path


def relax_samples(samples: str | pathlib.Path, out: str | pathlib.Path, cfg: RelaxConfig = RelaxConfig(),
                  hops: HopConfig | None = None, *, batch_size: int = 256, overwrite: bool = False, cif: bool = True,
                  progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Relax the crystals of ``samples`` (then hop, with ``hops``) into the folder ``out``; return the summary written there.

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
    result = relax_crystals(crystals, cfg, hops, seed=seed, batch_size=batch_size, progress=progress, strict=True)
    relaxed = result.crystals
    summary = {"source": str(src), "relax": dataclasses.asdict(cfg), "hops": dataclasses.asdict(hops) if hops else None,
               "hop_seed": seed, **{k: v for k, v in result.records["relax"].items() if k not in ("config", "seconds")},
               "relax_seconds": round(time.perf_counter() - t0, 2)}
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rejects.json").write_text(json.dumps(read_json(rejects) if rejects.exists() else [], indent=1))
    np.savez(out / UNRELAXED_FILE, **arrays)
    np.savez(out / RELAX_FILE, **result.arrays["relax"])
    np.savez(out / "samples.npz", **dict(arrays, frac_coords=relaxed.frac_coords, lengths=relaxed.lengths,
                                         angles=relaxed.angles))
    if cif:
        (out / "cif").mkdir(exist_ok=True)
        index = arrays.get("sample_index", np.arange(len(relaxed)))
        for k in range(len(relaxed)):
            CifWriter(to_structure(*relaxed.crystal(k))).write_file(out / "cif" / f"{int(index[k])}.cif")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
