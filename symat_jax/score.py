"""The distance-score diffusion of coordinates (SPEC 3): noise, score graph, per-atom aggregation, targets, normaliser.

All functions work on one crystal padded to ``n`` atoms (``vmap`` for a
batch): positions ``[n, 3]`` cartesian, ``lattice [3, 3]``, ``atom_mask [n]``.
The score graph is the K-nearest periodic multi-graph of
:func:`symat_jax.neighbors.periodic_neighbors` in its dense ``[n, k]`` layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from symat_jax import assignment, geometry
from symat_jax.neighbors import NeighborList, periodic_neighbors

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ScoreGraphConfig:
    """Static settings of the score graph (SPEC 3)."""

    cutoff: float
    max_neighbors: int = 5
    max_images: tuple[int, int, int] = (2, 2, 2)


def noise_levels(num_levels: int = 50, sigma_min: float = 0.01, sigma_max: float = 10.0) -> np.ndarray:
    """Return ``[num_levels]`` noise scales, geometric from ``sigma_min`` (level 0) to ``sigma_max``."""
    return np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), num_levels))


def level_probabilities(sigmas: np.ndarray, focus_sigma: float | None) -> np.ndarray:
    """Return the probability of drawing each noise level in training (uniform; or ``focus_sigma / sigma`` above it)."""
    sigmas = np.asarray(sigmas, np.float64)
    w = np.ones_like(sigmas) if focus_sigma is None else np.minimum(1.0, focus_sigma / sigmas)
    return w / w.sum()


def perturb(positions: Array, lattice: Array, atom_mask: Array, sigma: Array, eps: Array) -> Array:
    """Return ``[n, 3]`` wrapped noisy positions ``wrap(x + sigma eps)`` (padding stays put)."""
    noisy = positions + sigma * jnp.where(atom_mask[:, None], eps, 0.0)
    return geometry.wrap_cart(noisy, lattice, atom_mask)


def score_graph(positions: Array, lattice: Array, atom_mask: Array, config: ScoreGraphConfig) -> NeighborList:
    """Return the K-nearest periodic multi-graph of one crystal (self-images included, as SPEC 3 says)."""
    return periodic_neighbors(
        positions,
        lattice,
        atom_mask,
        cutoff=config.cutoff,
        max_neighbors=config.max_neighbors,
        max_images=config.max_images,
        keep_nearest=True,
    )


def scored_edge_mask(nl: NeighborList) -> Array:
    """Return ``[n, k]`` bool: edges that enter the score (real, and not an atom's own image)."""
    n = nl.senders.shape[-2]
    return nl.mask & (nl.senders != jnp.arange(n)[:, None])


def aggregate_edge_scalars(scalars: Array, nl: NeighborList) -> Array:
    """Return ``[n, 3]`` per-atom vectors: per pair (i, j) the image-average of ``s_e u_e``, summed over j.

    ``scalars`` is ``[n, k]`` per multi-edge; ``u_e`` the unit edge vector
    ``(x_i - x_j - o L) / |.|``. Self-image edges are left out.
    """
    keep = scored_edge_mask(nl)
    same_pair = (nl.senders[:, :, None] == nl.senders[:, None, :]) & keep[:, None, :]  # [n, k, k]
    images_of_pair = jnp.maximum(jnp.sum(same_pair, axis=-1), 1)  # [n, k]
    unit = nl.vectors / jnp.where(nl.mask, nl.distances, 1.0)[..., None]
    weight = jnp.where(keep, scalars / images_of_pair, 0.0)
    return jnp.sum(weight[..., None] * unit, axis=1)


def target_edge_scalars(clean: Array, noisy: Array, lattice: Array, nl: NeighborList) -> Array:
    """Return ``[n, k]`` per-edge targets ``d_clean - d_noisy`` on the noisy graph's (i, j, o).

    Each clean atom is first moved to its periodic image nearest its noisy
    position (SPEC 3), so the offsets of the noisy graph apply to it.
    """
    aligned = geometry.nearest_image(clean, noisy, lattice)  # [n, 3]
    senders = jnp.where(nl.mask, nl.senders, 0)
    vec = aligned[:, None, :] - aligned[senders] - nl.offsets.astype(aligned.dtype) @ lattice
    d_clean = jnp.linalg.norm(jnp.where(nl.mask[..., None], vec, 1.0), axis=-1)
    return jnp.where(nl.mask, d_clean - nl.distances, 0.0)


def score_target(clean: Array, noisy: Array, lattice: Array, nl: NeighborList) -> Array:
    """Return ``[n, 3]`` the per-atom score target (unnormalised) of SPEC 3."""
    return aggregate_edge_scalars(target_edge_scalars(clean, noisy, lattice, nl), nl)


def estimate_score_norm(
    frac_coords: np.ndarray,
    lattices: np.ndarray,
    atom_mask: np.ndarray,
    config: ScoreGraphConfig,
    sigmas: np.ndarray,
    key: Array,
    repeats: int = 1,
    batch_size: int = 512,
    pooling: str = "crystal",
    progress: bool = True,
    numbers: np.ndarray | None = None,
) -> np.ndarray:
    """Return ``[levels]`` normalisers: the RMS of per-edge targets ``d_clean - d_noisy`` over scored edges.

    ``frac_coords [c, n, 3]``, ``lattices [c, 3, 3]``, ``atom_mask [c, n]``:
    the (padded) training crystals; each is perturbed ``repeats`` times per
    level. ``pooling="crystal"`` averages each crystal's RMS over crystals
    (weighting crystals equally, as the loss does); ``"edge"`` pools all edges.
    Measured against the published values (``data/*/score_norm.txt``, all 50
    levels, our train splits): crystal pooling is within 7.7% (Carbon-24) and
    9.7% (Perov-5); edge pooling within 12.3% and 7.6%. With ``numbers [c, n]``
    (atomic numbers) the targets pair atoms by :func:`symat_jax.assignment.matched_clean`,
    as training with ``target_matching="assignment"`` does (on Carbon-24 half
    of SPEC 3's RMS above sigma 3 A, the same below 0.3 A).
    """
    if pooling not in ("crystal", "edge"):
        raise ValueError(f"pooling must be 'crystal' or 'edge', got {pooling!r}")
    step = _norm_stats_fn(config, numbers is not None)
    c = frac_coords.shape[0]
    out = np.zeros(len(sigmas))
    total = len(sigmas) * repeats * ((c + batch_size - 1) // batch_size)
    bar = tqdm(total=total, desc="score normaliser", disable=not progress)
    for level, sigma in enumerate(sigmas):
        sq, cnt = [], []
        for r in range(repeats):
            for start in range(0, c, batch_size):
                sl = slice(start, start + batch_size)
                k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, level), r), start)
                z = jnp.zeros(atom_mask[sl].shape, jnp.int32) if numbers is None else jnp.asarray(numbers[sl])
                s, n = step(
                    jnp.asarray(frac_coords[sl], jnp.float32),
                    jnp.asarray(lattices[sl], jnp.float32),
                    jnp.asarray(atom_mask[sl]),
                    z,
                    jnp.float32(sigma),
                    k,
                )
                sq.append(np.asarray(s, np.float64))
                cnt.append(np.asarray(n, np.float64))
                bar.update(1)
        sq_all, cnt_all = np.concatenate(sq), np.concatenate(cnt)
        if pooling == "edge":
            out[level] = np.sqrt(sq_all.sum() / max(cnt_all.sum(), 1))
        else:
            has = cnt_all > 0
            out[level] = np.mean(np.sqrt(sq_all[has] / cnt_all[has]))
    bar.close()
    return out


