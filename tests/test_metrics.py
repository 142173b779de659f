"""Structural validity against hand-made crystals and a real test split."""

from __future__ import annotations


from symat_jax.metrics import build_crystal, min_periodic_distance, structure_validity


def test_close_atoms_and_bad_cells_are_invalid(test_splits):
    close = build_crystal([6, 6], [4.0, 4.0, 4.0], [90, 90, 90], [[0, 0, 0], [0.05, 0, 0]])  # 0.2 A apart
    assert abs(min_periodic_distance(close) - 0.2) < 1e-6
    image = build_crystal([6, 6], [4.0, 4.0, 4.0], [90, 90, 90], [[0.02, 0, 0], [0.98, 0, 0]])  # 0.16 A via the image
    flat = build_crystal([6], [4.0, 4.0, 0.001], [90, 90, 90], [[0, 0, 0]])  # volume 0.016 A^3
    negative = build_crystal([6], [-4.0, 4.0, 4.0], [90, 90, 90], [[0, 0, 0]])
    assert flat is None and negative is None
    assert list(structure_validity([close, image, flat, negative])) == [False, False, False, False]
    data = test_splits["carbon_24"]
    real = [build_crystal(c.atomic_numbers, c.lengths, c.angles, c.frac_coords) for c in list(data)[:50]]
    assert structure_validity(real).all()  # the test split itself is valid
