"""Noisy-to-clean atom assignment for the coordinate score's training target.

SPEC 3's per-edge target ``d_clean - d_noisy`` pairs noisy atom ``i`` with the
clean atom it was made from. Above a noise of about half a bond length the
noise has erased that pairing: the target then depends on a label no input
carries, so no network (and no latent) can predict it, and the loss at those
levels only teaches the mean. Re-pairing each noisy atom with a clean atom of
the same element by an optimal assignment (minimum total squared periodic
displacement, the clean crystal also shifted by the translation that best fits
the noisy one) makes the target a function of the noisy positions and the
clean crystal, which the latent describes. Below that noise the assignment is
the identity, so low-noise training is unchanged.

The assignment (SciPy's `linear_sum_assignment`) runs on the host: :func:`match_clean`
on numpy arrays, :func:`matched_clean` its ``jax.pure_callback`` for jitted steps.
"""

from __future__ import annotations

import jax
import numpy as np
from scipy.optimize import linear_sum_assignment

Array = jax.Array

# Element mismatches cost more than any periodic displacement can (cells here are < 100 A across).
_MISMATCH = 1.0e6


def _pairwise_displacements(clean: np.ndarray, noisy: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Return ``[n, n, 3]`` cartesian minimum-image displacements ``noisy_i - clean_j`` (rounded fractional difference)."""
    inv = np.linalg.inv(lattice)
    d_frac = (noisy[:, None, :] - clean[None, :, :]) @ inv
    d_frac -= np.round(d_frac)
    return d_frac @ lattice


def match_one(
    clean: np.ndarray, noisy: np.ndarray, lattice: np.ndarray, numbers: np.ndarray, refinements: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(perm [n], shift [3])``: clean atom ``perm[i]`` (shifted) is paired with noisy atom ``i``.

    One real crystal, no padding: ``clean``, ``noisy`` ``[n, 3]`` cartesian,
    ``numbers [n]``. The pairing minimises the summed squared minimum-image
    displacement among same-element pairings; ``refinements`` rounds
    alternate it with the translation of the clean crystal (mean paired
    displacement) and keep the cheapest.
    """
    same = numbers[:, None] == numbers[None, :]
    shift = np.zeros(3)
    best = (np.inf, np.arange(len(numbers)), shift)
    for _ in range(refinements + 1):
        disp = _pairwise_displacements(clean + shift, noisy, lattice)
        cost = np.where(same, np.sum(disp**2, axis=-1), _MISMATCH)
        rows, perm = linear_sum_assignment(cost)
        total = cost[rows, perm].sum()
        if total < best[0] - 1e-9:
            best = (total, perm, shift.copy())
        shift = shift + disp[rows, perm].mean(axis=0)
    return best[1], best[2]


def match_clean(
    clean: np.ndarray, noisy: np.ndarray, lattice: np.ndarray, atom_mask: np.ndarray, numbers: np.ndarray,
    refinements: int = 3,
) -> np.ndarray:
    """Return ``[b, n, 3]`` clean positions reordered (and shifted) so row ``i`` is noisy atom ``i``'s optimal partner.

    Batched and padded as the training step holds them: ``[b, n, 3]``
    positions, ``lattice [b, 3, 3]``, ``atom_mask`` and ``numbers [b, n]``.
    Padding rows are returned unchanged.
    """
    clean = np.asarray(clean, np.float64)
    noisy = np.asarray(noisy, np.float64)
    out = clean.copy()
    for c in range(clean.shape[0]):
        real = np.flatnonzero(np.asarray(atom_mask[c]))
        if real.size == 0:
            continue
        perm, shift = match_one(clean[c, real], noisy[c, real], np.asarray(lattice[c], np.float64),
                                np.asarray(numbers[c])[real], refinements)
        out[c, real] = clean[c, real][perm] + shift
    return out


def matched_clean(clean: Array, noisy: Array, lattice: Array, atom_mask: Array, numbers: Array) -> Array:
    """Return ``[b, n, 3]`` :func:`match_clean` of traced arrays (a host callback; no gradient flows through it)."""
    shape = jax.ShapeDtypeStruct(clean.shape, clean.dtype)

    def host(c, x, lat, m, z):
        return match_clean(c, x, lat, m, z).astype(shape.dtype)

    args = [jax.lax.stop_gradient(a) for a in (clean, noisy, lattice)]
    return jax.pure_callback(host, shape, *args, atom_mask, numbers, vmap_method="sequential")