@functools.lru_cache(maxsize=None)
def _norm_stats_fn(config: ScoreGraphConfig, matched: bool = False) -> Callable:
    """Return a jitted ``(frac, lattice, mask, numbers, sigma, key) -> (sum t_e^2 [b], edge count [b])`` per crystal."""
    def one(clean, noisy, lattice, mask):
        nl = score_graph(noisy, lattice, mask, config)
        t = target_edge_scalars(clean, noisy, lattice, nl)
        keep = scored_edge_mask(nl)
        return jnp.sum(jnp.where(keep, t**2, 0.0)), jnp.sum(keep), nl.overflow

    @jax.jit
    def batch(frac, lattice, mask, numbers, sigma, key):
        clean = geometry.frac_to_cart(frac, lattice)
        eps = jax.vmap(lambda k, x: jax.random.normal(k, x.shape))(jax.random.split(key, frac.shape[0]), clean)
        noisy = jax.vmap(perturb, in_axes=(0, 0, 0, None, 0))(clean, lattice, mask, sigma, eps)
        if matched:
            clean = assignment.matched_clean(clean, noisy, lattice, mask, numbers)
        s, n, overflow = jax.vmap(one)(clean, noisy, lattice, mask)
        return s, n, jnp.any(overflow)

    def checked(*args):
        s, n, overflow = batch(*args)
        # Only the image range can overflow a K-nearest graph; a wrong range
        # would bias the normaliser, so fail loudly on the host.
        if bool(overflow):
            raise ValueError(f"score graph image range {config.max_images} too small for cutoff {config.cutoff}")
        return s, n

    return checked
