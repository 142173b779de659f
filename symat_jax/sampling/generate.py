"""The whole generative path as one jittable function: latents, decoding and the chain, padded to ``max_atoms``.

For research code that wants crystals inside ``jit``/``vmap`` (no size
buckets, no host stages): :func:`generate`. The host path with buckets,
rejects and the preset's later stages is :func:`symat_jax.sampling.sample`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from symat_jax import geometry
from symat_jax.configs import ModelConfig, SamplerPreset
from symat_jax.prior import MixturePrior
from symat_jax.sampling.chain import run_chain
from symat_jax.sampling.decode import decode_crystals, sample_latents
from symat_jax.sampling.schedule import build_schedule
from symat_jax.statics import RunStatics

Array = jax.Array


class Generated(NamedTuple):
    """Generated crystals padded to ``max_atoms``: types, counts, lattices, coordinates and diagnostics."""

    atom_types: Array  # [b, max_atoms]
    num_atoms: Array  # [b]
    lengths: Array  # [b, 3]
    angles: Array  # [b, 3]
    frac_coords: Array  # [b, max_atoms, 3]
    overflow: Array  # [b] neighbour list incomplete at some step
    too_many_atoms: Array  # [b] decoded N above max_atoms (coordinates cover only the first max_atoms)


def generate(params: Any, key: Array, num: int, *, statics: RunStatics, model: ModelConfig, preset: SamplerPreset,
             max_images: tuple[int, int, int] | None = None, prior: MixturePrior | None = None) -> Generated:
    """Return ``num`` crystals of the preset's prior, decoding and chain, padded to ``max_atoms`` (jittable; ``num``, configs static).

    ``prior`` (an array pytree, not static) is the run's fitted mixture, for a
    :class:`~symat_jax.configs.FittedPrior`. The preset's host stages (retry,
    relaxation, hops) do not run here. ``max_images`` defaults to the training set's range.
    """
    kz, kd, kx = jax.random.split(key, 3)
    z = sample_latents(kz, num, model, preset.prior, prior)
    dec = decode_crystals(params, z, kd, model=model, decode=preset.decode, statics=statics)
    mask = dec.atom_types > 0
    lattice = geometry.lattice_matrix(dec.lengths, dec.angles)
    schedule = build_schedule(preset.chain, model, statics.score_norm)
    images = tuple(statics.max_images if max_images is None else max_images)
    frac, overflow = run_chain(params, kx, dec.atom_types, mask, lattice, z.z_pos, schedule=schedule, model=model,
                               max_images=images)
    return Generated(dec.atom_types, dec.num_atoms, dec.lengths, dec.angles, frac, overflow,
                     dec.num_atoms > model.max_atoms)
