"""Fixed-capacity periodic neighbour lists in JAX (one crystal; ``vmap`` for a batch).

Layout (jax-md style): row ``i`` of every ``[n_max, max_neighbors]`` array
lists the senders of receiver ``i``; an empty slot holds sender ``n_max`` and
``mask`` False. The edge vector is ``x_i - x_j - offset @ lattice`` (sender
``j``'s image at ``x_j + offset @ lattice``), the convention of SPEC 8.

Every periodic image within the cut-off is searched, not only the 27 adjacent
cells: the static ``max_images`` bound is checked against the range the lattice
needs, and the ``overflow`` flag is raised when either that bound or the
neighbour capacity is too small. The host reacts (re-allocates); nothing is
dropped silently.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from symat_jax import geometry

Array = jax.Array
ImageRange = tuple[int, int, int]


class NeighborList(NamedTuple):
    """Padded periodic neighbour list of one crystal (leading batch axes under ``vmap``).

    senders: [n, k] int32, ``n`` in empty slots; offsets: [n, k, 3] int32
    image offsets; vectors: [n, k, 3] ``x_i - x_j - offset @ L`` (zero in empty
    slots); distances: [n, k] (zero in empty slots); mask: [n, k] bool;
    num_neighbors: [n] int32 count of all neighbours within the cut-off (before
    any capacity or K-nearest cap); overflow: [] bool, the list is incomplete
    (capacity exceeded without ``keep_nearest``, or ``max_images`` too small).
    """

    senders: Array
    offsets: Array
    vectors: Array
    distances: Array
    mask: Array
    num_neighbors: Array
    overflow: Array

    @property
    def receivers(self) -> Array:
        """Return [n, k] int32 receiver indices (the row index, ``n`` in empty slots)."""
        n = self.senders.shape[-2]
        rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], self.senders.shape)
        return jnp.where(self.mask, rows, n)


def image_cells(lattice: np.ndarray, cutoff: float) -> float:
    """Return how many periodic images a neighbour search within ``cutoff`` spans for one cell (inf for a singular one)."""
    if not np.all(np.isfinite(lattice)) or abs(np.linalg.det(lattice)) < 1e-9:
        return float("inf")
    return float(np.prod([2 * r + 1 for r in required_image_range(lattice, cutoff)]))


def required_image_range(lattice: np.ndarray, cutoff: float) -> ImageRange:
    """Return the per-axis image range that finds every neighbour within ``cutoff``.

    ``lattice`` is [3, 3] or [b, 3, 3] (the maximum over the batch is returned).
    Coordinates are wrapped into the cell first, so a fractional difference
    lies in (-1, 1); an image ``o`` along axis k can only be within the cut-off
    when ``|o_k| < 1 + cutoff * |b_k|`` with ``b_k`` the reciprocal vector.
    """
    lattice = np.asarray(lattice, dtype=np.float64).reshape(-1, 3, 3)
    recip = np.linalg.norm(np.linalg.inv(lattice), axis=-2)  # [b, 3]
    need = np.ceil(cutoff * recip.max(axis=0) - 1e-9).astype(int)
    return tuple(int(max(r, 1)) for r in need)  # type: ignore[return-value]


def _image_grid(max_images: ImageRange) -> np.ndarray:
    """Return [m, 3] int32 integer image offsets within ``max_images`` (static, host-side)."""
    axes = [np.arange(-r, r + 1) for r in max_images]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid.astype(np.int32)


def _as_image_range(max_images: int | Sequence[int]) -> ImageRange:
    """Return ``max_images`` as a 3-tuple of ints."""
    if isinstance(max_images, int):
        return (max_images,) * 3
    r = tuple(int(x) for x in max_images)
    if len(r) != 3:
        raise ValueError(f"max_images must be an int or 3 ints, got {max_images!r}")
    return r  # type: ignore[return-value]


def periodic_neighbors(
    positions: Array,
    lattice: Array,
    atom_mask: Array,
    *,
    cutoff: float,
    max_neighbors: int,
    max_images: int | Sequence[int] | None = None,
    keep_nearest: bool = False,
    min_distance: float = 0.01,
) -> NeighborList:
    """Return the periodic neighbour list of one padded crystal.

    positions: [n, 3] cartesian; lattice: [3, 3] rows are lattice vectors;
    atom_mask: [n] bool, False for padding. Neighbours are all (sender j, image
    o) with ``min_distance < |x_i - x_j - o @ L| <= cutoff``; self-images
    (j = i, o != 0) are included. Each receiver keeps its ``max_neighbors``
    nearest. With ``keep_nearest`` that cap is the intended K-nearest graph of
    SPEC 3; without it, more neighbours than slots raise ``overflow``.

    ``max_images`` (static) bounds the image search per axis; ``None`` derives
    it from a concrete lattice on the host (use :func:`required_image_range`
    under ``jit``).
    """
    if max_images is None:
        if isinstance(lattice, jax.core.Tracer):
            raise ValueError(
                "max_images must be given under jit; get it on the host with "
                "required_image_range(lattice, cutoff)"
            )
        max_images = required_image_range(np.asarray(lattice), cutoff)
    image_range = _as_image_range(max_images)
    images = jnp.asarray(_image_grid(image_range))  # [m, 3]
    n = positions.shape[0]
    m = images.shape[0]
    k = max_neighbors

    lattice = jnp.asarray(lattice)
    frac = geometry.cart_to_frac(positions, lattice)  # [n, 3]
    # Wrap into [0, 1) so that the static image range is enough; the integer
    # shifts are added back into the reported offsets.
    shift = jnp.where(atom_mask[:, None], jnp.floor(frac), 0.0)
    f0 = frac - shift
    dfrac = f0[:, None, None, :] - f0[None, :, None, :] - images[None, None, :, :]  # [n, n, m, 3]
    vec = dfrac @ lattice  # [n, n, m, 3]
    d2 = jnp.sum(vec**2, axis=-1)  # [n, n, m]
    pair_mask = atom_mask[:, None, None] & atom_mask[None, :, None]
    valid = pair_mask & (d2 > min_distance**2) & (d2 <= cutoff**2)
    num_neighbors = jnp.sum(valid, axis=(1, 2)).astype(jnp.int32)  # [n]

    key = jnp.where(valid, d2, jnp.inf).reshape(n, n * m)
    if k > n * m:  # more slots than candidates: the extra slots stay empty
        key = jnp.pad(key, ((0, 0), (0, k - n * m)), constant_values=jnp.inf)
    neg_d2, flat = jax.lax.top_k(-key, k)  # [n, k] nearest first
    slot_mask = jnp.isfinite(neg_d2)
    flat = jnp.minimum(flat, n * m - 1)
    sender = (flat // m).astype(jnp.int32)
    image = images[flat % m]  # [n, k, 3]
    offsets = image + (shift[:, None, :] - shift[sender]).astype(jnp.int32)
    rows = jnp.arange(n)[:, None]
    vectors = vec[rows, sender, flat % m]  # [n, k, 3]
    vectors = jnp.where(slot_mask[..., None], vectors, 0.0)
    # sqrt only where the slot is real: keeps gradients finite at padding.
    dist = jnp.sqrt(jnp.where(slot_mask, -neg_d2, 1.0))
    dist = jnp.where(slot_mask, dist, 0.0)

    needed = jnp.ceil(cutoff * geometry.reciprocal_norms(lattice) - 1e-6)
    image_overflow = jnp.any(needed > jnp.asarray(image_range))
    overflow = image_overflow
    if not keep_nearest:
        overflow = overflow | jnp.any(num_neighbors > k)
    return NeighborList(
        senders=jnp.where(slot_mask, sender, n),
        offsets=jnp.where(slot_mask[..., None], offsets, 0),
        vectors=vectors,
        distances=dist,
        mask=slot_mask,
        num_neighbors=num_neighbors,
        overflow=overflow,
    )


def nearest_with_ties(nl: NeighborList, k: int, tol: float = 1e-3) -> NeighborList:
    """Return the ``k`` nearest neighbours of each atom plus every neighbour tied with the ``k``-th (within ``tol`` A).

    ``nl`` must come from :func:`periodic_neighbors` with ``keep_nearest`` and
    ``capacity + 1`` slots (nearest first); the result has ``capacity`` slots,
    the last input slot serving only to detect a shell that does not fit.
    Cutting at exactly ``k`` would pick among equidistant neighbours by float
    noise - symmetric crystals have whole shells at one distance - so the
    graph would change under a translation or a permutation of the atoms; a
    shell is kept whole instead, and ``overflow`` rises when it does not fit.
    """
    cap = nl.senders.shape[-1] - 1
    if k > cap:
        raise ValueError(f"the list needs more than k={k} slots (capacity + 1 sentinel); it has {cap + 1}")
    d = jnp.where(nl.mask, nl.distances, jnp.inf)
    kth = d[..., k - 1 : k]  # nearest first: slot k - 1 holds the k-th distance
    keep = nl.mask & (d <= kth + tol)
    n = nl.senders.shape[-2]
    return NeighborList(
        senders=jnp.where(keep, nl.senders, n)[..., :cap],
        offsets=jnp.where(keep[..., None], nl.offsets, 0)[..., :cap, :],
        vectors=jnp.where(keep[..., None], nl.vectors, 0.0)[..., :cap, :],
        distances=jnp.where(keep, nl.distances, 0.0)[..., :cap],
        mask=keep[..., :cap],
        num_neighbors=nl.num_neighbors,
        overflow=nl.overflow | jnp.any(keep[..., cap], axis=-1),
    )
