"""Edge graphs inside jit: the flat layout the networks take, built from padded batches and neighbour lists.

Everything here runs under ``jit`` on arrays with static shapes:

* :func:`encoder_edge_graph`: a padded encoder ``jraph.GraphsTuple`` (built on
  the host by :mod:`symat_jax.input_pipeline`) -> :class:`EdgeGraph`;
* :func:`score_edge_graph`: a batched :class:`~symat_jax.neighbors.NeighborList`
  of crystals padded to ``n`` atoms -> one :class:`EdgeGraph`.

This module imports no host-side code (no pymatgen, no CSV reader).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jraph

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
