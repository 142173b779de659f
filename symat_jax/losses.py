"""Loss terms of SyMat (SPEC 2 and 3); each returns one number per crystal, ``[b]``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def gaussian_kl(mean: Array, logvar: Array) -> Array:
    """Return ``[b]`` KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dimensions."""
    return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def class_ce(logits: Array, value: Array) -> Array:
    """Return ``[...]`` cross entropy of classes ``1..C`` (logit ``c - 1``) against integer ``value``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(value - 1, 0))


def element_set_bce(logits: Array, multi_hot: Array) -> Array:
    """Return ``[b]`` binary cross entropy against the multi-hot element set, averaged over the 100 elements."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, multi_hot), axis=-1)


def count_ce(logits: Array, counts: Array, mask: Array) -> Array:
    """Return ``[b]`` count cross entropy averaged over each crystal's present elements (``logits [b, m, C]``)."""
    ce = class_ce(logits, counts)
    return jnp.sum(jnp.where(mask, ce, 0.0), axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def coordinate_score_loss(pred: Array, target: Array, atom_mask: Array) -> Array:
    """Return ``[b]`` squared error of per-atom vectors ``[b, n, 3]``, averaged over x, y, z and over real atoms (SPEC 3)."""
    err = jnp.mean((pred - target) ** 2, axis=-1)
    return jnp.sum(jnp.where(atom_mask, err, 0.0), axis=-1) / jnp.maximum(jnp.sum(atom_mask, axis=-1), 1)


def masked_mean(x: Array, mask: Array) -> Array:
    """Return the mean of ``x [b]`` over ``mask``."""
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
