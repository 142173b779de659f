"""Crystal datasets: the registry, canonical form and cached CSV reading (host-side).

Names are loaded on first use, so ``symat_jax.data.registry`` (dataset facts,
imported by the configs) does not pull in pymatgen and the CSV reader.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BadCrystalError": "canonical",
    "CanonicalCrystal": "canonical",
    "canonicalize": "canonical",
    "center_frac_coords": "canonical",
    "to_structure": "canonical",
    "CrystalDataset": "dataset",
    "load_split": "dataset",
    "read_csv": "dataset",
    "DATASETS": "registry",
    "DatasetInfo": "registry",
    "DatasetNotFoundError": "registry",
    "get_info": "registry",
    "resolve_data_root": "registry",
    "split_path": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Return an exported name, importing its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
