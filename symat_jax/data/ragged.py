"""Ragged arrays in CDVAE's flat layout: per-item counts plus rows concatenated over items (host-side numpy).

Both crystal containers (:class:`~symat_jax.data.dataset.CrystalDataset` and
:class:`~symat_jax.crystal_sets.CrystalSet`) store atoms (and edges) this way.
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
