"""Periodic lattice geometry in JAX: lattice parameters, coordinates, wrapping.

Every function is pure, works on one crystal and broadcasts over leading batch
axes (or is ``vmap``-ed by the caller). Lattice matrices hold the lattice
vectors as rows, so ``cart = frac @ lattice``. Angles are in degrees.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def lattice_matrix(lengths: Array, angles: Array) -> Array:
    """Return lattice matrices ``[..., 3, 3]`` (rows a, b, c) from lengths and angles in degrees.

    Uses pymatgen's ``Lattice.from_parameters`` convention (SPEC 1): ``c`` along
    z, ``a`` in the xz plane.
    """
    lengths = jnp.asarray(lengths)
    angles = jnp.asarray(angles)
    a, b, c = lengths[..., 0], lengths[..., 1], lengths[..., 2]
    alpha, beta, gamma = (jnp.deg2rad(angles[..., i]) for i in range(3))
    cos_a, cos_b, cos_g = jnp.cos(alpha), jnp.cos(beta), jnp.cos(gamma)
    sin_a, sin_b = jnp.sin(alpha), jnp.sin(beta)
    # Clipping keeps arccos finite for parameter sets that are barely (or not)
    # realisable; degenerate lattices are caught on the host before this point.
    cos_gstar = jnp.clip((cos_a * cos_b - cos_g) / (sin_a * sin_b), -1.0, 1.0)
    gamma_star = jnp.arccos(cos_gstar)
    zero = jnp.zeros_like(a)
    v_a = jnp.stack([a * sin_b, zero, a * cos_b], axis=-1)
    v_b = jnp.stack(
        [-b * sin_a * jnp.cos(gamma_star), b * sin_a * jnp.sin(gamma_star), b * cos_a],
        axis=-1,
    )
    v_c = jnp.stack([zero, zero, c], axis=-1)
    return jnp.stack([v_a, v_b, v_c], axis=-2)


def lattice_params(lattice: Array) -> tuple[Array, Array]:
    """Return ``(lengths [..., 3], angles [..., 3] in degrees)`` of lattice matrices ``[..., 3, 3]``."""
    lattice = jnp.asarray(lattice)
    lengths = jnp.linalg.norm(lattice, axis=-1)
    # angle alpha is between b and c, beta between a and c, gamma between a and b.
    pairs = ((1, 2), (0, 2), (0, 1))
    cosines = [
        jnp.sum(lattice[..., i, :] * lattice[..., j, :], axis=-1)
        / (lengths[..., i] * lengths[..., j])
        for i, j in pairs
    ]
    angles = jnp.rad2deg(jnp.arccos(jnp.clip(jnp.stack(cosines, axis=-1), -1.0, 1.0)))
    return lengths, angles


def frac_to_cart(frac_coords: Array, lattice: Array) -> Array:
    """Return cartesian coordinates ``[..., n, 3]`` of fractional ones under ``lattice [..., 3, 3]``."""
    return jnp.einsum("...ni,...ij->...nj", frac_coords, lattice)


def cart_to_frac(cart_coords: Array, lattice: Array) -> Array:
    """Return fractional coordinates ``[..., n, 3]`` of cartesian ones under ``lattice [..., 3, 3]``."""
    return jnp.einsum("...ni,...ij->...nj", cart_coords, jnp.linalg.inv(lattice))


def reciprocal_norms(lattice: Array) -> Array:
    """Return ``[..., 3]`` lengths of the reciprocal vectors (no 2 pi): 1 / interplanar spacing."""
    return jnp.linalg.norm(jnp.linalg.inv(lattice), axis=-2)


# Smallest cell volume per atom (A^3) that still counts as a real lattice; real
# crystals sit above ~5 A^3/atom, so this only catches collapsed cells. With one
# atom it is CDVAE's construction threshold (0.1 A^3).
MIN_VOLUME_PER_ATOM = 0.1


def lattice_matrix_np(lengths: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Return the ``[3, 3]`` float64 lattice matrix of one cell (host-side twin of :func:`lattice_matrix`).

    Equals pymatgen's ``Lattice.from_parameters`` (SPEC 1), without importing pymatgen.
    """
    a, b, c = np.asarray(lengths, np.float64)
    ca, cb, cg = np.cos(np.deg2rad(np.asarray(angles, np.float64)))
    sa, sb = np.sin(np.deg2rad(np.asarray(angles, np.float64)[:2]))
    gamma_star = np.arccos(np.clip((ca * cb - cg) / (sa * sb), -1.0, 1.0))
    return np.array([[a * sb, 0.0, a * cb], [-b * sa * np.cos(gamma_star), b * sa * np.sin(gamma_star), b * ca],
                     [0.0, 0.0, c]])


def neighbor_distances(frac: np.ndarray, lattice: np.ndarray, cutoff: float) -> list[np.ndarray]:
    """Return, per atom, the sorted distances to every periodic neighbour (other atoms and own images) within ``cutoff``."""
    inv_heights = np.linalg.norm(np.linalg.inv(lattice), axis=0)  # 1 / interplanar spacing
    reach = np.ceil(cutoff * inv_heights).astype(int) + 1
    shifts = np.array(list(itertools.product(*(range(-r, r + 1) for r in reach))), float)  # [s, 3]
    # The image range below covers pairs whose fractional offsets lie within one cell: wrap first, so an atom
    # given in another periodic image (frac outside [0, 1)) finds the same neighbours.
    cart = np.mod(np.asarray(frac, np.float64), 1.0) @ lattice  # [n, 3]
    vec = cart[:, None, None, :] - cart[None, :, None, :] - (shifts @ lattice)[None, None]  # [n, n, s, 3]
    d = np.linalg.norm(vec, axis=-1).reshape(len(frac), -1)
    return [np.sort(row[(row > 1e-6) & (row <= cutoff)]) for row in d]


