"""Latents and their decoding (SPEC 4): a prior's draws -> atom types, atom counts and lattices.

:func:`sample_latents` and :func:`decode_crystals` are pure and jittable;
on the host :func:`draw_latents` draws a request's latents in batches and
:func:`decode_latents` decodes any latents (a prior's, or an optimiser's), listing
the crystals that cannot be sampled (too many atoms, no usable cell) as rejects.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from symat_jax import geometry
from symat_jax.configs import DecodeConfig, FittedPrior, ModelConfig, PriorConfig, StandardPrior
from symat_jax.model import SyMat, decode_composition
from symat_jax.prior import MixturePrior, sample_mixture
from symat_jax.statics import RunStatics

Array = jax.Array


class Latents(NamedTuple):
    """Latent draws ``z_comp``, ``z_pos``, ``z_lat`` ``[b, dim]``."""

    z_comp: Array
    z_pos: Array
    z_lat: Array


class Decoded(NamedTuple):
    """Decoded composition and lattice of a batch: ``atom_types [b, max_atoms]`` (0 = none), ``num_atoms [b]``
    (may exceed ``max_atoms``: such crystals must be rejected), ``lengths``/``angles [b, 3]``."""

    atom_types: Array
    num_atoms: Array
    lengths: Array
    angles: Array


def sample_latents(key: Array, num: int, model: ModelConfig, prior_cfg: PriorConfig,
                   prior: MixturePrior | None = None) -> Latents:
    """Return ``num`` latents: ``N(0, T^2 I)`` at a :class:`StandardPrior`'s temperatures, or draws from the run's fitted prior.

    A :class:`FittedPrior` needs ``prior`` (the run's ``prior.npz``, :func:`symat_jax.run.load_prior`).
    """
    if isinstance(prior_cfg, FittedPrior):
        if prior is None:
            raise ValueError("the sampler asks for the fitted prior but none was given (the run's prior.npz)")
        z = sample_mixture(prior, key, num, prior_cfg.temperature)
        c, p = model.latent_comp, model.latent_pos
        return Latents(z[:, :c], z[:, c : c + p], z[:, c + p :])
    if not isinstance(prior_cfg, StandardPrior):
        raise ValueError(f"a prior is a StandardPrior or a FittedPrior, got {prior_cfg!r}")
    kc, kp, kl = jax.random.split(key, 3)
    return Latents(
        prior_cfg.temp_comp * jax.random.normal(kc, (num, model.latent_comp)),
        prior_cfg.temp_pos * jax.random.normal(kp, (num, model.latent_pos)),
        prior_cfg.temp_lat * jax.random.normal(kl, (num, model.latent_lat)),
    )


def decode_crystals(params: Any, z: Latents, key: Array, *, model: ModelConfig, decode: DecodeConfig,
                    statics: RunStatics) -> Decoded:
    """Return compositions (argmax or sampled k, top-k elements, counts) and lattices of latents (jittable)."""
    sampled = decode.sample_temperature is not None
    comp = decode_composition(params, model, z.z_comp, key=key, mode="sample" if sampled else "argmax",
                              temperature=decode.sample_temperature if sampled else 1.0,
                              max_total=model.max_atoms if decode.fit_counts else None)
    m = comp.elements.shape[-1]
    num_atoms = jnp.sum(comp.counts, axis=-1)
    ends = jnp.cumsum(comp.counts, axis=-1)  # [b, m]
    slot = jnp.arange(model.max_atoms)
    which = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)  # [b, max_atoms]
    types = jnp.take_along_axis(comp.elements, jnp.minimum(which, m - 1), axis=-1)
    types = jnp.where(slot[None] < num_atoms[:, None], types, 0)
    lattice_mean = jnp.asarray(statics.lattice.mean, jnp.float32)
    lattice_std = jnp.asarray(statics.lattice.std, jnp.float32)
    lat = SyMat(model).apply(params, z.z_lat, method=SyMat.decode_lattice) * lattice_std + lattice_mean
    lengths = lat[:, :3] * jnp.cbrt(num_atoms.astype(lat.dtype))[:, None]  # scaled lengths -> lengths
    return Decoded(types.astype(jnp.int32), num_atoms.astype(jnp.int32), lengths, lat[:, 3:])


def reject_reason(n: int, lengths: np.ndarray, angles: np.ndarray, max_atoms: int) -> str | None:
    """Return why a decoded crystal cannot be sampled, or None."""
    if n > max_atoms:
        return f"{n} atoms, more than the padding limit max_atoms={max_atoms}"
    if n < 1:
        return "no atoms"
    return geometry.cell_defect(lengths, angles, n)


class DecodedSet(NamedTuple):
    """The decoded crystals of a request on the host: the accepted ones' types, cells, latents and sample index, and the rejects."""

    atom_types: list[np.ndarray]
    lengths: np.ndarray
    angles: np.ndarray
    z_pos: np.ndarray
    index: np.ndarray
    rejects: list[dict[str, Any]]


_DECODE_CACHE: dict[Any, Any] = {}


def _jitted_latents(model: ModelConfig, prior_cfg: PriorConfig):
    """Return a jitted ``(key, num, prior) -> Latents`` for static configs."""
    key = ("latents", model, prior_cfg)
    if key not in _DECODE_CACHE:
        _DECODE_CACHE[key] = jax.jit(lambda k, num, prior: sample_latents(k, num, model, prior_cfg, prior),
                                     static_argnums=(1,))
    return _DECODE_CACHE[key]


def _jitted_decode(model: ModelConfig, decode: DecodeConfig, statics: RunStatics):
    """Return a jitted ``(params, Latents, key) -> Decoded`` for static configs."""
    key = ("decode", model, decode, statics)
    if key not in _DECODE_CACHE:
        _DECODE_CACHE[key] = jax.jit(lambda params, z, k: decode_crystals(params, z, k, model=model, decode=decode,
                                                                          statics=statics))
    return _DECODE_CACHE[key]


def draw_latents(key: Array, num: int, *, model: ModelConfig, prior_cfg: PriorConfig, batch_size: int = 256,
                 prior: MixturePrior | None = None) -> Latents:
    """Return the ``num`` latents of a request (host arrays), drawn in batches of ``batch_size`` from ``key``'s latent stream."""
    kz = jax.random.split(key, 3)[0]
    draw = _jitted_latents(model, prior_cfg)
    parts = [draw(jax.random.fold_in(kz, start), min(batch_size, num - start), prior) for start in range(0, num, batch_size)]
    return Latents(*(np.concatenate([np.asarray(getattr(p, f)) for p in parts]) for f in Latents._fields))


def decode_latents(params: Any, z: Latents, key: Array, *, model: ModelConfig, decode: DecodeConfig,
                   statics: RunStatics, batch_size: int = 256, progress: bool = False) -> DecodedSet:
    """Return the crystals decoded from latents ``z`` (host or device arrays ``[num, dim]``) with ``key``'s decoding stream.

    Crystals that cannot be sampled are listed as rejects with their index and
    reason. Batches of ``batch_size`` take keys by their first index, so a
    request decodes the same whatever the batch split of its latents' draw.
    """
    kd = jax.random.split(key, 3)[1]
    num = int(np.shape(z.z_comp)[0])
    run = _jitted_decode(model, decode, statics)
    parts = []
    for start in tqdm(range(0, num, batch_size), desc="decoding", unit="batch", disable=not progress or num <= batch_size):
        chunk = Latents(*(x[start : start + batch_size] for x in z))
        dec = run(params, chunk, jax.random.fold_in(kd, start))
        parts.append([np.asarray(x) for x in (dec.atom_types, dec.num_atoms, dec.lengths, dec.angles, chunk.z_pos)])
    types, n, lengths, angles, z_pos = (np.concatenate(p) for p in zip(*parts))
    rejects: list[dict[str, Any]] = []
    ok = np.ones(num, bool)
    for i in range(num):
        reason = reject_reason(int(n[i]), lengths[i], angles[i], model.max_atoms)
        if reason is not None:
            ok[i] = False
            rejects.append({"index": i, "reason": reason, "num_atoms": int(n[i]),
                            "lengths": lengths[i].tolist(), "angles": angles[i].tolist()})
    accepted = np.flatnonzero(ok)
    return DecodedSet([types[i, : n[i]].astype(np.int64) for i in accepted], lengths[accepted], angles[accepted],
                      z_pos[accepted], accepted, rejects)


def decode_batches(params: Any, key: Array, num: int, *, model: ModelConfig, prior_cfg: PriorConfig,
                   decode: DecodeConfig, statics: RunStatics, batch_size: int = 256,
                   prior: MixturePrior | None = None, progress: bool = False) -> DecodedSet:
    """Return the ``num`` crystals decoded from ``key`` in batches of ``batch_size`` (the same key, the same crystals)."""
    z = draw_latents(key, num, model=model, prior_cfg=prior_cfg, batch_size=batch_size, prior=prior)
    return decode_latents(params, z, key, model=model, decode=decode, statics=statics, batch_size=batch_size,
                          progress=progress)
