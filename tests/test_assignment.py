"""The noisy-to-clean assignment of the score target: optimal, label-free, the identity at low noise."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from symat_jax import assignment, geometry, input_pipeline, score, train

from conftest import first_tiny_batch

LATTICE = np.array([[4.1, 0.0, 0.0], [0.9, 3.7, 0.0], [0.4, -0.6, 4.6]])
GRAPH = score.ScoreGraphConfig(cutoff=3.0, max_neighbors=5, max_images=(2, 2, 2))


def _crystal(seed, n=6):
    rng = np.random.default_rng(seed)
    clean = rng.random((n, 3)) @ LATTICE
    numbers = np.array([6, 6, 6, 8, 8, 14][:n])
    return rng, clean, numbers


def _cost(clean, noisy):
    d = assignment._pairwise_displacements(clean, noisy, LATTICE)
    return np.sum(d**2, axis=-1)


@pytest.mark.parametrize("sigma", [0.05, 0.6, 3.0])
def test_the_pairing_is_the_cheapest_same_element_permutation(sigma):
    for seed in range(4):
        rng, clean, numbers = _crystal(seed)
        noisy = clean + sigma * rng.normal(size=clean.shape)
        perm, shift = assignment.match_one(clean, noisy, LATTICE, numbers, refinements=0)
        assert np.all(numbers[perm] == numbers) and np.all(shift == 0)
        c = _cost(clean, noisy)
        brute = min(c[np.arange(6), list(p)].sum() for p in itertools.permutations(range(6))
                    if np.all(numbers[list(p)] == numbers))
        np.testing.assert_allclose(c[np.arange(6), perm].sum(), brute, rtol=1e-12)


def test_refining_the_translation_never_costs_more():
    for seed in range(6):
        rng, clean, numbers = _crystal(seed)
        noisy = clean + 1.5 * rng.normal(size=clean.shape) + np.array([0.7, -0.4, 1.1])
        p0, _ = assignment.match_one(clean, noisy, LATTICE, numbers, refinements=0)
        p3, s3 = assignment.match_one(clean, noisy, LATTICE, numbers, refinements=3)
        assert _cost(clean + s3, noisy)[np.arange(6), p3].sum() <= _cost(clean, noisy)[np.arange(6), p0].sum() + 1e-9


def _targets(clean, noisy, mask, numbers, matched):
    lat = jnp.asarray(np.tile(LATTICE, (clean.shape[0], 1, 1)), jnp.float32)
    if matched:
        clean = assignment.match_clean(clean, noisy, lat, mask, numbers)
    clean, noisy = jnp.asarray(clean, jnp.float32), jnp.asarray(noisy, jnp.float32)
    nl = jax.vmap(lambda x, lt, m: score.score_graph(x, lt, m, GRAPH))(noisy, lat, jnp.asarray(mask))
    return np.asarray(jax.vmap(score.score_target)(clean, noisy, lat, nl))


def test_matched_targets_ignore_atom_labels_and_equal_spec_targets_at_low_noise():
    rng, clean, numbers = _crystal(7)
    mask = np.ones((1, 6), bool)
    relabel = np.array([2, 0, 1, 4, 3, 5])  # same elements, other labels, one atom moved by a lattice vector
    other = clean[relabel] + np.array([[0, 0, 0], LATTICE[0], [0, 0, 0], [0, 0, 0], -LATTICE[2], [0, 0, 0]])
    for sigma in (0.02, 4.0):
        noisy = geometry.wrap_cart(jnp.asarray(clean + sigma * rng.normal(size=clean.shape)), jnp.asarray(LATTICE))
        noisy = np.asarray(noisy)[None]
        spec = _targets(clean[None], noisy, mask, numbers[None], matched=False)
        spec_relabelled = _targets(other[None], noisy, mask, numbers[None], matched=False)
        matched = _targets(clean[None], noisy, mask, numbers[None], matched=True)
        matched_relabelled = _targets(other[None], noisy, mask, numbers[None], matched=True)
        np.testing.assert_allclose(matched, matched_relabelled, atol=1e-4)
        # SPEC 3's target follows the labels (the pairing); the matched one does not, and where the noise keeps
        # each atom nearest its own site it is SPEC 3's.
        assert not np.allclose(spec, spec_relabelled, atol=1e-2)
        if sigma < 0.1:
            np.testing.assert_allclose(matched, spec, atol=1e-4)
        else:
            assert not np.allclose(matched, spec, atol=1e-2)


def test_the_jitted_callback_equals_the_host_function_and_leaves_padding():
    rng, clean, numbers = _crystal(3)
    b, n = 3, 8
    c = np.zeros((b, n, 3)); x = np.zeros((b, n, 3)); z = np.zeros((b, n), int); m = np.zeros((b, n), bool)
    for i, k in enumerate((6, 4, 5)):
        c[i, :k] = clean[:k]; x[i, :k] = clean[:k] + 0.8 * rng.normal(size=(k, 3)); z[i, :k] = numbers[:k]; m[i, :k] = True
    c[:, -1] = 99.0  # padding rows must come back as they were
    lat = np.tile(LATTICE, (b, 1, 1))
    host = assignment.match_clean(c, x, lat, m, z)
    jitted = jax.jit(assignment.matched_clean)(*(jnp.asarray(a, jnp.float32) for a in (c, x, lat)), jnp.asarray(m),
                                               jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(jitted), host, atol=1e-4)
    assert np.all(np.asarray(jitted)[:, -1] == 99.0)


def _is_shifted_permutation(a, b, inv):
    d = (a @ inv)[:, None, :] - (b @ inv)[None, :, :]
    same = np.abs(d - np.round(d)).max(-1) < 1e-3
    return bool(np.all(same.sum(1) == 1) and np.all(same.sum(0) == 1))


def test_training_with_the_assignment_pairs_each_noisy_atom_no_worse_and_steps(full_run, tiny_config, tiny_data):
    workdir, _ = full_run
    statics, _, batch = first_tiny_batch(workdir, tiny_config, tiny_data[0])
    config = dataclasses.replace(tiny_config, target_matching="assignment")
    trainer = train.get_trainer(config, statics)
    clean, noisy, lattice, levels = jax.jit(trainer._noisy_positions)(batch, jax.random.PRNGKey(1))
    lat = np.asarray(geometry.lattice_matrix(batch["lengths"], batch["angles"]))
    original = np.asarray(geometry.frac_to_cart(batch["frac_coords"], lat))
    for c in range(8):
        real = np.asarray(batch["atom_mask"][c])
        got, orig, x = (np.asarray(a)[c][real] for a in (clean, original, noisy))
        inv = np.linalg.inv(lat[c])

        def cost(y):
            d = (x - y) @ inv
            return np.sum(((d - np.round(d)) @ lat[c]) ** 2)

        assert cost(got) <= cost(orig) + 1e-3
        # one shift of a permutation of the clean atoms (up to lattice vectors)
        assert any(_is_shifted_permutation(got - got[0] + orig[j], orig, inv) for j in range(len(orig)))
    state = trainer.init_state(batch, 0)
    state, metrics = trainer.train_step(state, batch)
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match="target_matching"):
        train.get_trainer(dataclasses.replace(tiny_config, target_matching="hungarian"), statics)


def test_the_normaliser_follows_the_pairing_the_loss_uses(tiny_data):
    train_set = tiny_data[0]
    dense = input_pipeline.dense_batch(train_set, np.arange(len(train_set)), 24)
    lat = np.asarray(geometry.lattice_matrix(train_set.lengths, train_set.angles))
    sigmas = np.array([0.02, 5.0])
    args = (dense["frac_coords"], lat, dense["atom_mask"], GRAPH, sigmas, jax.random.PRNGKey(0))
    spec = score.estimate_score_norm(*args, progress=False)
    matched = score.estimate_score_norm(*args, progress=False, numbers=dense["atomic_numbers"])
    np.testing.assert_allclose(matched[0], spec[0], rtol=1e-4)
    assert matched[1] < 0.8 * spec[1]
