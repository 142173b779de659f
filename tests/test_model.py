"""The SyMat model with random weights: invariances, equivariance and padding independence."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from symat_jax import graphs, input_pipeline, score
from symat_jax.configs import ModelConfig
from symat_jax.model import SyMat, fit_counts, per_atom_scores
from symat_jax.networks import SphereNetConfig
from symat_jax.neighbors import required_image_range

from conftest import csv_rows, write_csv

TINY = dict(num_layers=2, hidden=16, out_channels=16, int_emb=8, out_emb=16, num_output_layers=1,
            num_spherical=3, num_radial=4)
CONFIG = ModelConfig(
    max_atoms=24, latent_comp=16, latent_pos=16, latent_lat=8, decoder_hidden=32,
    encoder=SphereNetConfig(**TINY),
    score_net=SphereNetConfig(**{**TINY, "out_channels": 0}, envelope_exponent=None, use_angles=False, graph_output=False),
    score_cutoff=3.0,
)
MODEL = SyMat(CONFIG)


@pytest.fixture(scope="module")
def crystals(data_root, tmp_path_factory):
    """Return 8 Carbon-24 and 4 Perov-5 test crystals with encoder graphs."""
    tmp = tmp_path_factory.mktemp("model")
    from symat_jax.data import read_csv

    rows = csv_rows(data_root / "carbon_24" / "test.csv")[:8] + csv_rows(data_root / "perov_5" / "test.csv")[:4]
    return read_csv(write_csv(tmp / "mix.csv", rows), "carbon_24", cache_dir=tmp, progress=False)


def edge_graph(z, pos, lattice, edge_index, offsets, max_degree=16):
    """Return the EdgeGraph of one crystal from raw arrays (host-side)."""
    s, r = edge_index[:, 0], edge_index[:, 1]
    vec = pos[r] - pos[s] - offsets @ lattice
    table, tmask = input_pipeline.incoming_edge_table(r, len(z), max_degree)
    return graphs.EdgeGraph(
        atomic_numbers=jnp.asarray(z, jnp.int32), node_mask=jnp.ones(len(z), bool),
        node_graph=jnp.zeros(len(z), jnp.int32), senders=jnp.asarray(s, jnp.int32), receivers=jnp.asarray(r, jnp.int32),
        vectors=jnp.asarray(vec, jnp.float32), offsets=jnp.asarray(offsets, jnp.int32),
        edge_mask=jnp.ones(len(s), bool), in_edges=jnp.asarray(table), in_mask=jnp.asarray(tmask),
    )


@pytest.fixture(scope="module")
def params(crystals):
    return init_params(crystals, MODEL)


def init_params(crystals, model):
    """Return parameters of ``model`` with its zero-initialised output layers randomised."""
    c = crystals.crystal(0)
    g = edge_graph(c.atomic_numbers, c.frac_coords @ c.lattice(), c.lattice(), c.edge_index, c.edge_offsets)
    pos, lat, mask, z = dense_one(c, 24)
    nl = jax.vmap(functools.partial(score.score_graph, config=score_config(lat)))(pos, lat, mask)
    sg, _ = graphs.score_edge_graph(nl, z, mask)
    params = model.init(jax.random.PRNGKey(0), g, jnp.zeros((1, 6)), 1, sg, 1)
    # Output layers start at zero (so the encoder starts at 0); randomise them
    # so that the invariance tests compare non-trivial outputs.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 2 and not np.any(x) else x
              for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def score_config(lat):
    return score.ScoreGraphConfig(3.0, 5, required_image_range(np.asarray(lat), 3.0))


def dense_one(c, n_max, pos=None, lattice=None):
    lattice = c.lattice() if lattice is None else lattice
    pos = c.frac_coords @ lattice if pos is None else pos
    n = len(pos)
    p = np.zeros((1, n_max, 3), np.float32)
    p[0, :n] = pos
    z = np.zeros((1, n_max), np.int32)
    z[0, :n] = c.atomic_numbers
    return jnp.asarray(p), jnp.asarray(lattice[None], jnp.float32), jnp.asarray(np.arange(n_max)[None] < n), jnp.asarray(z)


def encode(params, g):
    return np.asarray(MODEL.apply(params, g, jnp.zeros((1, 6)), 1, method=SyMat.encode).comp_mean[0])


def scores(params, c, pos, lattice, z_pos, perm=None, n_max=24, model=MODEL):
    z = c.atomic_numbers if perm is None else c.atomic_numbers[perm]
    cc = type(c)(atomic_numbers=z, frac_coords=c.frac_coords, lengths=c.lengths, angles=c.angles)
    p, lat, mask, zz = dense_one(cc, n_max, pos, lattice)
    nl = jax.vmap(functools.partial(score.score_graph, config=score_config(lat)))(p, lat, mask)
    assert not np.any(nl.overflow)
    sg, slots = graphs.score_edge_graph(nl, zz, mask, num_nodes=len(pos) + 2)
    s = model.apply(params, sg, z_pos, method=SyMat.edge_scores)
    return np.asarray(per_atom_scores(s, slots, nl)[0, : len(pos)])


@pytest.mark.parametrize("index", [0, 3, 9])
def test_encoder_is_invariant(params, crystals, index):
    c = crystals.crystal(index)
    L, pos = c.lattice(), c.frac_coords @ c.lattice()
    base = encode(params, edge_graph(c.atomic_numbers, pos, L, c.edge_index, c.edge_offsets))
    assert np.abs(base).max() > 1e-3  # not trivially zero
    R = Rotation.random(random_state=index).as_matrix()
    rotated = encode(params, edge_graph(c.atomic_numbers, pos @ R.T, L @ R.T, c.edge_index, c.edge_offsets))
    moved = encode(params, edge_graph(c.atomic_numbers, pos + np.array([1.3, -0.4, 7.0]), L, c.edge_index, c.edge_offsets))
    # Atom 1 replaced by its image one cell along a and back along c: offsets follow.
    m = np.array([1, 0, -1])
    pos_img = pos.copy()
    pos_img[1] += m @ L
    off = c.edge_offsets.copy()
    off[c.edge_index[:, 0] == 1] -= m
    off[c.edge_index[:, 1] == 1] += m
    imaged = encode(params, edge_graph(c.atomic_numbers, pos_img, L, c.edge_index, off))
    perm = np.random.default_rng(index).permutation(len(pos))
    inv = np.argsort(perm)
    permuted = encode(params, edge_graph(c.atomic_numbers[perm], pos[perm], L, inv[c.edge_index], c.edge_offsets))
    for other in (rotated, moved, imaged, permuted):
        np.testing.assert_allclose(other, base, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [1, 4, 10])
def test_per_atom_score_is_equivariant(params, crystals, index):
    c = crystals.crystal(index)
    L = c.lattice()
    rng = np.random.default_rng(index)
    pos = (c.frac_coords + 0.05 * rng.normal(size=c.frac_coords.shape)) @ L  # off-equilibrium: scores non-zero
    z_pos = jax.random.normal(jax.random.PRNGKey(index), (1, CONFIG.latent_pos))
    base = scores(params, c, pos, L, z_pos)
    assert np.abs(base).max() > 1e-4
    R = Rotation.random(random_state=index).as_matrix()
    np.testing.assert_allclose(scores(params, c, pos @ R.T, L @ R.T, z_pos), base @ R.T, atol=2e-4)
    np.testing.assert_allclose(scores(params, c, pos + np.array([0.7, 2.1, -3.3]), L, z_pos), base, atol=2e-4)
    img = pos.copy()
    img[0] += np.array([-1, 2, 1]) @ L
    np.testing.assert_allclose(scores(params, c, img, L, z_pos), base, atol=2e-4)
    perm = rng.permutation(len(pos))
    np.testing.assert_allclose(scores(params, c, pos[perm], L, z_pos, perm=perm), base[perm], atol=2e-4)


@pytest.mark.parametrize("condition", ["head", "nodes"])
def test_score_condition_decides_where_z_pos_enters(crystals, condition):
    model = SyMat(dataclasses.replace(CONFIG, score_condition=condition))
    p = init_params(crystals, model)
    c = crystals.crystal(1)
    L = c.lattice()
    pos = (c.frac_coords + 0.05 * np.random.default_rng(0).normal(size=c.frac_coords.shape)) @ L
    z1, z2 = (jax.random.normal(jax.random.PRNGKey(k), (1, CONFIG.latent_pos)) for k in (1, 2))
    # Cut z_pos out of the score head: only a conditioned network still hears it.
    head = p["params"]["score_head"]["Dense_0"]
    cut = {**p, "params": {**p["params"], "score_head": {**p["params"]["score_head"], "Dense_0": {
        **head, "kernel": head["kernel"].at[-CONFIG.latent_pos:].set(0.0)}}}}
    a, b = (scores(cut, c, pos, L, z, model=model) for z in (z1, z2))
    assert (np.abs(a - b).max() > 1e-4) == (condition == "nodes")
    R = Rotation.random(random_state=3).as_matrix()  # still equivariant with the latent on the atoms
    np.testing.assert_allclose(scores(p, c, pos @ R.T, L @ R.T, z1, model=model), scores(p, c, pos, L, z1, model=model) @ R.T,
                               atol=2e-4)


def test_padding_never_changes_a_real_crystal(params, crystals):
    """One crystal alone and inside padded batches of others: same latents and scores to 1e-5."""
    target = 2
    small = input_pipeline.PadBudget(64, 256, 2, 16)
    alone = graphs.encoder_edge_graph(input_pipeline.encoder_batch(crystals, [target], small))
    big = input_pipeline.PadBudget(512, 2048, 9, 16)
    batch = graphs.encoder_edge_graph(input_pipeline.encoder_batch(crystals, [5, 0, target, 7, 11], big))
    a = MODEL.apply(params, alone, jnp.zeros((2, 6)), 2, method=SyMat.encode)
    b = MODEL.apply(params, batch, jnp.zeros((9, 6)), 9, method=SyMat.encode)
    np.testing.assert_allclose(a.comp_mean[0], b.comp_mean[2], atol=1e-5)
    np.testing.assert_allclose(a.pos_mean[0], b.pos_mean[2], atol=1e-5)

    z_pos = jax.random.normal(jax.random.PRNGKey(3), (5, CONFIG.latent_pos))
    dense = input_pipeline.dense_batch(crystals, [5, 0, target, 7, 11], 24)
    lat = jnp.asarray(np.stack([crystals.crystal(i).lattice() for i in [5, 0, target, 7, 11]]), jnp.float32)
    pos = jnp.einsum("bni,bij->bnj", dense["frac_coords"], lat)
    mask = jnp.asarray(dense["atom_mask"])
    cfg = score_config(lat)
    nl = jax.vmap(functools.partial(score.score_graph, config=cfg))(pos, lat, mask)
    sg, slots = graphs.score_edge_graph(nl, jnp.asarray(dense["atomic_numbers"]), mask, num_nodes=int(mask.sum()) + 7)
    batched = per_atom_scores(MODEL.apply(params, sg, z_pos, method=SyMat.edge_scores), slots, nl)
    c = crystals.crystal(target)
    alone_scores = scores(params, c, c.frac_coords @ c.lattice(), c.lattice(), z_pos[2:3])
    np.testing.assert_allclose(batched[2, : c.num_atoms], alone_scores, atol=1e-5)
    assert not np.any(np.asarray(batched)[~dense["atom_mask"]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_counts_is_the_best_assignment_that_fits(seed):
    rng = np.random.default_rng(seed)
    b, m, c, total = 6, 3, 5, 7
    logits = rng.normal(size=(b, m, c)) * 3
    active = np.arange(m)[None] < rng.integers(1, m + 1, size=b)[:, None]
    got = np.asarray(fit_counts(jnp.asarray(logits, jnp.float32), jnp.asarray(active), total))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for i in range(b):
        # Brute force over every count assignment of the active elements.
        options = [range(1, c + 1) if active[i, j] else [0] for j in range(m)]
        best = max((a for a in itertools.product(*options) if sum(a) <= total),
                   key=lambda a: sum(logp[i, j, a[j] - 1] for j in range(m) if a[j]))
        np.testing.assert_array_equal(got[i], best)
    # A limit that every argmax fits changes nothing.
    free = np.asarray(fit_counts(jnp.asarray(logits, jnp.float32), jnp.asarray(active), m * c))
    np.testing.assert_array_equal(free, np.where(active, logits.argmax(-1) + 1, 0))
