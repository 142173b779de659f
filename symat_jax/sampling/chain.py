"""Annealed Langevin dynamics over a :class:`~symat_jax.sampling.schedule.Schedule`, as one compiled program (SPEC 4).

``lax.scan`` over the levels, ``fori_loop`` over each level's steps, the
score graph's neighbour lists rebuilt inside every step with their overflow
flag carried out per crystal; shapes are fixed, atoms masked. The chain has
no options: what it computes is its schedule.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from symat_jax import geometry, score
from symat_jax.configs import ModelConfig
from symat_jax.model import coordinate_scores
from symat_jax.sampling.schedule import Schedule

Array = jax.Array


def graph_config(model: ModelConfig, max_images: tuple[int, int, int]) -> score.ScoreGraphConfig:
    """Return the score graph's settings for periodic images up to ``max_images``."""
    return score.ScoreGraphConfig(model.score_cutoff, model.score_neighbors, tuple(max_images))


def langevin_step(params: Any, x: Array, key: Array, *, lattice: Array, atom_types: Array, atom_mask: Array,
                  z_pos: Array, alpha: Array, norm: Array, temp: Array | float, model: ModelConfig,
                  graph: score.ScoreGraphConfig) -> tuple[Array, Array]:
    """Return ``(next cartesian positions [b, n, 3], overflow [b])`` of one Langevin step."""
    s, nl = coordinate_scores(params, model, x, lattice, atom_types, atom_mask, z_pos, graph_config=graph)
    noise = jax.random.normal(key, x.shape)
    x = x + alpha * s / norm + jnp.sqrt(2.0 * alpha) * temp * noise
    return jax.vmap(geometry.wrap_cart)(x, lattice, atom_mask), nl.overflow


def initial_positions(key: Array, lattice: Array, atom_mask: Array) -> Array:
    """Return ``[b, n, 3]`` cartesian positions uniform in fractional ``[-0.5, 0.5)^3`` (0 at padding)."""
    frac = jax.random.uniform(key, atom_mask.shape + (3,), minval=-0.5, maxval=0.5)
    frac = jnp.where(atom_mask[..., None], frac, 0.0)
    return geometry.frac_to_cart(frac, lattice)


def denoise(params: Any, x: Array, *, lattice: Array, atom_types: Array, atom_mask: Array, z_pos: Array, norm: Array,
            scale: float, model: ModelConfig, graph: score.ScoreGraphConfig) -> Array:
    """Return ``[b, n, 3]`` the expected clean positions ``x + scale * norm(sigma) * s(x)`` (wrapped), a Tweedie step.

    The network's per-atom output ``s`` estimates the per-atom target divided
    by ``norm(sigma)`` (SPEC 3); the target is the bond-length correction that
    moves the noisy atom towards its clean position, so ``norm(sigma) * s`` is
    the model's estimate of the displacement still to go. The target sums the
    corrections along up to K bonds, which can exceed the displacement itself:
    ``scale`` (< 1) compensates (measured in ``experiments/recovery.py``).
    """
    s, _ = coordinate_scores(params, model, x, lattice, atom_types, atom_mask, z_pos, graph_config=graph)
    return jax.vmap(geometry.wrap_cart)(x + scale * norm * s, lattice, atom_mask)


def level_keys(key: Array, num_levels: int) -> tuple[Array, Array]:
    """Return ``(the start positions' key, [L] one key per level)``; step ``i`` of a level uses ``fold_in(its key, i)``."""
    k0, kl = jax.random.split(key)
    return k0, jax.random.split(kl, num_levels)


def to_frac(x: Array, lattice: Array, atom_mask: Array) -> Array:
    """Return ``[b, n, 3]`` fractional coordinates in ``[-0.5, 0.5)`` of cartesian ``x`` (0 at padding)."""
    frac = jax.vmap(geometry.wrap_frac)(geometry.cart_to_frac(x, lattice), atom_mask)
    return jnp.where(atom_mask[..., None], frac, 0.0)


