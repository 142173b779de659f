"""Latent priors for generation: the paper's N(0, T^2 I) and a Gaussian mixture fitted to the training latents.

SyMat samples its latents from N(0, I); most of that mass lies where few
training crystals were encoded, so the decoders see latents unlike any they
were trained on (on Carbon-24, argmax decoding then gives 6-atom cells almost
always). Ex-post density estimation (Ghosh et al., ICLR 2020) fits a density
to the encoded training set after training and samples from it instead:
here a Gaussian mixture on the joint posterior means ``[z_comp, z_pos, z_lat]``
(fitted on the host by :mod:`symat_jax.latents`), or a kernel density estimate:
one component per training latent with one shared covariance, the form a
mixture takes when its ``scale_tril`` holds a single factor.

:class:`MixturePrior` is a pytree of arrays: pass it into jitted code as an
ordinary argument. This module imports no host-side code.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class MixturePrior(NamedTuple):
    """A Gaussian mixture over the joint latent ``[z_comp, z_pos, z_lat]``: ``weights [K]``, ``means [K, D]``,
    ``scale_tril [K, D, D]`` (lower Cholesky factors of the covariances) or ``[1, D, D]`` (one factor shared by
    every component, as in a kernel density estimate over thousands of latents)."""

    weights: Array
    means: Array
    scale_tril: Array

    def save(self, path: str | pathlib.Path) -> None:
        """Write the mixture to an ``.npz`` file (through a temporary file and a rename)."""
        path = pathlib.Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, weights=np.asarray(self.weights), means=np.asarray(self.means),
                 scale_tril=np.asarray(self.scale_tril))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "MixturePrior":
        """Return the mixture stored by :meth:`save` (float32 arrays)."""
        with np.load(path) as z:
            return cls(*(jnp.asarray(z[k], jnp.float32) for k in ("weights", "means", "scale_tril")))


def sample_mixture(prior: MixturePrior, key: Array, num: int, temperature: float = 1.0) -> Array:
    """Return ``[num, D]`` draws from the mixture; ``temperature`` scales each component's spread (jittable)."""
    kc, ke = jax.random.split(key)
    comp = jax.random.categorical(kc, jnp.log(prior.weights), shape=(num,))
    eps = jax.random.normal(ke, (num, prior.means.shape[-1]))
    if prior.scale_tril.shape[0] == 1:  # shared factor (static shape: resolved at trace time)
        return prior.means[comp] + temperature * eps @ prior.scale_tril[0].T
    return prior.means[comp] + temperature * jnp.einsum("nij,nj->ni", prior.scale_tril[comp], eps)


def mixture_log_density(prior: MixturePrior, z: Array) -> Array:
    """Return ``[n]`` log densities of points ``z [n, D]`` under the mixture."""
    log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(prior.scale_tril, axis1=-2, axis2=-1))), axis=-1)  # [K] or [1]
    if prior.scale_tril.shape[0] == 1:
        # One shared factor: whiten points and means once; an [n, K, D] difference would not fit for K ~ 10^4.
        w = jax.scipy.linalg.solve_triangular(prior.scale_tril[0], z.T, lower=True).T
        wm = jax.scipy.linalg.solve_triangular(prior.scale_tril[0], prior.means.T, lower=True).T
        sq = jnp.sum(w**2, -1)[:, None] - 2.0 * w @ wm.T + jnp.sum(wm**2, -1)[None]
    else:
        diff = z[:, None, :] - prior.means[None]  # [n, K, D]
        sol = jax.scipy.linalg.solve_triangular(prior.scale_tril[None], diff[..., None], lower=True)[..., 0]
        sq = jnp.sum(sol**2, axis=-1)
    comp = -0.5 * sq - log_det[None] - 0.5 * z.shape[-1] * jnp.log(2 * jnp.pi)
    return jax.scipy.special.logsumexp(comp + jnp.log(prior.weights)[None], axis=-1)
