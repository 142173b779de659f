"""Crystal datasets: the registry, canonical form and cached CSV reading (host-side)."""

from symat_jax.data.canonical import BadCrystalError, CanonicalCrystal, canonicalize, center_frac_coords
from symat_jax.data.dataset import CrystalDataset, load_split, read_csv
from symat_jax.data.registry import (
    DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    get_info,
    resolve_data_root,
    split_path,
)

__all__ = [
    "BadCrystalError",
    "CanonicalCrystal",
    "CrystalDataset",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "canonicalize",
    "center_frac_coords",
    "get_info",
    "load_split",
    "read_csv",
    "resolve_data_root",
    "split_path",
]
