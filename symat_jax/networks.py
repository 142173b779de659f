"""SphereNet networks as pure Flax linen modules (SPEC 2 and 3).

Graphs come as :class:`symat_jax.graphs.EdgeGraph`: flat (jraph-style) with
a dense table of every node's incoming edges, which gives the triplets
``k -> j -> i`` of an edge ``j -> i`` as the incoming edges of its sender
``j`` with static shape ``[edges, max_degree]``.

A triplet excludes the reverse of its edge ``j -> i`` (the edge ``i -> j``
with the opposite image offset), not every edge from ``i``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from symat_jax import basis
from symat_jax.graphs import EdgeGraph

Array = jax.Array
NUM_ELEMENTS = 100
TORSION_ZERO_TOL = 1e-3  # rad


class Triplets(NamedTuple):
    """Triplets ``k -> j -> i`` per edge ``j -> i``: ``kj`` [e, d] incoming-edge ids of j, ``mask`` [e, d]."""

    kj: Array
    mask: Array


def triplets(g: EdgeGraph) -> Triplets:
    """Return the triplets of every edge, excluding the reverse edge (static shape ``[e, d]``)."""
    kj = g.in_edges[g.senders]  # [e, d]
    mask = g.in_mask[g.senders] & g.edge_mask[:, None]
    reverse = (g.senders[kj] == g.receivers[:, None]) & jnp.all(g.offsets[kj] == -g.offsets[:, None, :], axis=-1)
    return Triplets(kj=kj, mask=mask & ~reverse)


def _safe_norm(v: Array, axis: int = -1) -> Array:
    """Return the norm of ``v`` with a finite gradient at zero."""
    sq = jnp.sum(v**2, axis=axis)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def triplet_geometry(g: EdgeGraph, t: Triplets) -> tuple[Array, Array]:
    """Return ``(angle, torsion)`` [e, d] of each triplet (SPEC 2).

    angle: between ``v_ji`` and ``v_jk`` at ``j``. torsion: the smallest, over
    the other incoming edges ``k' -> j`` (reverse of ``j -> i`` excluded), of
    the unsigned angle between the normals ``v_ji x v_jk`` and
    ``v_ji x v_jk'``; an angle of 0 (below ``TORSION_ZERO_TOL``, or with a
    collinear triplet, whose normal vanishes) counts as 2 pi.
    """
    v_ji = g.vectors[:, None, :]  # [e, 1, 3]
    v_jk = -g.vectors[t.kj]  # [e, d, 3]
    angle = jnp.arctan2(_safe_norm(jnp.cross(v_ji, v_jk)), jnp.sum(v_ji * v_jk, axis=-1))
    n = jnp.cross(v_ji, v_jk)  # [e, d, 3] plane normals
    # A collinear k -> j -> i has no plane: its normal is exactly zero, which
    # float32 turns into noise of arbitrary direction. Treat a normal whose
    # sine is below the tolerance as zero: every angle with it counts as 0.
    sin_kj = _safe_norm(n) / jnp.maximum(_safe_norm(v_ji) * _safe_norm(v_jk), 1e-12)
    flat = sin_kj < TORSION_ZERO_TOL  # [e, d]
    n1, n2 = n[:, :, None, :], n[:, None, :, :]  # [e, d, 1, 3], [e, 1, d, 3]
    phi = jnp.arctan2(_safe_norm(jnp.cross(n1, n2)), jnp.sum(n1 * n2, axis=-1))  # [e, d, d]
    # "Exactly 0" in exact arithmetic is ~1e-6 in float32 once the crystal is
    # rotated; the tolerance keeps the rule (and rotation invariance) intact
    # for the coplanar triplets that symmetric cells are full of.
    zero = (phi < TORSION_ZERO_TOL) | flat[:, :, None] | flat[:, None, :]
    phi = jnp.where(zero, 2 * jnp.pi, phi)
    phi = jnp.where(t.mask[:, None, :], phi, jnp.inf)
    torsion = jnp.min(phi, axis=-1)
    torsion = jnp.where(jnp.isfinite(torsion), torsion, 2 * jnp.pi)
    return angle, torsion


def unit_variance_uniform(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Return values uniform in [-sqrt(3), sqrt(3)] (variance 1): the reference's atom-embedding init."""
    return jax.random.uniform(key, shape, dtype, -(3.0**0.5), 3.0**0.5)


