"""Property optimisation in latent space (SPEC 6): Adam steps on ``z`` towards a lower objective, and its success rates.

:func:`optimize` is pure and jittable: any differentiable objective
``f(z) -> scalar`` of one latent vector (the run's property head, or a
researcher's own), all starts of a batch stepped together in one compiled
program (Adam is elementwise, so each start moves as if alone). The
trajectory keeps ``z`` at every ``every``-th step for decoding.
:func:`best_per_start` and :func:`success_rates` score decoded crystals the
CDVAE way (host numpy). The command around them is ``symat optimize``
(:mod:`symat_jax.optimize_cli`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from symat_jax.configs import OptimizeConfig

Array = jax.Array

# CDVAE's SR thresholds (the 5th / 10th / 15th percentiles of its full training splits), SPEC 6.
CDVAE_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "carbon_24": (-154.527093, -154.458657, -154.442068),
    "perov_5": (0.43924842, 0.61202443, 0.7364607),
    "mp_20": (-3.17562208, -2.82196882, -2.52814761),
}
SR_PERCENTILES = (5, 10, 15)


class Trajectory(NamedTuple):
    """Saved points of an optimisation: ``z [saves, n, dim]``, the objective there ``value [saves, n]``, and ``steps [saves]``
    (step 0 is the start)."""

    z: Array
    value: Array
    steps: Array


def optimize(objective: Callable[[Array], Array], z0: Array, config: OptimizeConfig = OptimizeConfig()) -> Trajectory:
    """Return the trajectory of Adam on ``objective`` (one latent ``[dim] -> []``) from each row of ``z0 [n, dim]`` (jittable)."""
    batch_value = jax.vmap(objective)
    tx = optax.adam(config.learning_rate)

    def step(carry, _):
        z, opt_state = carry
        # The sum's gradient is each start's own gradient: the starts do not interact.
        grads = jax.grad(lambda x: jnp.sum(batch_value(x)))(z)
        updates, opt_state = tx.update(grads, opt_state, z)
        return (optax.apply_updates(z, updates), opt_state), None

    def save(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=config.every)
        return carry, carry[0]

    z0 = jnp.asarray(z0)
    _, saved = jax.lax.scan(save, (z0, tx.init(z0)), None, length=config.steps // config.every)
    z = jnp.concatenate([z0[None], saved])
    return Trajectory(z, jax.vmap(batch_value)(z), jnp.asarray(config.saved_steps))


def best_per_start(start: np.ndarray, value: np.ndarray, valid: np.ndarray, num_starts: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(best value [num_starts], its crystal's row [num_starts])`` among each start's valid crystals (NaN, -1 where none)."""
    best = np.full(num_starts, np.nan)
    row = np.full(num_starts, -1, np.int64)
    for k in np.flatnonzero(valid & np.isfinite(value)):
        s = int(start[k])
        if row[s] < 0 or value[k] < best[s]:
            best[s], row[s] = value[k], k
    return best, row


def success_rates(best: np.ndarray, thresholds: tuple[float, ...]) -> list[float]:
    """Return the share of starts whose best value is at or below each threshold (a start with no valid crystal fails)."""
    best = np.asarray(best, float)
    return [float(np.mean(np.nan_to_num(best, nan=np.inf) <= t)) for t in thresholds]


def percentile_thresholds(values: np.ndarray) -> tuple[float, float, float]:
    """Return the 5th / 10th / 15th percentiles of ``values`` (NaNs ignored): the SR thresholds of a training split."""
    return tuple(float(x) for x in np.nanpercentile(np.asarray(values, float), SR_PERCENTILES))
