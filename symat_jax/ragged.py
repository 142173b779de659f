"""Ragged arrays in CDVAE's flat layout: per-item counts plus rows concatenated over items (host-side numpy).

Both crystal containers (:class:`~symat_jax.data.dataset.CrystalDataset` and
:class:`~symat_jax.crystals.CrystalSet`) store atoms (and edges) this way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def starts(counts: np.ndarray) -> np.ndarray:
    """Return ``[c + 1]`` int64: where each item's rows start (and, last, the total)."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64)


def take_rows(counts: np.ndarray, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Return the flat row indices of items ``indices`` (in that order), for gathering their rows."""
    counts = np.asarray(counts, np.int64)
    indices = np.asarray(indices, np.int64)
    first = starts(counts)[indices]
    sizes = counts[indices]
    return np.repeat(first - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)


def pad_atoms(
    num_atoms: np.ndarray, atomic_numbers: np.ndarray, frac_coords: np.ndarray, max_atoms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return crystals concatenated over atoms as ``(atomic_numbers [c, n] int32, frac_coords [c, n, 3] float32, atom_mask [c, n])``.

    Padding atoms have atomic number 0 and zero coordinates; the caller
    checks that no crystal holds more than ``max_atoms`` atoms.
    """
    num_atoms = np.asarray(num_atoms, np.int64)
    c = len(num_atoms)
    row = np.repeat(np.arange(c), num_atoms)
    col = np.arange(len(row)) - np.repeat(np.cumsum(num_atoms) - num_atoms, num_atoms)
    z = np.zeros((c, max_atoms), np.int32)
    frac = np.zeros((c, max_atoms, 3), np.float32)
    mask = np.zeros((c, max_atoms), bool)
    z[row, col], frac[row, col], mask[row, col] = atomic_numbers, frac_coords, True
    return z, frac, mask
