"""Lattice geometry against pymatgen, the reference's noisy coordinates and brute force."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Lattice

from symat_jax import geometry

SIGMAS = np.exp(np.linspace(np.log(0.01), np.log(10.0), 50))


@pytest.mark.parametrize("name", ["carbon_24", "perov_5"])
def test_lattice_and_coordinates_match_pymatgen(test_splits, name):
    data = test_splits[name]
    lat = np.asarray(jax.jit(geometry.lattice_matrix)(data.lengths, data.angles))
    ref = np.stack([Lattice.from_parameters(*l, *a).matrix for l, a in zip(data.lengths, data.angles)])
    np.testing.assert_allclose(lat, ref, atol=1e-5 * np.abs(ref).max())

    lengths, angles = geometry.lattice_params(jnp.asarray(ref))
    np.testing.assert_allclose(lengths, data.lengths, rtol=1e-5)
    np.testing.assert_allclose(angles, data.angles, atol=1e-3)  # degrees; float32 arccos near 90

    for i, crystal in enumerate(data):
        s = crystal.to_structure()
        cart = np.asarray(geometry.frac_to_cart(jnp.asarray(crystal.frac_coords), jnp.asarray(ref[i])))
        np.testing.assert_allclose(cart, s.cart_coords, atol=1e-5)
        frac = np.asarray(geometry.cart_to_frac(jnp.asarray(s.cart_coords), jnp.asarray(ref[i])))
        np.testing.assert_allclose(frac, crystal.frac_coords, atol=1e-5)


@pytest.mark.parametrize("name", ["carbon_24", "perov_5"])
def test_wrapped_noisy_coordinates_match_reference(golden, name):
    """x~ = wrap(x + sigma_t eps) reproduces the reference's ``noisy_cart`` (SPEC 1 and 3)."""
    g = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(name + "/")}
    starts = np.concatenate([[0], np.cumsum(g["num_atoms"])])
    for c in range(len(g["num_atoms"])):
        sl = slice(starts[c], starts[c + 1])
        lat = geometry.lattice_matrix(g["lengths"][c], g["angles"][c])
        cart = geometry.frac_to_cart(jnp.asarray(g["frac_coords"][sl]), lat)
        noisy = cart + SIGMAS[g["level"][c]] * jnp.asarray(g["eps"][sl])
        wrapped = np.asarray(geometry.wrap_cart(noisy, lat))
        np.testing.assert_allclose(wrapped, g["noisy_cart"][sl], atol=1e-4)


def test_wrap_is_invariant_to_periodic_images_and_ignores_padding():
    rng = np.random.default_rng(0)
    frac = rng.uniform(-3, 3, size=(7, 3))
    mask = np.array([True] * 5 + [False] * 2)
    wrapped = np.asarray(geometry.wrap_frac(jnp.asarray(frac), jnp.asarray(mask)))
    shifted = frac + rng.integers(-4, 5, size=frac.shape)
    shifted[5:] = 100.0  # padding content must not matter
    again = np.asarray(geometry.wrap_frac(jnp.asarray(shifted), jnp.asarray(mask)))
    np.testing.assert_allclose(again[:5], wrapped[:5], atol=1e-5)
    real = wrapped[:5]
    np.testing.assert_allclose(real.max(0) + real.min(0), 0.0, atol=1e-6)
    assert np.all(np.abs(real) <= 0.5 + 1e-6)


@pytest.mark.parametrize(
    "lat, search",
    [
        (Lattice.from_parameters(2.46, 4.3, 6.1, 73.2, 80.3, 77.7).matrix, 1),  # a Niggli cell
        (np.array([[3.0, 0.0, 0.0], [2.7, 1.2, 0.0], [1.4, 0.5, 2.2]]), 3),  # strongly oblique
    ],
)
def test_nearest_image_matches_brute_force(lat, search):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(30, 3)) * 3
    target = rng.normal(size=(30, 3)) * 10
    out = np.asarray(geometry.nearest_image(jnp.asarray(ref), jnp.asarray(target), jnp.asarray(lat), search))
    shifts = np.array(list(itertools.product(range(-8, 9), repeat=3)))
    for i in range(len(ref)):
        centre = np.round(np.linalg.solve(lat.T, target[i] - ref[i]))
        cands = ref[i] + (centre + shifts) @ lat
        best = cands[np.argmin(np.linalg.norm(cands - target[i], axis=1))]
        np.testing.assert_allclose(out[i], best, atol=1e-4)


def test_functions_batch_like_single_calls():
    rng = np.random.default_rng(2)
    lengths = rng.uniform(2, 8, size=(4, 3))
    angles = rng.uniform(70, 110, size=(4, 3))
    batched = geometry.lattice_matrix(lengths, angles)
    for b in range(4):
        np.testing.assert_allclose(batched[b], geometry.lattice_matrix(lengths[b], angles[b]), rtol=1e-6)
    frac = rng.uniform(-1, 1, size=(4, 6, 3))
    vm = jax.vmap(geometry.wrap_frac)(jnp.asarray(frac), jnp.ones((4, 6), bool))
    np.testing.assert_allclose(vm, geometry.wrap_frac(jnp.asarray(frac)), atol=1e-6)
