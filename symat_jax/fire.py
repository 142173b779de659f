"""FIRE (Bitzek et al., Phys. Rev. Lett. 97, 170201 (2006)) on the enthalpy of one padded crystal, fixed or free cell, in JAX.

:func:`relax_one` works on one crystal; :func:`relax_batch` is its jitted
``vmap``. The host driver that batches crystal sets is :mod:`symat_jax.relax`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from symat_jax.configs import RelaxConfig
from symat_jax.tersoff import CARBON, TersoffParams, tersoff_energy

Array = jax.Array

GPA_IN_EV_PER_A3 = 1.0 / 160.21766208  # 1 GPa in eV / A^3


class FireState(NamedTuple):
    """FIRE's state for one crystal: positions in the starting cell's frame, cell strain, their velocities, step, mixing, counter."""

    u: Array
    strain: Array
    vu: Array
    vs: Array
    dt: Array
    alpha: Array
    since_negative: Array


class RelaxTrace(NamedTuple):
    """What a relaxation ends with per crystal: positions, lattice, energy (eV), largest residual force (eV/A), steps, overflow."""

    positions: Array
    lattice: Array
    energy: Array
    fmax: Array
    steps: Array
    overflow: Array


# FIRE (Bitzek et al., Phys. Rev. Lett. 97, 170201 (2006)), with its published defaults.
_DT0, _DT_MAX, _N_MIN, _F_INC, _F_DEC, _ALPHA0, _F_ALPHA = 0.1, 1.0, 5, 1.1, 0.5, 0.1, 0.99


def relax_one(positions: Array, lattice: Array, atom_mask: Array, *, cfg: RelaxConfig,
              max_images: tuple[int, int, int], params: TersoffParams = CARBON) -> RelaxTrace:
    """Return the relaxed crystal: FIRE on the enthalpy E + P V, positions only or positions and cell (``cfg.cell``)."""
    n_atoms = jnp.maximum(jnp.sum(atom_mask), 1).astype(positions.dtype)
    free = cfg.cell == "free"
    pressure = cfg.pressure * GPA_IN_EV_PER_A3
    eye = jnp.eye(3, dtype=positions.dtype)
    m = atom_mask[:, None]

    def deform(u: Array, strain: Array) -> tuple[Array, Array]:
        # Strain is scaled by the atom count (ASE's cell filter does the same) so that
        # the cell's forces are comparable with an atom's.
        f = eye + strain / n_atoms
        return u @ f, lattice @ f

    def enthalpy(u: Array, strain: Array) -> tuple[Array, Array]:
        x, lat = deform(u, strain)
        e, overflow = tersoff_energy(x, lat, atom_mask, max_images=max_images, params=params,
                                     max_neighbors=cfg.max_neighbors)
        return e + pressure * jnp.abs(jnp.linalg.det(lat)), (e, overflow)

    grad = jax.grad(enthalpy, argnums=(0, 1), has_aux=True)

    def forces(state: FireState) -> tuple[Array, Array, Array, Array]:
        (gu, gs), (e, overflow) = grad(state.u, state.strain)
        fu = jnp.where(m, -gu, 0.0)
        # A symmetric strain: rotations of the cell change nothing and must not drift.
        fs = -0.5 * (gs + gs.T) if free else jnp.zeros_like(gs)
        return fu, fs, e, overflow

    def residual(fu: Array, fs: Array) -> Array:
        return jnp.maximum(jnp.max(jnp.linalg.norm(fu, axis=-1)), jnp.max(jnp.abs(fs)))

    def step(carry):
        state, fu, fs, taken = carry
        # Velocity Verlet with unit masses, mixed towards the force (FIRE).
        vu = state.vu + state.dt * fu
        vs = state.vs + state.dt * fs
        power = jnp.sum(fu * vu) + jnp.sum(fs * vs)
        fnorm = jnp.sqrt(jnp.sum(fu**2) + jnp.sum(fs**2))
        vnorm = jnp.sqrt(jnp.sum(vu**2) + jnp.sum(vs**2))
        scale = state.alpha * vnorm / jnp.maximum(fnorm, 1e-12)
        vu = (1 - state.alpha) * vu + scale * fu
        vs = (1 - state.alpha) * vs + scale * fs
        uphill = power <= 0
        grow = (~uphill) & (state.since_negative > _N_MIN)
        dt = jnp.where(uphill, state.dt * _F_DEC, jnp.where(grow, jnp.minimum(state.dt * _F_INC, _DT_MAX), state.dt))
        alpha = jnp.where(uphill, _ALPHA0, jnp.where(grow, state.alpha * _F_ALPHA, state.alpha))
        since = jnp.where(uphill, 0, state.since_negative + 1)
        vu = jnp.where(uphill, 0.0, vu)
        vs = jnp.where(uphill, 0.0, vs)
        du = dt * vu
        ds = dt * vs
        # No atom (and no strain component, in the same units) moves more than max_step per step.
        longest = jnp.maximum(jnp.max(jnp.linalg.norm(du, axis=-1)), jnp.max(jnp.abs(ds)))
        shrink = jnp.minimum(1.0, cfg.max_step / jnp.maximum(longest, 1e-12))
        new = FireState(state.u + jnp.where(m, du * shrink, 0.0), state.strain + ds * shrink, vu, vs, dt, alpha, since)
        nfu, nfs, _, _ = forces(new)
        return new, nfu, nfs, taken + 1

    def running(carry) -> Array:
        # Under vmap the loop runs until the slowest crystal of the batch is done; the others stay put.
        _, fu, fs, taken = carry
        return (taken < cfg.steps) & (residual(fu, fs) >= cfg.fmax)

    zeros_s = jnp.zeros((3, 3), positions.dtype)
    state = FireState(jnp.where(m, positions, 0.0), zeros_s, jnp.zeros_like(positions), zeros_s,
                      jnp.asarray(_DT0, positions.dtype), jnp.asarray(_ALPHA0, positions.dtype), jnp.asarray(0))
    fu, fs, _, _ = forces(state)
    state, fu, fs, taken = jax.lax.while_loop(running, step, (state, fu, fs, jnp.asarray(0)))
    x, lat = deform(state.u, state.strain)
    energy, overflow = tersoff_energy(x, lat, atom_mask, max_images=max_images, params=params,
                                      max_neighbors=cfg.max_neighbors)
    return RelaxTrace(x, lat, energy, residual(fu, fs), taken, overflow)


@partial(jax.jit, static_argnames=("cfg", "max_images"))
def relax_batch(positions: Array, lattice: Array, atom_mask: Array, *, cfg: RelaxConfig,
                max_images: tuple[int, int, int]) -> RelaxTrace:
    """Return :func:`relax_one` over a batch ``[b, n, 3]`` of padded carbon crystals."""
    return jax.vmap(lambda x, lat, msk: relax_one(x, lat, msk, cfg=cfg, max_images=max_images))(
        positions, lattice, atom_mask)
