"""The host driver of the compiled chain: size buckets, fixed chunk shapes, one compilation per bucket, timings.

Crystals are grouped by atom count into buckets (multiples of
``bucket_multiple``) and padded only to their bucket, so 5-atom crystals are
not padded to 24; a bucket's chunks share one shape so each bucket compiles
once. The compiled program's cache key is the model, the run's statics, the
:class:`~symat_jax.configs.ChainConfig`, the image range and the shapes:
nothing of the stages that run on the host after it.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from symat_jax import geometry
from symat_jax.configs import ChainConfig, ModelConfig
from symat_jax.crystals import CrystalSet
from symat_jax.neighbors import required_image_range
from symat_jax.sampling.chain import run_chain
from symat_jax.sampling.schedule import build_schedule
from symat_jax.statics import RunStatics

Array = jax.Array

_CHAIN_CACHE: dict[Any, Any] = {}
# How many times a chain program was traced (tests check that host stages share one program).
TRACE_COUNT = {"chain": 0}


def bucket_sizes(max_atoms: int, multiple: int = 4) -> list[int]:
    """Return padded atom counts of the size buckets: multiples of ``multiple`` up to ``max_atoms``."""
    sizes = list(range(multiple, max_atoms, multiple)) + [max_atoms]
    return sorted(set(min(s, max_atoms) for s in sizes))


def compiled_chain(model: ModelConfig, chain: ChainConfig, statics: RunStatics, max_images: tuple[int, int, int],
                   args: tuple) -> tuple[Any, float]:
    """Return ``(the chain compiled for these argument shapes, seconds spent compiling now)``."""
    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args))
    key = (model, chain, statics, max_images, shapes)
    if key in _CHAIN_CACHE:
        return _CHAIN_CACHE[key], 0.0
    t0 = time.perf_counter()
    schedule = build_schedule(chain, model, statics.score_norm)

    def program(*a):
        TRACE_COUNT["chain"] += 1
        return run_chain(*a, schedule=schedule, model=model, max_images=max_images)

    _CHAIN_CACHE[key] = jax.jit(program).lower(*args).compile()
    return _CHAIN_CACHE[key], time.perf_counter() - t0


class Chains(NamedTuple):
    """Coordinates after the chain of each crystal that ran (others empty), overflow flags and timings."""

    frac_coords: list[np.ndarray]
    overflow: np.ndarray
    compile_seconds: float
    run_seconds: float
    padded_atom_share: float


def run_chains(params: Any, key: Array, crystals: CrystalSet, index: np.ndarray, z_pos: np.ndarray, rows: np.ndarray,
               *, chain: ChainConfig, model: ModelConfig, statics: RunStatics, batch_size: int = 256,
               bucket_multiple: int = 4, progress: bool = True, desc: str = "chain") -> Chains:
    """Return the chains of ``crystals`` ``rows`` (their types and cells; ``index``: sample index, the chunk keys' source)."""
    count = len(crystals)
    n = np.asarray(crystals.num_atoms, np.int64)
    sizes = bucket_sizes(model.max_atoms, bucket_multiple)
    bucket_of = np.searchsorted(sizes, n)  # smallest bucket holding n atoms
    chosen = np.zeros(count, bool)
    chosen[rows] = True
    types = np.zeros((count, model.max_atoms), np.int64)
    offsets = crystals.offsets
    for i in range(count):
        types[i, : n[i]] = crystals.atom_types[offsets[i] : offsets[i + 1]]
    lattices = np.zeros((count, 3, 3))
    for i in rows:
        lattices[i] = np.asarray(geometry.lattice_matrix(crystals.lengths[i], crystals.angles[i]))
    frac_out: list[np.ndarray] = [np.zeros((0, 3)) for _ in range(count)]
    overflow = np.zeros(count, bool)
    compile_s = run_s = 0.0
    real_atoms = padded_atoms = 0
    bar = tqdm(total=int(chosen.sum()), desc=desc, unit="crystal", disable=not progress)
    for bi, size in enumerate(sizes):
        members = np.flatnonzero(chosen & (bucket_of == bi))
        if not len(members):
            continue
        chunk = min(batch_size, -(-len(members) // 8) * 8)  # one chunk shape per bucket
        images = required_image_range(lattices[members], model.score_cutoff)
        for start in range(0, len(members), chunk):
            idx = members[start : start + chunk]
            sel = np.concatenate([idx, np.repeat(idx[:1], chunk - len(idx))])  # pad rows with a copy
            args = (
                params,
                jax.random.fold_in(key, int(index[idx[0]])),  # the chunk's first sample index
                jnp.asarray(types[sel, :size]),
                jnp.asarray(types[sel, :size] > 0),
                jnp.asarray(lattices[sel], jnp.float32),
                jnp.asarray(z_pos[sel]),
            )
            fn, seconds = compiled_chain(model, chain, statics, images, args)
            compile_s += seconds
            t0 = time.perf_counter()
            frac, ovf = jax.block_until_ready(fn(*args))
            run_s += time.perf_counter() - t0
            frac, ovf = np.asarray(frac), np.asarray(ovf)
            for row, i in enumerate(idx):
                frac_out[int(i)] = frac[row, : n[i]]
                overflow[i] = bool(ovf[row])
            real_atoms += int(n[idx].sum())
            padded_atoms += chunk * size
            bar.update(len(idx))
    bar.close()
    return Chains(frac_out, overflow, compile_s, run_s, 1.0 - real_atoms / max(padded_atoms, 1))

