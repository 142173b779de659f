"""``sample(run, preset, num, seed)``: a preset's stages on a trained run, in memory; what ``symat sample`` writes.

:func:`load_sampling_run` reads what a preset samples from a run folder (its
checkpoint and weights, the retry's network, the fitted prior);
:func:`sample` decodes the request and runs the preset's stages in order;
:func:`sample_from_latents` does the same for latents of the caller's (an optimiser's).
The command line only writes the returned :class:`~symat_jax.sampling.stages.Samples`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from symat_jax.configs import (FittedPrior, ModelConfig, RelaxConfig, RetryConfig, SamplerPreset, StandardPrior,
                               get_sampler_preset)
from symat_jax.crystals import CrystalSet
from symat_jax.prior import MixturePrior
from symat_jax.sampling.decode import Latents, decode_latents, draw_latents
from symat_jax.sampling.schedule import build_schedule
from symat_jax.sampling.stages import Context, Samples, build_stages
from symat_jax.statics import RunStatics
from symat_jax.tersoff import CARBON_DATASETS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingRun:
    """What a preset samples with: the run's dataset, model, statics and parameters, its prior, and the epochs loaded.

    ``stage_params``: parameters of a stage that samples another network
    (``"retry"``: the retry's epoch); ``epochs``: ``checkpoint_epoch``,
    ``score_epoch``, ``weights`` and, with a retry, ``retry_epoch``.
    """

    dataset: str
    model: ModelConfig
    statics: RunStatics
    params: Any
    prior: MixturePrior | None = None
    stage_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_sampling_run(workdir: str | os.PathLike, preset: SamplerPreset, *, score_checkpoint: str | None = None) -> SamplingRun:
    """Return what ``preset`` samples from the run in ``workdir`` (its checkpoint, weights, retry network and prior).

    ``score_checkpoint`` takes the score network from another kept checkpoint
    (the decoders from the preset's). A retry whose epoch the run does not
    keep uses the sampling network, with a warning, when that epoch is the
    named preset's own choice (a run trained before it was kept); an epoch the
    caller chose must exist.
    """
    from symat_jax import run as run_folder  # orbax: loaded only where a run folder is read

    loaded = run_folder.load_run(workdir, preset.checkpoint, preset.weights, score_checkpoint)
    config, statics, params, meta = loaded
    epochs = {"checkpoint_epoch": int(meta["epoch"]) + 1, "score_epoch": meta["score_epoch"],
              "weights": meta["weights"]}
    stage_params: dict[str, Any] = {}
    retry = preset.stage(RetryConfig)
    if retry is not None:
        epochs["retry_epoch"] = meta["score_epoch"]
        if retry.checkpoint is not None:
            try:
                other = run_folder.load_run(workdir, preset.checkpoint, preset.weights, retry.checkpoint)
                stage_params["retry"] = other.params
                epochs["retry_epoch"] = other.meta["score_epoch"]
            except FileNotFoundError:
                builtin = _builtin_stage(config.dataset, preset.name, RetryConfig)
                if builtin is None or builtin.checkpoint != retry.checkpoint:
                    raise
                log.warning("%s keeps no epoch %s: the retry chain uses the sampling score network (epoch %s)",
                            workdir, retry.checkpoint, meta["score_epoch"])
    prior = run_folder.load_prior(workdir) if isinstance(preset.prior, FittedPrior) else None
    return SamplingRun(config.dataset, config.model, statics, params, prior, stage_params, epochs)


def _builtin_stage(dataset: str, name: str, kind: type) -> Any:
    """Return the stage of ``kind`` of the built-in preset ``name`` (None for a preset of the caller's own)."""
    try:
        return get_sampler_preset(dataset, name).stage(kind)
    except ValueError:
        return None


def check_preset(run: SamplingRun, preset: SamplerPreset, latents_given: bool = False) -> None:
    """Raise ValueError when ``run`` cannot sample ``preset`` (before any work); ``latents_given``: no prior needed."""
    build_schedule(preset.chain, run.model, run.statics.score_norm)
    if preset.stage(RelaxConfig) is not None and run.dataset not in CARBON_DATASETS:
        raise ValueError(f"the Tersoff relaxation knows carbon only, not {run.dataset}; sample without it (--no-relax)")
    if isinstance(preset.prior, FittedPrior) and run.prior is None and not latents_given:
        raise ValueError("the preset samples the fitted prior but the run has none (`symat fit-prior`)")


def _resolved(run: SamplingRun | str | os.PathLike, preset: SamplerPreset | str,
              latents_given: bool = False) -> tuple[SamplingRun, SamplerPreset]:
    """Return the loaded run and preset of :func:`sample`'s arguments (no prior loaded when ``latents_given``)."""
    if not isinstance(run, SamplingRun):
        from symat_jax import run as run_folder

        dataset = run_folder.read_config(run).dataset
        preset = get_sampler_preset(dataset, preset) if isinstance(preset, str) else preset
        loading = dataclasses.replace(preset, prior=StandardPrior()) if latents_given else preset
        run = load_sampling_run(run, loading)
    elif isinstance(preset, str):
        preset = get_sampler_preset(run.dataset, preset)
    return run, preset


def sample(run: SamplingRun | str | os.PathLike, preset: SamplerPreset | str, num: int, seed: int = 0, *,
           batch_size: int = 256, bucket_multiple: int = 4, progress: bool = True) -> Samples:
    """Return ``num`` crystals of ``preset`` (a preset or a built-in's name) from ``run`` (loaded, or its folder).

    Draws the request's latents from the preset's prior and decodes them in
    batches of ``batch_size``, lists the crystals that cannot be sampled as
    rejects (never dropped silently), then runs the preset's stages in order.
    The same seed gives the same crystals.
    """
    run, preset = _resolved(run, preset)
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be at least 1, got {num}, {batch_size}")
    check_preset(run, preset)
    samples = decode(run, preset, num, seed, batch_size=batch_size, progress=progress)
    return _run_stages(run, preset, samples, seed, batch_size, bucket_multiple, progress)


def sample_from_latents(run: SamplingRun | str | os.PathLike, preset: SamplerPreset | str, z: Latents, seed: int = 0,
                        *, batch_size: int = 256, bucket_multiple: int = 4, progress: bool = True) -> Samples:
    """Return the crystals of given latents ``z`` (``[num, dim]`` each part) through ``preset``'s decoding and stages.

    Crystal ``i`` is decoded, and its chain run, with the keys :func:`sample`
    gives its ``i``-th crystal for ``seed``: the latents of a ``sample``
    request give the same crystals here. The preset's prior is not used.
    """
    run, preset = _resolved(run, preset, latents_given=True)
    check_preset(run, preset, latents_given=True)
    samples = decode_given(run, preset, z, seed, batch_size=batch_size, progress=progress)
    return _run_stages(run, preset, samples, seed, batch_size, bucket_multiple, progress)


def _run_stages(run: SamplingRun, preset: SamplerPreset, samples: Samples, seed: int, batch_size: int,
                bucket_multiple: int, progress: bool) -> Samples:
    """Return ``samples`` after the preset's stages, in order."""
    ctx = context(run, seed, batch_size=batch_size, bucket_multiple=bucket_multiple, progress=progress)
    for stage in build_stages(preset.stages):
        samples = stage(samples, ctx)
    return samples


def decode(run: SamplingRun, preset: SamplerPreset, num: int, seed: int = 0, *, batch_size: int = 256,
           progress: bool = False) -> Samples:
    """Return the ``num`` decoded crystals of :func:`sample`'s request (types, cells, latents, rejects; coordinates zero)."""
    z = draw_latents(jax.random.PRNGKey(seed), num, model=run.model, prior_cfg=preset.prior, batch_size=batch_size,
                     prior=run.prior)
    return decode_given(run, preset, z, seed, batch_size=batch_size, progress=progress)


def decode_given(run: SamplingRun, preset: SamplerPreset, z: Latents, seed: int = 0, *, batch_size: int = 256,
                 progress: bool = False) -> Samples:
    """Return the decoded crystals of latents ``z`` for ``seed`` (types, cells, latents, rejects; coordinates zero)."""
    t0 = time.perf_counter()
    dec = decode_latents(run.params, z, jax.random.PRNGKey(seed), model=run.model, decode=preset.decode,
                         statics=run.statics, batch_size=batch_size, progress=progress)
    n = np.array([len(t) for t in dec.atom_types], np.int64)
    types = np.concatenate(dec.atom_types) if dec.atom_types else np.zeros(0, np.int64)
    crystals = CrystalSet(n, types, np.zeros((int(n.sum()), 3), np.float32), dec.lengths, dec.angles, len(dec.rejects))
    samples = Samples(crystals, dec.index, dec.z_pos, np.zeros(len(n), bool), dec.rejects)
    return samples.recorded("decode", {"num_requested": int(np.shape(z.z_comp)[0]), "num_rejected": len(dec.rejects),
                                       "seconds": time.perf_counter() - t0})


def context(run: SamplingRun, seed: int = 0, *, batch_size: int = 256, bucket_multiple: int = 4,
            progress: bool = True) -> Context:
    """Return the context :func:`sample`'s stages run in for ``run`` and ``seed``."""
    return Context(run.model, run.statics, run.params, jax.random.PRNGKey(seed), seed, batch_size, bucket_multiple,
                   progress, run.stage_params)
