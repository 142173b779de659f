"""Property-based tests (hypothesis) of the lattice geometry on random cells far from the datasets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice

from symat_jax import geometry
from symat_jax.coordination import neighbor_distances

LENGTHS = st.tuples(*[st.floats(0.8, 40.0)] * 3)
ANGLES = st.tuples(*[st.floats(25.0, 155.0)] * 3)
SETTINGS = settings(max_examples=60, deadline=None)


def _cell(lengths, angles):
    """Skip impossible or nearly flat cells (pymatgen's own construction would be ill-conditioned)."""
    assume(geometry.volume_factor(angles) > 1e-3)
    return np.asarray(lengths), np.asarray(angles)


@SETTINGS
@given(LENGTHS, ANGLES)
def test_lattice_matrices_equal_pymatgen(lengths, angles):
    lengths, angles = _cell(lengths, angles)
    ref = Lattice.from_parameters(*lengths, *angles).matrix
    np.testing.assert_allclose(geometry.lattice_matrix_np(lengths, angles), ref, atol=1e-9 * lengths.max())
    ours = np.asarray(geometry.lattice_matrix(jnp.asarray(lengths, jnp.float32), jnp.asarray(angles, jnp.float32)))
    np.testing.assert_allclose(ours, ref, atol=2e-5 * lengths.max())


@SETTINGS
@given(LENGTHS, ANGLES, st.integers(1, 24))
def test_the_cell_rule_agrees_with_pymatgen_volume(lengths, angles, n):
    lengths, angles = _cell(lengths, angles)
    volume = Lattice.from_parameters(*lengths, *angles).volume
    defect = geometry.cell_defect(lengths, angles, n)
    assert (defect is None) == (volume >= geometry.MIN_VOLUME_PER_ATOM * n) or abs(volume / n - 0.1) < 1e-9
    assert geometry.cell_defect(-lengths, angles, n).startswith("non-positive lattice length")
    assert "NaN" in geometry.cell_defect(np.array([np.nan, 1.0, 1.0]), angles, n)


@SETTINGS
@given(LENGTHS, ANGLES, st.lists(st.tuples(*[st.floats(-0.5, 0.5)] * 3), min_size=1, max_size=6),
       st.lists(st.tuples(*[st.integers(-3, 3)] * 3), min_size=6, max_size=6))
def test_wrapping_forgets_lattice_translations(lengths, angles, frac, shifts):
    lengths, angles = _cell(lengths, angles)
    frac = np.asarray(frac, np.float32)
    moved = frac + np.asarray(shifts[: len(frac)], np.float32)
    a = np.asarray(geometry.wrap_frac(jnp.asarray(frac)))
    b = np.asarray(geometry.wrap_frac(jnp.asarray(moved)))
    d = a - b
    np.testing.assert_allclose(d - np.round(d), 0.0, atol=1e-4)  # the same sites, up to whole cells
    assert np.all(np.abs(a) <= 0.5 + 1e-5)


@settings(max_examples=25, deadline=None)
@given(st.tuples(*[st.floats(2.0, 8.0)] * 3), st.tuples(*[st.floats(60.0, 120.0)] * 3),
       st.lists(st.tuples(*[st.floats(0.0, 1.0)] * 3), min_size=2, max_size=5), st.integers(-2, 2))
def test_periodic_distances_do_not_depend_on_the_image_an_atom_is_given_in(lengths, angles, frac, shift):
    lengths, angles = _cell(lengths, angles)
    lattice = geometry.lattice_matrix_np(lengths, angles)
    assume(abs(np.linalg.det(lattice)) > 1.0)
    frac = np.asarray(frac)
    moved = frac.copy()
    moved[0] += shift
    for a, b in zip(neighbor_distances(frac, lattice, 3.0), neighbor_distances(moved, lattice, 3.0)):
        np.testing.assert_allclose(a, b, atol=1e-8)
