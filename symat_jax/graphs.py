"""Batches as jraph graphs: padded encoder graphs in a few fixed budgets, and score graphs from neighbour lists.

Two layouts, one per consumer:

* ``encoder_batch``: the CrystalNN graphs of a batch of crystals concatenated
  into one ``jraph.GraphsTuple``, padded (``jraph.pad_with_graphs``) to one of a
  few :class:`PadBudget` sizes so an epoch compiles a small fixed number of
  programs.
* ``dense_batch`` + ``score_edge_graph``: crystals padded to ``max_atoms`` as
  dense arrays (what the jitted neighbour list and Langevin loop take), and
  the flattening of a batched :class:`~symat_jax.neighbors.NeighborList` into
  an :class:`EdgeGraph` inside jit.

Both feed the networks as an :class:`EdgeGraph` (``encoder_edge_graph`` for
the first).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from pymatgen.core import Lattice

from symat_jax.data.dataset import CrystalDataset
from symat_jax.neighbors import NeighborList

Array = jax.Array


class EdgeGraph(NamedTuple):
    """A batch of graphs in the flat layout the SphereNet modules take.

    Edge vectors are ``x_receiver - x_sender - offset @ L``. ``in_edges``
    lists each node's incoming edges (``in_mask`` marks real ones), so the
    triplets ``k -> j -> i`` of edge ``j -> i`` are ``in_edges[j]``.
    """

    atomic_numbers: Array  # [nodes] int32, 0 for padding
    node_mask: Array  # [nodes] bool
    node_graph: Array  # [nodes] int32 graph id of each node
    senders: Array  # [e] int32
    receivers: Array  # [e] int32
    vectors: Array  # [e, 3]
    offsets: Array  # [e, 3] int32
    edge_mask: Array  # [e] bool
    in_edges: Array  # [nodes, d] int32
    in_mask: Array  # [nodes, d] bool


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
    lattices = np.stack([Lattice.from_parameters(*l, *a).matrix for l, a in zip(sub.lengths, sub.angles)])
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


def encoder_edge_graph(g: jraph.GraphsTuple) -> EdgeGraph:
    """Return the :class:`EdgeGraph` of a padded encoder batch from :func:`encoder_batch` (jit-safe)."""
    n_node = g.nodes["atomic_numbers"].shape[0]
    n_graph = g.n_node.shape[0]
    node_graph = jnp.repeat(jnp.arange(n_graph), g.n_node, total_repeat_length=n_node)
    lattice = g.globals["lattice"][node_graph]  # [nodes, 3, 3]
    pos = jnp.einsum("ni,nij->nj", g.nodes["frac_coords"], lattice)
    offsets = g.edges["offsets"]
    vectors = pos[g.receivers] - pos[g.senders] - jnp.einsum("ei,eij->ej", offsets, lattice[g.receivers])
    node_mask = jraph.get_node_padding_mask(g)
    edge_mask = jraph.get_edge_padding_mask(g)
    return EdgeGraph(
        atomic_numbers=jnp.where(node_mask, g.nodes["atomic_numbers"], 0),
        node_mask=node_mask,
        node_graph=node_graph,
        senders=g.senders,
        receivers=g.receivers,
        vectors=jnp.where(edge_mask[:, None], vectors, 0.0),
        offsets=offsets.astype(jnp.int32),
        edge_mask=edge_mask,
        in_edges=g.nodes["in_edges"],
        in_mask=g.nodes["in_mask"],
    )


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


def score_edge_graph(
    nl: NeighborList, atomic_numbers: Array, atom_mask: Array, num_nodes: int | None = None
) -> tuple[EdgeGraph, Array]:
    """Return a batched neighbour list ``[b, n, k]`` as one :class:`EdgeGraph`, and each slot's edge id ``[b, n, k]``.

    With ``num_nodes`` (static, at least the number of real atoms) only real
    atoms become nodes, packed in order, so the network does no work on
    padding atoms; otherwise node ``b * n + i`` is atom ``i`` of crystal ``b``.
    Each node's ``k`` incoming edges are its own neighbour row (edge
    ``node * k + slot``). Slots of padding atoms get edge id ``num_nodes * k``
    (out of range: gathers with ``mode="fill"`` read 0). jit-safe.
    """
    b, n, k = nl.senders.shape
    flat_mask = atom_mask.reshape(-1)
    if num_nodes is None:
        num_nodes = b * n
        node_id = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
    else:
        packed = jnp.cumsum(flat_mask.astype(jnp.int32)) - 1
        node_id = jnp.where(flat_mask, packed, num_nodes).reshape(b, n).astype(jnp.int32)
    e_total = num_nodes * k
    slot_id = node_id[:, :, None] * k + jnp.arange(k, dtype=jnp.int32)  # [b, n, k]
    slot_id = jnp.where(atom_mask[:, :, None], slot_id, e_total)
    local_s = jnp.where(nl.mask, nl.senders, 0)
    senders = jnp.take_along_axis(node_id, local_s.reshape(b, n * k), axis=1).reshape(b, n, k)
    receivers = jnp.broadcast_to(node_id[:, :, None], (b, n, k))

    def scatter(values: Array, fill: Any) -> Array:
        flat = values.reshape(b * n * k, *values.shape[3:])
        out = jnp.full((e_total, *flat.shape[1:]), fill, flat.dtype)
        return out.at[slot_id.reshape(-1)].set(flat, mode="drop")

    edge_mask = scatter(nl.mask, False)
    crystal = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, n)).reshape(-1)
    nodes = node_id.reshape(-1)
    graph = EdgeGraph(
        atomic_numbers=jnp.zeros(num_nodes, jnp.int32).at[nodes].set(
            jnp.where(flat_mask, atomic_numbers.reshape(-1), 0), mode="drop"
        ),
        node_mask=jnp.zeros(num_nodes, bool).at[nodes].set(flat_mask, mode="drop"),
        node_graph=jnp.zeros(num_nodes, jnp.int32).at[nodes].set(crystal, mode="drop"),
        senders=scatter(jnp.where(nl.mask, senders, 0), 0),
        receivers=scatter(jnp.where(nl.mask, receivers, 0), 0),
        vectors=scatter(nl.vectors, 0.0),
        offsets=scatter(nl.offsets, 0),
        edge_mask=edge_mask,
        in_edges=jnp.arange(e_total, dtype=jnp.int32).reshape(num_nodes, k),
        in_mask=edge_mask.reshape(num_nodes, k),
    )
    return graph, slot_id
