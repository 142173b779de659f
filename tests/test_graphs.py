"""jraph batching: budgets that hold every batch, few shapes per epoch, masks, and score graphs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from symat_jax import geometry, graphs, input_pipeline
from symat_jax.data import read_csv
from symat_jax.neighbors import periodic_neighbors, required_image_range

from conftest import csv_rows, write_csv


@pytest.fixture(scope="module")
def small_graph_set(data_root, tmp_path_factory):
    """Return 48 Carbon-24 test crystals with their encoder graphs."""
    tmp = tmp_path_factory.mktemp("graphs")
    path = write_csv(tmp / "c48.csv", csv_rows(data_root / "carbon_24" / "test.csv")[:48])
    return read_csv(path, "carbon_24", cache_dir=tmp, progress=False)


def test_budgets_hold_every_batch_and_bound_compilations(small_graph_set):
    data = small_graph_set
    budgets = input_pipeline.pad_budgets(data, batch_size=8, num_buckets=3, multiple=16)
    assert 1 <= len(budgets) <= 3
    traces = []

    @jax.jit
    def count_real_nodes(g):
        traces.append(g.n_node.shape)  # runs once per compiled shape
        return jnp.sum(jraph.get_node_padding_mask(g))

    rng = np.random.default_rng(0)
    seen = set()
    for epoch in range(3):
        order = rng.permutation(len(data))
        for g, idx in input_pipeline.batches(data, 8, budgets, order=order):
            seen.add((g.nodes["atomic_numbers"].shape[0], g.senders.shape[0]))
            assert int(count_real_nodes(g)) == int(data.num_atoms[idx].sum())
            assert int(jnp.sum(jraph.get_edge_padding_mask(g))) == int(data.num_edges[idx].sum())
            assert int(jnp.sum(jraph.get_graph_padding_mask(g))) == len(idx)
    assert len(seen) <= len(budgets)
    assert len(traces) == len(seen)


def test_encoder_batch_reproduces_each_crystal(small_graph_set):
    data = small_graph_set
    budgets = input_pipeline.pad_budgets(data, batch_size=5, num_buckets=1)
    idx = np.array([7, 2, 30, 11, 4])
    g = input_pipeline.encoder_batch(data, idx, budgets[0])
    node_start = np.concatenate([[0], np.cumsum(g.n_node)])
    edge_start = np.concatenate([[0], np.cumsum(g.n_edge)])
    for b, i in enumerate(idx):
        c = data.crystal(i)
        nodes = slice(node_start[b], node_start[b + 1])
        np.testing.assert_array_equal(g.nodes["atomic_numbers"][nodes], c.atomic_numbers)
        edges = slice(edge_start[b], edge_start[b + 1])
        np.testing.assert_array_equal(g.senders[edges] - node_start[b], c.edge_index[:, 0])
        np.testing.assert_array_equal(g.receivers[edges] - node_start[b], c.edge_index[:, 1])
        np.testing.assert_allclose(g.globals["lattice"][b], c.lattice(), atol=1e-5)
        # Edge vectors from the batch equal those from the crystal alone.
        x = np.asarray(geometry.frac_to_cart(g.nodes["frac_coords"], g.globals["lattice"][b]))
        vec = x[g.receivers[edges]] - x[g.senders[edges]] - g.edges["offsets"][edges] @ g.globals["lattice"][b]
        xc = c.frac_coords @ c.lattice()
        ref = xc[c.edge_index[:, 1]] - xc[c.edge_index[:, 0]] - c.edge_offsets @ c.lattice()
        np.testing.assert_allclose(vec, ref, atol=1e-4)


def test_too_large_crystal_is_reported(small_graph_set):
    with pytest.raises(ValueError, match="more than max_atoms=4"):
        input_pipeline.dense_batch(small_graph_set, [0, 1], max_atoms=4)


def test_score_edge_graph_aggregates_like_the_dense_list(small_graph_set):
    data = small_graph_set
    idx = np.arange(6)
    batch = input_pipeline.dense_batch(data, idx, max_atoms=24)
    lat = geometry.lattice_matrix(batch["lengths"], batch["angles"])
    pos = geometry.frac_to_cart(jnp.asarray(batch["frac_coords"]), lat)
    mask = jnp.asarray(batch["atom_mask"])
    fn = functools.partial(
        periodic_neighbors, cutoff=3.0, max_neighbors=5, keep_nearest=True,
        max_images=required_image_range(np.asarray(lat), 3.0),
    )

    real = int(np.sum(batch["atom_mask"]))

    @jax.jit
    def sums(pos, lat, mask, z):
        nl = jax.vmap(fn)(pos, lat, mask)
        g, slots = graphs.score_edge_graph(nl, z, mask, num_nodes=real + 3)
        d = jnp.where(g.edge_mask, jnp.linalg.norm(g.vectors, axis=-1), 0.0)
        per_node = jax.ops.segment_sum(d, g.receivers, num_segments=g.node_mask.shape[0])
        per_slot = jnp.take(d, slots, mode="fill", fill_value=0.0)
        # The incoming-edge table of each node lists exactly its edges.
        ok = jnp.all(jnp.where(g.in_mask, g.receivers[g.in_edges] == jnp.arange(g.node_mask.shape[0])[:, None], True))
        return per_node, per_slot, nl, g, ok

    per_node, per_slot, nl, g, ok = sums(pos, lat, mask, jnp.asarray(batch["atomic_numbers"]))
    assert bool(ok)
    np.testing.assert_allclose(per_slot, nl.distances, rtol=1e-6)  # slots map back exactly
    dense_sum = np.asarray(jnp.sum(nl.distances, axis=-1))[batch["atom_mask"]]
    np.testing.assert_allclose(np.asarray(per_node)[:real], dense_sum, rtol=1e-5)  # packed in order
    assert not np.any(np.asarray(per_node)[real:]) and not np.any(np.asarray(g.node_mask)[real:])
    np.testing.assert_array_equal(np.asarray(g.atomic_numbers)[:real], batch["atomic_numbers"][batch["atom_mask"]])


def test_encoder_edge_graph_vectors_and_incoming_table(small_graph_set):
    data = small_graph_set
    budgets = input_pipeline.pad_budgets(data, batch_size=6, num_buckets=1)
    idx = np.array([3, 9, 0, 17, 5, 41])
    g = graphs.encoder_edge_graph(input_pipeline.encoder_batch(data, idx, budgets[0]))
    node_start = np.concatenate([[0], np.cumsum(data.num_atoms[idx])])
    e = 0
    for b, i in enumerate(idx):
        c = data.crystal(i)
        x = c.frac_coords @ c.lattice()
        ref = x[c.edge_index[:, 1]] - x[c.edge_index[:, 0]] - c.edge_offsets @ c.lattice()
        np.testing.assert_allclose(g.vectors[e : e + len(ref)], ref, atol=1e-4)
        np.testing.assert_array_equal(g.node_graph[node_start[b] : node_start[b + 1]], b)
        e += len(ref)
    assert not np.any(np.asarray(g.edge_mask)[e:]) and np.all(np.asarray(g.edge_mask)[:e])
    recv = np.asarray(g.receivers)
    table, tmask = np.asarray(g.in_edges), np.asarray(g.in_mask)
    for node in range(node_start[-1]):
        assert sorted(table[node][tmask[node]]) == sorted(np.flatnonzero((recv == node) & np.asarray(g.edge_mask)))
    with pytest.raises(ValueError, match="max_degree"):
        input_pipeline.incoming_edge_table(np.array([0, 0, 0, 1]), 2, 2)
