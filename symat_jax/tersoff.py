"""Tersoff's bond-order potential for carbon in JAX (Phys. Rev. Lett. 61, 2879 (1988): diamond 3.566 A, -7.37 eV/atom).

One padded periodic crystal per call (``vmap`` for a batch); the neighbour
search is the project's padded periodic list, with its overflow flag.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from symat_jax import neighbors

Array = jax.Array


class TersoffParams(NamedTuple):
    """One element's Tersoff parameters (LAMMPS "metal" units: eV, A): pair terms A, B, lam1, lam2; bond order beta, n, c, d, h; cut-off R +- D."""

    A: float
    B: float
    lam1: float
    lam2: float
    beta: float
    n: float
    c: float
    d: float
    h: float
    R: float
    D: float


# Tersoff, Phys. Rev. Lett. 61, 2879 (1988); cut-off 1.8-2.1 A.
CARBON = TersoffParams(A=1393.6, B=346.74, lam1=3.4879, lam2=2.2119, beta=1.5724e-7, n=0.72751,
                       c=38049.0, d=4.3484, h=-0.57058, R=1.95, D=0.15)
CARBON_Z = 6
CARBON_DATASETS = ("carbon_24",)  # datasets whose crystals hold carbon only


def _cutoff_fn(r: Array, p: TersoffParams) -> Array:
    """Return Tersoff's smooth cut-off f_C(r): 1 below R - D, 0 beyond R + D."""
    x = jnp.clip((r - p.R) / p.D, -1.0, 1.0)
    return 0.5 - 0.5 * jnp.sin(0.5 * jnp.pi * x)


def _angle_fn(cos: Array, p: TersoffParams) -> Array:
    """Return g(theta) = 1 + c^2/d^2 - c^2/(d^2 + (cos - h)^2), written without the cancelling large terms."""
    x = (cos - p.h) ** 2
    return 1.0 + p.c**2 * x / (p.d**2 * (p.d**2 + x))


def tersoff_energy(positions: Array, lattice: Array, atom_mask: Array, *, max_images: tuple[int, int, int],
                   params: TersoffParams = CARBON, max_neighbors: int = 16) -> tuple[Array, Array]:
    """Return ``(energy in eV, overflow)`` of one padded periodic crystal under Tersoff's potential.

    ``overflow`` is True when an atom has more than ``max_neighbors``
    neighbours within R + D or the image range is too small: the energy then
    misses terms and the caller must not trust it.
    """
    p = params
    nl = neighbors.periodic_neighbors(positions, lattice, atom_mask, cutoff=p.R + p.D,
                                      max_neighbors=max_neighbors, max_images=max_images)
    mask = nl.mask
    r = jnp.where(mask, nl.distances, 1.0)
    fc = jnp.where(mask, _cutoff_fn(r, p), 0.0)  # [n, k]
    unit = nl.vectors / r[..., None]
    cos = jnp.einsum("nkx,nlx->nkl", unit, unit)  # angle j-i-k between slots k (j) and l (k)
    k = mask.shape[-1]
    others = mask[:, None, :] & ~jnp.eye(k, dtype=bool)[None]
    zeta = jnp.sum(jnp.where(others, fc[:, None, :] * _angle_fn(cos, p), 0.0), axis=-1)  # [n, k]
    # (beta zeta)^n has an infinite slope at zeta = 0 (n < 1); an atom with one neighbour has zeta = 0.
    bz = p.beta * zeta
    safe = jnp.where(bz > 0, bz, 1.0)
    term = jnp.where(bz > 0, safe ** p.n, 0.0)
    bond_order = (1.0 + term) ** (-0.5 / p.n)
    pair = fc * (p.A * jnp.exp(-p.lam1 * r) - bond_order * p.B * jnp.exp(-p.lam2 * r))
    return 0.5 * jnp.sum(jnp.where(mask, pair, 0.0)), nl.overflow