def swish(x: Array) -> Array:
    """Return ``x * sigmoid(x)``."""
    return jax.nn.silu(x)


class ResidualLayer(nn.Module):
    """``x + act(W2 act(W1 x))``."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Return the residual update of ``x``."""
        h = swish(nn.Dense(self.features)(x))
        return x + swish(nn.Dense(self.features)(h))


@dataclasses.dataclass(frozen=True)
class SphereNetConfig:
    """Sizes of a SphereNet (reference values from SPEC 2 / 3)."""

    num_layers: int = 4
    hidden: int = 128
    out_channels: int = 256
    int_emb: int = 64
    basis_emb_dist: int = 8
    basis_emb_angle: int = 8
    basis_emb_torsion: int = 8
    out_emb: int = 256
    num_spherical: int = 7
    num_radial: int = 6
    cutoff: float = 5.0
    envelope_exponent: int | None = 5
    num_before_skip: int = 1
    num_after_skip: int = 2
    num_output_layers: int = 3
    use_angles: bool = True  # False: the distance-only ("light") network of the score model
    graph_output: bool = True  # False: only edge features (the score model's use)


class InitEdges(nn.Module):
    """First edge features from the two atoms' embeddings and the radial basis."""

    hidden: int

    @nn.compact
    def __call__(self, node_emb: Array, rbf: Array, g: EdgeGraph) -> tuple[Array, Array]:
        """Return ``(e1, e2)`` [e, hidden]."""
        rbf0 = swish(nn.Dense(self.hidden, name="lin_rbf_0")(rbf))
        cat = jnp.concatenate([node_emb[g.receivers], node_emb[g.senders], rbf0], axis=-1)
        e1 = swish(nn.Dense(self.hidden, name="lin")(cat))
        e2 = nn.Dense(self.hidden, use_bias=False, name="lin_rbf_1")(rbf) * e1
        return e1, e2


class UpdateEdges(nn.Module):
    """One interaction: triplet messages (with angle/torsion bases when given) update the edge features."""

    config: SphereNetConfig

    @nn.compact
    def __call__(
        self, e1: Array, rbf: Array, sbf: Array | None, tbf: Array | None, t: Triplets
    ) -> tuple[Array, Array]:
        """Return the new ``(e1, e2)`` [e, hidden]."""
        c = self.config
        x_ji = swish(nn.Dense(c.hidden, name="lin_ji")(e1))
        x_kj = swish(nn.Dense(c.hidden, name="lin_kj")(e1))
        r = nn.Dense(c.basis_emb_dist, use_bias=False, name="lin_rbf1")(rbf)
        x_kj = x_kj * nn.Dense(c.hidden, use_bias=False, name="lin_rbf2")(r)
        x_kj = swish(nn.Dense(c.int_emb, use_bias=False, name="lin_down")(x_kj))
        msg = x_kj[t.kj]  # [e, d, int_emb]
        if sbf is not None:
            s = nn.Dense(c.basis_emb_angle, use_bias=False, name="lin_sbf1")(sbf)
            msg = msg * nn.Dense(c.int_emb, use_bias=False, name="lin_sbf2")(s)
        if tbf is not None:
            tt = nn.Dense(c.basis_emb_torsion, use_bias=False, name="lin_t1")(tbf)
            msg = msg * nn.Dense(c.int_emb, use_bias=False, name="lin_t2")(tt)
        agg = jnp.sum(jnp.where(t.mask[..., None], msg, 0.0), axis=1)  # [e, int_emb]
        x_kj = swish(nn.Dense(c.hidden, use_bias=False, name="lin_up")(agg))
        h = x_ji + x_kj
        for i in range(c.num_before_skip):
            h = ResidualLayer(c.hidden, name=f"before_skip_{i}")(h)
        h = swish(nn.Dense(c.hidden, name="lin")(h)) + e1
        for i in range(c.num_after_skip):
            h = ResidualLayer(c.hidden, name=f"after_skip_{i}")(h)
        e2 = nn.Dense(c.hidden, use_bias=False, name="lin_rbf")(rbf) * h
        return h, e2


