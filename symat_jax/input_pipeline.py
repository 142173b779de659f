"""Training batches on the host: padded encoder graphs in a few fixed budgets, dense crystals, invariant targets.

Host-side (numpy): a batch leaves here as numpy arrays and a padded
``jraph.GraphsTuple``; :mod:`symat_jax.graphs` turns it into the networks'
edge graph inside jit. The flow of one training batch: ``CrystalDataset``
(:mod:`symat_jax.data`) -> :func:`epoch_batches` (budgets, encoder graph,
dense crystals, targets) -> ``train_step`` (:mod:`symat_jax.train`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import jraph
import numpy as np

from symat_jax.data.dataset import CrystalDataset
from symat_jax.geometry import lattice_matrix_np
from symat_jax.ragged import pad_atoms  # noqa: F401  (batching pads with it)
from symat_jax.statics import LatticeStandardizer

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True, order=True)
class PadBudget:
    """Padded sizes of one batch shape: totals of nodes, edges and graphs (each includes the padding graph).

    ``max_degree`` is the width of the incoming-edge table (the dataset's
    largest in-degree).
    """

    n_node: int
    n_edge: int
    n_graph: int
    max_degree: int = 1


def _round_up(x: int, multiple: int) -> int:
    """Return ``x`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(x / multiple) * multiple)


def pad_budgets(
    dataset: CrystalDataset,
    batch_size: int,
    num_buckets: int = 3,
    multiple: int = 64,
    seed: int = 0,
    trials: int = 256,
) -> list[PadBudget]:
    """Return up to ``num_buckets`` budgets, ascending; the largest holds any batch of ``batch_size``.

    The smaller budgets sit at quantiles of the node and edge totals of random
    batches, so most batches take a budget near their real size; the largest
    is the worst case (the ``batch_size`` largest crystals), so no batch is
    ever cut.
    """
    num_atoms = dataset.num_atoms
    num_edges = dataset.num_edges
    max_degree = dataset.max_in_degree()
    b = min(batch_size, len(num_atoms))
    worst = PadBudget(
        _round_up(int(np.sort(num_atoms)[-b:].sum()) + 1, multiple),
        _round_up(int(np.sort(num_edges)[-b:].sum()) + 1, multiple),
        batch_size + 1,
        max_degree,
    )
    if num_buckets <= 1 or b == len(num_atoms):
        return [worst]
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(len(num_atoms), size=b, replace=False) for _ in range(trials)])
    nodes = num_atoms[draws].sum(axis=1)
    edges = num_edges[draws].sum(axis=1)
    budgets = {worst}
    for q in np.linspace(0.5, 0.99, num_buckets - 1):
        budgets.add(
            PadBudget(
                min(_round_up(int(np.quantile(nodes, q)) + 1, multiple), worst.n_node),
                min(_round_up(int(np.quantile(edges, q)) + 1, multiple), worst.n_edge),
                batch_size + 1,
                max_degree,
            )
        )
    return sorted(budgets)


def choose_budget(n_node: int, n_edge: int, budgets: Sequence[PadBudget]) -> PadBudget:
    """Return the smallest budget holding ``n_node`` nodes and ``n_edge`` edges plus the padding graph."""
    for budget in sorted(budgets):
        if budget.n_node >= n_node + 1 and budget.n_edge >= n_edge:
            return budget
    raise ValueError(f"no budget holds {n_node} nodes and {n_edge} edges; largest is {max(budgets)}")


def encoder_batch(dataset: CrystalDataset, indices: Sequence[int], budget: PadBudget) -> jraph.GraphsTuple:
    """Return the CrystalNN graphs of ``dataset[indices]`` as one GraphsTuple padded to ``budget``.

    nodes: ``atomic_numbers`` [n_node] int32, ``frac_coords`` [n_node, 3];
    edges: ``offsets`` [n_edge, 3] float32 (edge vector ``x_r - x_s - offset @ L``);
    globals: ``lengths``, ``angles`` [n_graph, 3], ``lattice`` [n_graph, 3, 3].
    Padding nodes and edges belong to the last graph; use
    ``jraph.get_graph_padding_mask`` and friends to mask them.
    """
    if not dataset.has_graph:
        raise ValueError("dataset was read without the encoder graph (read_csv(..., with_graph=True))")
    sub = dataset.subset(indices)
    starts = sub.atom_offsets[:-1]
    edge_owner = np.repeat(np.arange(len(sub)), sub.num_edges)
    senders = sub.edge_index[:, 0] + starts[edge_owner]
    receivers = sub.edge_index[:, 1] + starts[edge_owner]
    lattices = np.stack([lattice_matrix_np(l, a) for l, a in zip(sub.lengths, sub.angles)])
    graph = jraph.GraphsTuple(
        nodes={
            "atomic_numbers": sub.atomic_numbers.astype(np.int32),
            "frac_coords": sub.frac_coords.astype(np.float32),
        },
        edges={"offsets": sub.edge_offsets.astype(np.float32)},
        senders=senders.astype(np.int32),
        receivers=receivers.astype(np.int32),
        globals={
            "lengths": sub.lengths.astype(np.float32),
            "angles": sub.angles.astype(np.float32),
            "lattice": lattices.astype(np.float32),
        },
        n_node=sub.num_atoms.astype(np.int32),
        n_edge=sub.num_edges.astype(np.int32),
    )
    padded = jraph.pad_with_graphs(graph, budget.n_node, budget.n_edge, budget.n_graph)
    in_edges, in_mask = incoming_edge_table(receivers, budget.n_node, budget.max_degree)
    return padded._replace(nodes={**padded.nodes, "in_edges": in_edges, "in_mask": in_mask})


def incoming_edge_table(receivers: np.ndarray, num_nodes: int, max_degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(in_edges [num_nodes, max_degree] int32, in_mask)``: each node's incoming edge ids (host-side).

    Raises ValueError when a node has more than ``max_degree`` incoming edges.
    """
    receivers = np.asarray(receivers)
    order = np.argsort(receivers, kind="stable")
    counts = np.bincount(receivers, minlength=num_nodes)
    if counts.size and counts.max() > max_degree:
        raise ValueError(f"a node has {counts.max()} incoming edges, more than max_degree={max_degree}")
    slot = np.arange(len(receivers)) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.zeros((num_nodes, max_degree), np.int32)
    mask = np.zeros((num_nodes, max_degree), bool)
    table[receivers[order], slot] = order
    mask[receivers[order], slot] = True
    return table, mask


def batches(
    dataset: CrystalDataset,
    batch_size: int,
    budgets: Sequence[PadBudget],
    *,
    order: np.ndarray | None = None,
) -> Iterator[tuple[jraph.GraphsTuple, np.ndarray]]:
    """Yield ``(padded encoder graph, crystal indices)`` over ``dataset`` in ``order`` (default: as stored).

    The last batch may hold fewer crystals; it is padded to a budget like the rest.
    """
    order = np.arange(len(dataset)) if order is None else np.asarray(order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        n_node = int(dataset.num_atoms[idx].sum())
        n_edge = int(dataset.num_edges[idx].sum())
        yield encoder_batch(dataset, idx, choose_budget(n_node, n_edge, budgets)), idx


def dense_batch(dataset: CrystalDataset, indices: Sequence[int], max_atoms: int) -> dict[str, np.ndarray]:
    """Return crystals ``dataset[indices]`` padded to ``max_atoms`` as dense arrays.

    ``atomic_numbers`` [b, n] (0 for padding), ``frac_coords`` [b, n, 3],
    ``atom_mask`` [b, n] bool, ``lengths``/``angles`` [b, 3], ``num_atoms`` [b].
    Raises ValueError naming the crystal when one holds more than ``max_atoms``.
    """
    indices = np.asarray(indices)
    too_big = dataset.num_atoms[indices] > max_atoms
    if np.any(too_big):
        first = indices[np.argmax(too_big)]
        raise ValueError(
            f"crystal {dataset.material_id[first]} has {dataset.num_atoms[first]} atoms, "
            f"more than max_atoms={max_atoms}"
        )
    sub = dataset.subset(indices)
    z, frac, mask = pad_atoms(sub.num_atoms, sub.atomic_numbers, sub.frac_coords, max_atoms)
    return {
        "atomic_numbers": z,
        "frac_coords": frac,
        "atom_mask": mask,
        "lengths": dataset.lengths[indices].astype(np.float32),
        "angles": dataset.angles[indices].astype(np.float32),
        "num_atoms": dataset.num_atoms[indices].astype(np.int32),
    }


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

    ``enc``: their padded encoder GraphsTuple (from :func:`encoder_batch`); ``atomic_numbers [b, n]``, ``frac_coords
    [b, n, 3]``, ``atom_mask``, ``lengths``/``angles [b, 3]``; ``crystal_mask
    [b]``; targets ``num_types [b]``, ``elements``/``element_mask``/``counts
    [b, m]``, ``element_multi_hot [b, 100]``, ``lattice_std [b + 1, 6]`` (a
    row per encoder graph, padding included).
    """
    indices = np.asarray(indices)
    real = len(indices)
    if real > batch_size:
        raise ValueError(f"{real} crystals do not fit a batch of {batch_size}")
    dense = dense_batch(data, indices, max_atoms)
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
    budgets: list[PadBudget],
    batch_size: int,
    max_atoms: int,
    num_element_slots: int,
    standardizer: LatticeStandardizer,
) -> Iterator[Batch]:
    """Yield the batches of one pass over ``data`` in ``order``."""
    for enc, idx in batches(data, batch_size, budgets, order=order):
        yield make_batch(data, idx, enc, batch_size, max_atoms, num_element_slots, standardizer)