def _anneal(params: Any, key: Array, atom_types: Array, atom_mask: Array, lattice: Array, z_pos: Array, x0: Array | None,
            *, schedule: Schedule, model: ModelConfig, max_images: tuple[int, int, int],
            keep_levels: bool) -> tuple[Array, ...]:
    """Return ``(frac, overflow)`` and, with ``keep_levels``, ``[L, b, n, 3]`` the fractional coordinates after each level."""
    graph = graph_config(model, max_images)
    alphas = jnp.asarray(schedule.alphas, jnp.float32)
    norms = jnp.asarray(schedule.norms, jnp.float32)
    temps = jnp.asarray(schedule.temps, jnp.float32)
    k0, keys = level_keys(key, len(schedule))
    start = initial_positions(k0, lattice, atom_mask) if x0 is None else x0
    inputs = dict(lattice=lattice, atom_types=atom_types, atom_mask=atom_mask, z_pos=z_pos)
    # The paper's constant noise scale is folded into the program as SPEC 4 writes it (a traced one rounds
    # differently in the last bits), and a schedule with one step count keeps a static trip count.
    fixed_temp, fixed_steps = schedule.constant_temp, schedule.constant_steps

    def step(i, carry, alpha, norm, temp, lkey):
        x, overflow = carry
        x, ovf = langevin_step(params, x, jax.random.fold_in(lkey, i), alpha=alpha, norm=norm,
                               temp=temp if fixed_temp is None else fixed_temp, model=model, graph=graph, **inputs)
        return x, overflow | ovf

    def level(carry, xs):
        alpha, norm, temp, lkey, n = xs
        body = functools.partial(step, alpha=alpha, norm=norm, temp=temp, lkey=lkey)
        carry = jax.lax.fori_loop(0, n if fixed_steps is None else fixed_steps, body, carry)
        return carry, to_frac(carry[0], lattice, atom_mask) if keep_levels else None

    xs = (alphas, norms, temps, keys, jnp.asarray(schedule.steps, jnp.int32))
    (x, overflow), states = jax.lax.scan(level, (start, jnp.zeros(atom_mask.shape[0], bool)), xs)
    if schedule.final_denoise is not None:
        x = denoise(params, x, norm=norms[-1], scale=schedule.final_denoise, model=model, graph=graph, **inputs)
    out = (to_frac(x, lattice, atom_mask), overflow)
    return out + (states,) if keep_levels else out


def run_chain(params: Any, key: Array, atom_types: Array, atom_mask: Array, lattice: Array, z_pos: Array,
              x0: Array | None = None, *, schedule: Schedule, model: ModelConfig,
              max_images: tuple[int, int, int]) -> tuple[Array, Array]:
    """Return ``(fractional coordinates [b, n, 3], neighbour-list overflow [b])`` after the schedule's chain.

    ``atom_types``/``atom_mask [b, n]``, ``lattice [b, 3, 3]``, ``z_pos [b, latent_pos]``; the chain starts
    uniform in the cell or at cartesian ``x0 [b, n, 3]``. ``max_images`` bounds the periodic images
    searched: a lattice that needs more raises the overflow flag. Jittable (schedule, model, images static).
    """
    return _anneal(params, key, atom_types, atom_mask, lattice, z_pos, x0, schedule=schedule, model=model,
                   max_images=max_images, keep_levels=False)


def trace_chain(params: Any, key: Array, atom_types: Array, atom_mask: Array, lattice: Array, z_pos: Array,
                x0: Array | None = None, *, schedule: Schedule, model: ModelConfig,
                max_images: tuple[int, int, int]) -> tuple[Array, Array, Array]:
    """Return :func:`run_chain`'s outputs and ``[L, b, n, 3]`` the fractional coordinates after each level (where bonds form)."""
    return _anneal(params, key, atom_types, atom_mask, lattice, z_pos, x0, schedule=schedule, model=model,
                   max_images=max_images, keep_levels=True)
