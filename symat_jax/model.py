"""The SyMat model (SPEC 2 and 3): SphereNet VAE for composition and lattice, distance-score model for coordinates.

A pure linen module with one method per use (``encode``, ``decode_*``,
``edge_scores``), and the two functions that training and sampling share:

* :func:`coordinate_scores`: the per-atom score of crystals at some positions
  (score graph -> edge scalars -> rotation-equivariant per-atom vectors);
* :func:`decode_composition`: latents -> number of element types, elements and
  their counts (argmax, or sampled with a temperature).

Imports no host-side code: it runs inside jit.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from symat_jax import graphs, score
from symat_jax.configs import SCORE_CONDITIONS, ModelConfig
from symat_jax.networks import MLP, NUM_ELEMENTS, SphereNet, unit_variance_uniform
from symat_jax.neighbors import NeighborList

Array = jax.Array
MEAN_CLIP = 14.0
LOGVAR_MAX = 6.0


class Posterior(NamedTuple):
    """Diagonal Gaussian posteriors of the three latents, each ``(mean, logvar)`` of ``[g, dim]``."""

    comp_mean: Array
    comp_logvar: Array
    pos_mean: Array
    pos_logvar: Array
    lat_mean: Array
    lat_logvar: Array


class GaussianHead(nn.Module):
    """Linear heads for the mean (clipped to +-14) and log-variance (<= 6, starting near zero) of a latent.

    The mean is clipped softly (``14 tanh(x / 14)``): a hard clip has zero
    gradient outside the range, so a mean that overshoots at the start of
    training would stay pinned there with the KL term unable to pull it back.
    """

    features: int

    @nn.compact
    def __call__(self, h: Array) -> tuple[Array, Array]:
        """Return ``(mean, logvar)`` [..., features]."""
        mean = MEAN_CLIP * jnp.tanh(nn.Dense(self.features, name="mean")(h) / MEAN_CLIP)
        logvar = nn.Dense(
            self.features,
            kernel_init=nn.initializers.normal(1e-10),
            bias_init=nn.initializers.zeros,
            name="logvar",
        )(h)
        return mean, jnp.minimum(logvar, LOGVAR_MAX)


# The score network's parameter subtrees: it shares none with the encoder and decoders, so a sampler may take them
# from another checkpoint of the run (run.load_run's score_checkpoint).
SCORE_MODULES = ("score_embed", "score_net", "score_head")


class SyMat(nn.Module):
    """SyMat: encoder, latent heads, composition/lattice decoders and the coordinate score network."""

    config: ModelConfig

    def setup(self) -> None:
        """Create the submodules (the atom embedding is shared by encoder and count decoder)."""
        c = self.config
        if c.latent_comp != c.encoder.hidden:
            raise ValueError("latent_comp must equal the encoder hidden size: counts use z_comp * emb(e)")
        h = c.decoder_hidden
        init = {"unit_uniform": unit_variance_uniform, "flax": nn.Embed.embedding_init}[c.embed_init]
        self.atom_embed = nn.Embed(NUM_ELEMENTS + 1, c.encoder.hidden, embedding_init=init)
        self.encoder = SphereNet(c.encoder, embed=self.atom_embed)
        self.latent_head = GaussianHead(c.latent_comp + c.latent_pos)
        self.lattice_encoder = MLP((h, h))
        self.lattice_head = GaussianHead(c.latent_lat)
        self.num_types_decoder = MLP((h, c.max_atoms))
        self.element_decoder = MLP((h, NUM_ELEMENTS))
        self.count_decoder = MLP((h, c.max_atoms))
        self.lattice_decoder = MLP((h, 6))
        self.score_embed = nn.Embed(NUM_ELEMENTS + 1, c.score_net.hidden, embedding_init=init)
        self.score_net = SphereNet(c.score_net, embed=self.score_embed)
        self.score_head = MLP((h, 1))

    def encode(self, g: graphs.EdgeGraph, lattice_std: Array, num_graphs: int) -> Posterior:
        """Return the posteriors of ``num_graphs`` crystals from their encoder graph and standardised lattices [g, 6]."""
        c = self.config
        u, _ = self.encoder(g, num_graphs)
        mean, logvar = self.latent_head(u)
        lat_mean, lat_logvar = self.lattice_head(nn.relu(self.lattice_encoder(lattice_std)))
        return Posterior(
            comp_mean=mean[:, : c.latent_comp],
            comp_logvar=logvar[:, : c.latent_comp],
            pos_mean=mean[:, c.latent_comp :],
            pos_logvar=logvar[:, c.latent_comp :],
            lat_mean=lat_mean,
            lat_logvar=lat_logvar,
        )

    def decode_composition(self, z_comp: Array) -> tuple[Array, Array]:
        """Return ``(num_types logits [g, max_atoms] for k = 1.., element logits [g, 100] for Z = 1..)``."""
        return self.num_types_decoder(z_comp), self.element_decoder(z_comp)

    def count_logits(self, z_comp: Array, elements: Array) -> Array:
        """Return ``[g, m, max_atoms]`` logits of the count (1..) of each element ``elements [g, m]`` (atomic numbers)."""
        return self.count_decoder(z_comp[:, None, :] * self.atom_embed(elements))

    def decode_lattice(self, z_lat: Array) -> Array:
        """Return the standardised lattice ``[g, 6]`` (scaled lengths, angles)."""
        return self.lattice_decoder(z_lat)

    def edge_scores(self, g: graphs.EdgeGraph, z_pos: Array) -> Array:
        """Return one scalar ``s_e`` per edge ``[e]`` of a score graph; ``z_pos [b, latent_pos]`` per crystal."""
        if self.config.score_condition not in SCORE_CONDITIONS:
            raise ValueError(f"score_condition must be one of {SCORE_CONDITIONS}, got {self.config.score_condition!r}")
        cond = z_pos[g.node_graph] if self.config.score_condition == "nodes" else None
        _, edge_feat = self.score_net(g, z_pos.shape[0], cond)
        z = z_pos[g.node_graph[g.receivers]]
        s = self.score_head(jnp.concatenate([edge_feat, z], axis=-1))[:, 0]
        return jnp.where(g.edge_mask, s, 0.0)

    def __call__(
        self, enc: graphs.EdgeGraph, lattice_std: Array, num_graphs: int, score_g: graphs.EdgeGraph, num_crystals: int
    ) -> Array:
        """Touch every submodule once (for ``init``); return the edge scores of ``score_g``."""
        post = self.encode(enc, lattice_std, num_graphs)
        self.decode_composition(post.comp_mean)
        self.count_logits(post.comp_mean, jnp.ones((num_graphs, 1), jnp.int32))
        self.decode_lattice(post.lat_mean)
        return self.edge_scores(score_g, post.pos_mean[:num_crystals])


def per_atom_scores(edge_scalars: Array, slots: Array, nl: NeighborList) -> Array:
    """Return ``[b, n, 3]`` per-atom scores from the scalars ``[e]`` of a score graph with edge ids ``slots [b, n, k]``."""
    s = jnp.take(edge_scalars, slots, mode="fill", fill_value=0.0)
    return jax.vmap(score.aggregate_edge_scalars)(s, nl)


def coordinate_scores(
    params: Any,
    model: ModelConfig,
    positions: Array,
    lattice: Array,
    atom_types: Array,
    atom_mask: Array,
    z_pos: Array,
    *,
    graph_config: score.ScoreGraphConfig,
    num_nodes: int | None = None,
) -> tuple[Array, NeighborList]:
    """Return ``(per-atom scores [b, n, 3] in normalised units, the score graph)`` of crystals at ``positions [b, n, 3]``.

    The one score function: the training loss and every Langevin step call it.
    ``num_nodes`` (static) packs real atoms into that many graph nodes (see
    :func:`symat_jax.graphs.score_edge_graph`).
    """
    sg, slots, nl = score_graphs(positions, lattice, atom_types, atom_mask, graph_config=graph_config,
                                 num_nodes=num_nodes)
    edge = SyMat(model).apply(params, sg, z_pos, method=SyMat.edge_scores)
    return per_atom_scores(edge, slots, nl), nl


def score_graphs(
    positions: Array,
    lattice: Array,
    atom_types: Array,
    atom_mask: Array,
    *,
    graph_config: score.ScoreGraphConfig,
    num_nodes: int | None = None,
) -> tuple[graphs.EdgeGraph, Array, NeighborList]:
    """Return ``(score EdgeGraph, edge id of each neighbour slot [b, n, k], neighbour list)`` of crystals at ``positions``."""
    nl = jax.vmap(functools.partial(score.score_graph, config=graph_config))(positions, lattice, atom_mask)
    sg, slots = graphs.score_edge_graph(nl, atom_types, atom_mask, num_nodes)
    return sg, slots, nl


class Composition(NamedTuple):
    """A decoded composition: ``num_types [b]`` (k), ``elements [b, m]`` (atomic numbers, most likely first) and
    ``counts [b, m]`` (atoms of each; 0 beyond the first k)."""

    num_types: Array
    elements: Array
    counts: Array


DECODE_MODES = ("argmax", "sample")


def fit_counts(count_logits: Array, active: Array, max_total: int) -> Array:
    """Return ``[b, m]`` the counts (1.. on active elements, 0 elsewhere) of highest summed log-probability whose total is at most ``max_total``.

    ``count_logits [b, m, c]`` score counts 1..c of each element, ``active [b, m]``
    marks the decoded elements (``sum(active) <= max_total``, so a solution
    exists). Dynamic programming over the elements on the running total: exact,
    static shapes, ``O(m c max_total)``. Without the limit the counts are
    decoded element by element and can sum past the padding, which rejects the cell.
    """
    logp = jax.nn.log_softmax(count_logits, axis=-1)
    b, m, c = logp.shape
    width = max_total + 1
    # gain[b, m, k]: log-probability of count k (0..max_total) for each element; k = 0 is the only choice
    # of an inactive element and impossible for an active one.
    pad = jnp.full((b, m, max(0, width - 1 - c)), -jnp.inf)
    gain = jnp.concatenate([jnp.zeros((b, m, 1)), logp[..., : width - 1], pad], axis=-1)
    gain = jnp.where(active[..., None], gain.at[..., 0].set(-jnp.inf), jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf))
    prev = jnp.arange(width)[:, None] - jnp.arange(width)[None, :]  # [total, count] -> total before this element

    def add_element(best, g):
        cand = jnp.where(prev >= 0, best[:, jnp.maximum(prev, 0)] + g[:, None, :], -jnp.inf)  # [b, total, count]
        return cand.max(-1), cand.argmax(-1)

    best0 = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)[None].repeat(b, 0)
    best, choice = jax.lax.scan(add_element, best0, jnp.moveaxis(gain, 1, 0))  # choice [m, b, total]

    def take_back(total, ch):
        k = jnp.take_along_axis(ch, total[:, None], axis=-1)[:, 0]
        return total - k, k

    _, counts = jax.lax.scan(take_back, jnp.argmax(best, axis=-1), choice, reverse=True)
    return counts.T.astype(jnp.int32)


def decode_composition(
    params: Any,
    model: ModelConfig,
    z_comp: Array,
    *,
    key: Array | None = None,
    mode: str = "argmax",
    temperature: float = 1.0,
    max_total: int | None = None,
) -> Composition:
    """Return the composition of ``z_comp [b, latent_comp]``: argmax k, top-k elements, argmax counts (SPEC 4).

    The one composition decoder: the training metrics and the sampler call it.
    ``mode="sample"`` draws k and the counts from the predicted categorical
    distributions at ``temperature`` and the elements by Gumbel-top-k (needs ``key``).
    ``max_total``: the counts are the most likely ones (after the Gumbel
    perturbation when sampling) whose total fits, by :func:`fit_counts`.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {mode!r}")
    apply = functools.partial(SyMat(model).apply, params)
    k_logits, e_logits = apply(z_comp, method=SyMat.decode_composition)
    if mode == "sample":
        if key is None:
            raise ValueError("decoding by sampling needs a PRNG key")
        kk, ke, kc = jax.random.split(key, 3)
        k = jax.random.categorical(kk, k_logits / temperature) + 1
        # Gumbel-top-k: a draw of k distinct elements from the element logits.
        e_logits = e_logits / temperature + jax.random.gumbel(ke, e_logits.shape)
    else:
        k = jnp.argmax(k_logits, axis=-1) + 1
    m = min(model.max_atoms, e_logits.shape[-1])
    top = jnp.argsort(-e_logits, axis=-1)[:, :m] + 1  # [b, m] atomic numbers, best first
    c_logits = apply(z_comp, top, method=SyMat.count_logits)  # [b, m, max_atoms]
    if mode == "sample":
        # Gumbel-max: the argmax below is then a draw from the categorical at this temperature.
        c_logits = c_logits / temperature + jax.random.gumbel(kc, c_logits.shape)
    active = jnp.arange(m)[None] < k[:, None]
    if max_total is None:
        counts = jnp.where(active, jnp.argmax(c_logits, axis=-1) + 1, 0)
    else:
        counts = fit_counts(c_logits, active & (jnp.arange(m)[None] < max_total), max_total)
    return Composition(k, top, counts)
