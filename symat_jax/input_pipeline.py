"""Training batches on the host: padded encoder graphs, dense crystals, invariant targets, the lattice standardiser."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import numpy as np

from symat_jax import graphs
from symat_jax.data import CrystalDataset

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LatticeStandardizer:
    """Mean and std of ``(scaled lengths, angles)`` fit on a training set (saved with the model)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, data: CrystalDataset) -> "LatticeStandardizer":
        """Return the standardiser of ``data``'s lattices."""
        x = lattice_features(data)
        return cls(tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in np.maximum(x.std(0), 1e-6)))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Return standardised ``[c, 6]`` features."""
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Return ``[..., 6]`` (scaled lengths, angles) from standardised values."""
        return np.asarray(x) * np.asarray(self.std) + np.asarray(self.mean)

    def to_json(self) -> str:
        """Return the standardiser as JSON."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LatticeStandardizer":
        """Return the standardiser stored by :meth:`to_json`."""
        d = json.loads(text)
        return cls(tuple(d["mean"]), tuple(d["std"]))


def lattice_features(data: CrystalDataset) -> np.ndarray:
    """Return ``[c, 6]``: lengths divided by ``N^(1/3)`` and angles in degrees."""
    return np.concatenate([data.scaled_lengths(), data.angles], axis=1)


def max_elements(data: CrystalDataset) -> int:
    """Return the largest number of distinct elements in one crystal."""
    return int(data.num_elements().max())


def make_batch(
    data: CrystalDataset,
    indices: np.ndarray,
    enc: Any,
    batch_size: int,
    max_atoms: int,
    num_element_slots: int,
    standardizer: LatticeStandardizer,
) -> Batch:
    """Return one training batch of ``data[indices]`` padded to ``batch_size`` crystals.

    ``enc``: their padded encoder GraphsTuple (from :func:`graphs.encoder_batch`); ``atomic_numbers [b, n]``, ``frac_coords
    [b, n, 3]``, ``atom_mask``, ``lengths``/``angles [b, 3]``; ``crystal_mask
    [b]``; targets ``num_types [b]``, ``elements``/``element_mask``/``counts
    [b, m]``, ``element_multi_hot [b, 100]``, ``lattice_std [b + 1, 6]`` (a
    row per encoder graph, padding included).
    """
    indices = np.asarray(indices)
    real = len(indices)
    if real > batch_size:
        raise ValueError(f"{real} crystals do not fit a batch of {batch_size}")
    dense = graphs.dense_batch(data, indices, max_atoms)
    pad = batch_size - real

    def padded(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

    sub = data.subset(indices)
    counts_all = sub.element_counts()  # [real, 100]
    elements = np.zeros((real, num_element_slots), np.int32)
    counts = np.zeros((real, num_element_slots), np.int32)
    element_mask = np.zeros((real, num_element_slots), bool)
    for row, c in enumerate(counts_all):
        present = np.flatnonzero(c)
        if len(present) > num_element_slots:
            raise ValueError(
                f"crystal {data.material_id[indices[row]]} has {len(present)} elements, "
                f"more than the {num_element_slots} slots"
            )
        elements[row, : len(present)] = present + 1
        counts[row, : len(present)] = c[present]
        element_mask[row, : len(present)] = True
    lat_std = standardizer.transform(lattice_features(sub))
    batch: Batch = {k: padded(v) for k, v in dense.items()}
    batch.update(
        enc=enc,
        crystal_mask=padded(np.ones(real, bool)),
        num_types=padded((counts_all > 0).sum(1).astype(np.int32)),
        element_multi_hot=padded((counts_all > 0).astype(np.float32)),
        elements=padded(elements),
        counts=padded(counts),
        element_mask=padded(element_mask),
        lattice_std=np.concatenate([padded(lat_std.astype(np.float32)), np.zeros((1, 6), np.float32)]),
    )
    return batch


def epoch_batches(
    data: CrystalDataset,
    order: np.ndarray,
    budgets: list[graphs.PadBudget],
    batch_size: int,
    max_atoms: int,
    num_element_slots: int,
    standardizer: LatticeStandardizer,
) -> Iterator[Batch]:
    """Yield the batches of one pass over ``data`` in ``order``."""
    for enc, idx in graphs.batches(data, batch_size, budgets, order=order):
        yield make_batch(data, idx, enc, batch_size, max_atoms, num_element_slots, standardizer)