def coordination_in_range(frac: np.ndarray, lengths: np.ndarray, angles: np.ndarray, cutoff: float,
                          low: int, high: int) -> float:
    """Return the share of a crystal's atoms with ``low`` to ``high`` neighbours within ``cutoff`` (A; host-side)."""
    counts = np.array([len(r) for r in neighbor_distances(frac, lattice_matrix_np(lengths, angles), cutoff)])
    return float(np.mean((counts >= low) & (counts <= high))) if len(counts) else 1.0


def volume_factor(angles_deg: np.ndarray) -> float:
    """Return ``(V / (a b c))^2`` for cell angles in degrees (<= 0 for an impossible cell; host-side)."""
    ca, cb, cg = np.cos(np.deg2rad(np.asarray(angles_deg, dtype=np.float64)))
    return float(1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg)


def cell_defect(lengths: np.ndarray, angles: np.ndarray, num_atoms: int = 1) -> str | None:
    """Return why ``(lengths, angles in degrees)`` is no usable cell for ``num_atoms`` atoms, or None (host-side).

    The one cell-validity rule of the project: the CSV reader, the canonical
    form, the sampler's rejects and the evaluation's construction check all
    call it. The volume floor is ``MIN_VOLUME_PER_ATOM * num_atoms``.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    angles = np.asarray(angles, dtype=np.float64)
    if not (np.all(np.isfinite(lengths)) and np.all(np.isfinite(angles))):
        return "NaN or infinite lattice parameter"
    if np.any(lengths <= 0):
        return f"non-positive lattice length ({lengths[0]:.4g}, {lengths[1]:.4g}, {lengths[2]:.4g} A)"
    factor = volume_factor(angles)
    if np.any(angles <= 0) or np.any(angles >= 180) or factor <= 0:
        return f"degenerate lattice angles ({angles[0]:.4g}, {angles[1]:.4g}, {angles[2]:.4g}): no such cell"
    volume = float(np.prod(lengths)) * math.sqrt(factor)
    if volume < MIN_VOLUME_PER_ATOM * num_atoms:
        return f"degenerate lattice (volume {volume:.3g} A^3 for {num_atoms} atoms)"
    return None


def _masked_midpoint(frac_coords: Array, atom_mask: Array) -> Array:
    """Return ``[..., 1, 3]``: per axis, the midpoint of min and max over real atoms."""
    mask = atom_mask[..., None]
    hi = jnp.max(jnp.where(mask, frac_coords, -jnp.inf), axis=-2, keepdims=True)
    lo = jnp.min(jnp.where(mask, frac_coords, jnp.inf), axis=-2, keepdims=True)
    mid = 0.5 * (hi + lo)
    # A crystal with no real atom (pure padding) has no midpoint; use 0.
    return jnp.where(jnp.isfinite(mid), mid, 0.0)


def wrap_frac(frac_coords: Array, atom_mask: Array | None = None) -> Array:
    """Return SPEC-wrapped fractional coordinates ``[..., n, 3]``.

    Each atom goes to ``((f + 0.5) mod 1) - 0.5``, then per crystal and axis the
    midpoint of the min and max over real atoms is subtracted, so the crystal
    sits compactly around the origin. Padding atoms (``atom_mask`` False) are
    moved the same way but do not influence the shift.
    """
    if atom_mask is None:
        atom_mask = jnp.ones(frac_coords.shape[:-1], dtype=bool)
    f = jnp.mod(frac_coords + 0.5, 1.0) - 0.5
    return f - _masked_midpoint(f, atom_mask)


def wrap_cart(cart_coords: Array, lattice: Array, atom_mask: Array | None = None) -> Array:
    """Return SPEC-wrapped cartesian coordinates ``[..., n, 3]`` (see :func:`wrap_frac`)."""
    frac = wrap_frac(cart_to_frac(cart_coords, lattice), atom_mask)
    return frac_to_cart(frac, lattice)


def nearest_image(reference: Array, target: Array, lattice: Array, search: int = 1) -> Array:
    """Return ``[..., n, 3]``: each atom of ``reference`` moved to its periodic image nearest ``target``.

    Both are cartesian. Rounding the fractional difference gets close; the
    ``(2 search + 1)^3`` integer shifts around it then settle the exact nearest
    image. ``search=1`` is exact for reduced (Niggli) cells such as the
    canonical ones; strongly oblique unreduced cells need a larger ``search``.
    """
    delta = cart_to_frac(target - reference, lattice)  # [..., n, 3]
    base = jnp.round(delta)
    span = jnp.arange(-search, search + 1, dtype=delta.dtype)
    shifts = jnp.stack(jnp.meshgrid(span, span, span, indexing="ij"), axis=-1).reshape(-1, 3)
    cand = base[..., None, :] + shifts  # [..., n, s, 3]
    resid = frac_to_cart(delta[..., None, :] - cand, lattice[..., None, :, :])
    best = jnp.argmin(jnp.sum(resid**2, axis=-1), axis=-1)  # [..., n]
    chosen = jnp.take_along_axis(cand, best[..., None, None], axis=-2)[..., 0, :]
    return reference + frac_to_cart(chosen, lattice)
