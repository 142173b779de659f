"""Evaluation metrics of generated crystals (CDVAE protocol, SPEC 5); host-side, pymatgen-based.

So far: crystal construction and structural validity. Composition validity,
coverage and property statistics are still to come.
"""

from __future__ import annotations

import warnings

import numpy as np
from pymatgen.core import Lattice, Structure

MIN_VOLUME = 0.1  # A^3: smaller cells count as "not constructed" (CDVAE)
MIN_DISTANCE = 0.5  # A: shortest allowed interatomic distance


def build_crystal(atom_types: np.ndarray, lengths: np.ndarray, angles: np.ndarray, frac: np.ndarray) -> Structure | None:
    """Return the pymatgen Structure of a generated crystal, or None when CDVAE would not construct it."""
    if np.any(np.asarray(lengths) < 0) or not np.all(np.isfinite(lengths)) or not np.all(np.isfinite(angles)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = Structure(Lattice.from_parameters(*lengths, *angles), list(atom_types), frac, coords_are_cartesian=False)
    except Exception:  # pymatgen raises several types on impossible cells
        return None
    if not np.isfinite(s.volume) or s.volume < MIN_VOLUME:
        return None
    return s


def min_periodic_distance(structure: Structure) -> float:
    """Return the smallest off-diagonal entry of pymatgen's periodic distance matrix (inf for one atom)."""
    d = structure.distance_matrix
    if len(d) < 2:
        return float("inf")
    return float(np.min(d + np.diag(np.full(len(d), np.inf))))


def structure_validity(structures: list[Structure | None]) -> np.ndarray:
    """Return ``[c]`` bool: constructed and shortest periodic distance >= 0.5 A (CDVAE)."""
    return np.array([s is not None and min_periodic_distance(s) >= MIN_DISTANCE for s in structures], bool)
