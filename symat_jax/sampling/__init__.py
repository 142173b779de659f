"""Generating crystals (SPEC 4) as a pipeline of stages; one module per concept.

* :mod:`~symat_jax.sampling.decode`: latents (standard or fitted prior) -> composition and lattice;
* :mod:`~symat_jax.sampling.schedule`: the chain's :class:`Schedule`, built on the host;
* :mod:`~symat_jax.sampling.chain`: the compiled annealed-Langevin program over a schedule;
* :mod:`~symat_jax.sampling.driver`: size buckets and chunks for the compiled chain;
* :mod:`~symat_jax.sampling.stages`: ``Chain``, ``Retry``, ``Relax``, ``Hop`` and :class:`Samples`;
* :mod:`~symat_jax.sampling.pipeline`: :func:`sample`, a preset's stages on a run, in memory;
* :mod:`~symat_jax.sampling.generate`: :func:`generate`, the jittable path (no host stages).

Presets and their stage configs are data in :mod:`symat_jax.configs`
(:class:`~symat_jax.configs.SamplerPreset`, :func:`~symat_jax.configs.get_sampler_preset`).
"""

from symat_jax.sampling.chain import denoise, initial_positions, langevin_step, run_chain, trace_chain
from symat_jax.sampling.decode import (Decoded, Latents, decode_batches, decode_crystals, decode_latents, draw_latents,
                                       sample_latents)
from symat_jax.sampling.driver import bucket_sizes, run_chains
from symat_jax.sampling.generate import Generated, generate
from symat_jax.sampling.pipeline import (SamplingRun, check_preset, context, decode, decode_given, load_sampling_run,
                                         sample, sample_from_latents)
from symat_jax.sampling.schedule import Schedule, build_schedule
from symat_jax.sampling.stages import Chain, Context, Hop, Relax, Retry, Samples, build_stages, relax_crystals

__all__ = ["Chain", "Context", "Decoded", "Generated", "Hop", "Latents", "Relax", "Retry", "Samples", "SamplingRun",
           "Schedule", "bucket_sizes", "build_schedule", "build_stages", "check_preset", "context", "decode", "decode_batches", "decode_crystals", "decode_given", "decode_latents", "denoise", "draw_latents",
           "generate", "initial_positions", "langevin_step", "load_sampling_run", "relax_crystals", "run_chain",
           "run_chains", "sample", "sample_from_latents", "sample_latents", "trace_chain"]