class UpdateNodes(nn.Module):
    """Node outputs: incoming ``e2`` summed per receiver, then an MLP."""

    config: SphereNetConfig

    @nn.compact
    def __call__(self, e2: Array, g: EdgeGraph) -> Array:
        """Return node outputs [nodes, out_channels] (zero at padding nodes)."""
        c = self.config
        e2 = jnp.where(g.edge_mask[:, None], e2, 0.0)
        v = jax.ops.segment_sum(e2, g.receivers, num_segments=g.atomic_numbers.shape[0])
        v = nn.Dense(c.out_emb, name="lin_up")(v)
        for i in range(c.num_output_layers):
            v = swish(nn.Dense(c.out_emb, name=f"lin_{i}")(v))
        # Zero-initialised output (as DimeNet offers): the graph embedding sums
        # these over atoms and blocks, so a random init starts it huge.
        v = nn.Dense(c.out_channels, use_bias=False, kernel_init=nn.initializers.zeros, name="lin")(v)
        return jnp.where(g.node_mask[:, None], v, 0.0)


def edge_bases(g: EdgeGraph, t: Triplets, c: SphereNetConfig) -> tuple[Array, Array | None, Array | None]:
    """Return ``(rbf [e, R], sbf [e, d, L*R] or None, tbf [e, d, L*L*R] or None)`` for a config."""
    dist = _safe_norm(g.vectors)
    rbf = basis.radial_basis(dist, c.num_radial, c.cutoff, c.envelope_exponent)
    rbf = jnp.where(g.edge_mask[:, None], rbf, 0.0)
    if not c.use_angles:
        return rbf, None, None
    angle, torsion = triplet_geometry(g, t)
    # The Bessel part depends on the k -> j edge only: evaluate per edge, then gather.
    bessel = basis.bessel_basis(dist, c.num_spherical, c.num_radial, c.cutoff)[t.kj]  # [e, d, L, R]
    y0 = basis.real_sph_harm(c.num_spherical, angle)  # [e, d, L]
    sbf = (bessel * y0[..., None]).reshape(*angle.shape, -1)
    ylm = basis.real_sph_harm(c.num_spherical, angle, torsion)
    ylm = ylm.reshape(*angle.shape, c.num_spherical, c.num_spherical, 1)
    tbf = (bessel[..., None, :, :] * ylm).reshape(*angle.shape, -1)
    mask = t.mask[..., None]
    return rbf, jnp.where(mask, sbf, 0.0), jnp.where(mask, tbf, 0.0)


class SphereNet(nn.Module):
    """SphereNet: edge features through ``num_layers`` interactions; per-graph sum of node outputs over all blocks.

    ``embed`` is the atom embedding table (``nn.Embed(101, hidden)``), passed
    in so that a decoder can share it.
    """

    config: SphereNetConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, g: EdgeGraph, num_graphs: int, node_cond: Array | None = None) -> tuple[Array, Array]:
        """Return ``(graph embedding [num_graphs, out_channels], the last interaction's radially gated edge features e2 [e, hidden])``.

        ``node_cond [n, d]`` (optional) is mapped linearly onto each atom's embedding (a conditioned network).
        """
        c = self.config
        t = triplets(g)
        rbf, sbf, tbf = edge_bases(g, t, c)
        node_emb = self.embed(g.atomic_numbers)
        if node_cond is not None:
            node_emb = node_emb + nn.Dense(c.hidden, name="condition")(node_cond)
        e1, e2 = InitEdges(c.hidden, name="init")(node_emb, rbf, g)
        u = jnp.zeros((num_graphs, c.out_channels), e1.dtype)
        if c.graph_output:
            v = UpdateNodes(c, name="out_0")(e2, g)
            u = u + jax.ops.segment_sum(v, g.node_graph, num_segments=num_graphs)
        for layer in range(c.num_layers):
            e1, e2 = UpdateEdges(c, name=f"interaction_{layer}")(e1, rbf, sbf, tbf, t)
            if c.graph_output:
                v = UpdateNodes(c, name=f"out_{layer + 1}")(e2, g)
                u = u + jax.ops.segment_sum(v, g.node_graph, num_segments=num_graphs)
        return u, jnp.where(g.edge_mask[:, None], e2, 0.0)


class MLP(nn.Module):
    """Dense layers with ReLU between them (none after the last)."""

    features: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Return the MLP output."""
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x
