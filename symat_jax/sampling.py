"""Generating crystals (SPEC 4): latents, composition and lattice decoding, annealed Langevin dynamics.

Pure, jittable pieces:

* :func:`decode_crystals`: latents -> atom types (padded to ``max_atoms``),
  atom counts and lattices;
* :func:`langevin`: the annealed Langevin dynamics of a batch of crystals as
  one program (``lax.scan`` over levels, ``fori_loop`` over steps, neighbour
  lists rebuilt inside every step, their overflow flag carried out per crystal);
* :func:`generate`: both, padded to ``max_atoms`` (one compilation), callable
  under ``jax.jit`` with a static config.

:func:`sample` is the host-side driver: it groups crystals by atom count into
size buckets (so 5-atom crystals are not padded to 24), chunks large
requests, reports rejects and timings. Everything takes the run's
:class:`~symat_jax.run.RunStatics` whole (score normaliser, lattice
standardiser, image range) and imports no host-side code.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from symat_jax import geometry, score
from symat_jax.configs import ModelConfig, SamplerConfig
from symat_jax.model import SyMat, coordinate_scores, decode_composition
from symat_jax.neighbors import required_image_range
from symat_jax.prior import PRIOR_KINDS, MixturePrior, sample_mixture
from symat_jax.run import RunStatics

Array = jax.Array

class Decoded(NamedTuple):
    """Decoded composition and lattice of a batch: ``atom_types [b, max_atoms]`` (0 = none), ``num_atoms [b]``
    (may exceed ``max_atoms``: such crystals must be rejected), ``lengths``/``angles [b, 3]``."""

    atom_types: Array
    num_atoms: Array
    lengths: Array
    angles: Array


class Latents(NamedTuple):
    """Latent draws ``z_comp``, ``z_pos``, ``z_lat`` ``[b, dim]``."""

    z_comp: Array
    z_pos: Array
    z_lat: Array


def sample_latents(key: Array, num: int, model: ModelConfig, cfg: SamplerConfig,
                   prior: MixturePrior | None = None) -> Latents:
    """Return ``num`` latents: ``N(0, T^2 I)`` with the config's temperatures, or draws from a fitted mixture prior.

    ``cfg.prior == "fitted"`` needs ``prior`` (the run's ``prior.npz``, :func:`symat_jax.run.load_prior`).
    """
    if cfg.prior == "fitted":
        if prior is None:
            raise ValueError("the sampler config asks for the fitted prior (prior='fitted') but none was given")
        z = sample_mixture(prior, key, num, cfg.prior_temperature)
        c, p = model.latent_comp, model.latent_pos
        return Latents(z[:, :c], z[:, c : c + p], z[:, c + p :])
    if cfg.prior != "standard":
        raise ValueError(f"prior must be one of {PRIOR_KINDS}, got {cfg.prior!r}")
    kc, kp, kl = jax.random.split(key, 3)
    return Latents(
        cfg.temp_comp * jax.random.normal(kc, (num, model.latent_comp)),
        cfg.temp_pos * jax.random.normal(kp, (num, model.latent_pos)),
        cfg.temp_lat * jax.random.normal(kl, (num, model.latent_lat)),
    )


def decode_crystals(
    params: Any, z: Latents, key: Array, *, model: ModelConfig, cfg: SamplerConfig, statics: RunStatics
) -> Decoded:
    """Return compositions (argmax or sampled k, top-k elements, counts) and lattices of latents (jittable)."""
    comp = decode_composition(params, model, z.z_comp, key=key, mode=cfg.decode, temperature=cfg.decode_temperature,
                              max_total=model.max_atoms if cfg.fit_counts else None)
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


def level_schedule(model: ModelConfig, cfg: SamplerConfig, score_norm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(level indices high -> low [L], step sizes alpha_t [L])`` for the sampler config.

    ``step_schedule="paper"``: ``alpha_t = step_size (sigma_t / sigma_1)^2`` (SPEC 4).
    ``"norm"``: ``alpha_t = step_fraction * norm(sigma_t)^2``. The network
    predicts ``s ~ target / norm``, so a step ``alpha s / norm`` moves an atom
    by ``alpha / norm^2`` of its predicted target: this schedule makes that
    fraction the same at every level. The paper's schedule gives about 1/2 at
    low levels, where ``norm ~ sqrt(2) sigma``, but ``sigma^2 / norm^2`` (24
    at sigma = 10 on Carbon-24) at high ones, where ``norm`` levels off.
    """
    sigmas = score.noise_levels(model.num_levels, model.sigma_min, model.sigma_max)
    top = model.num_levels - 1 if cfg.top_level is None else cfg.top_level
    if not 0 <= top < model.num_levels:
        raise ValueError(f"top_level must be in 0..{model.num_levels - 1}, got {top}")
    if not 1 <= cfg.num_levels <= top + 1:
        raise ValueError(f"num_levels must be in 1..{top + 1} (the trained levels up to top_level), got {cfg.num_levels}")
    if cfg.steps_per_level < 1:
        raise ValueError(f"steps_per_level must be at least 1, got {cfg.steps_per_level}")
    idx = np.unique(np.round(np.linspace(0, top, cfg.num_levels)).astype(int))[::-1]
    if cfg.step_schedule == "paper":
        alphas = cfg.step_size * (sigmas[idx] / sigmas[0]) ** 2
    elif cfg.step_schedule == "norm":
        alphas = cfg.step_fraction * np.asarray(score_norm, np.float64)[idx] ** 2
    else:
        raise ValueError(f"step_schedule must be 'paper' or 'norm', got {cfg.step_schedule!r}")
    return idx, alphas


def restart_start(model: ModelConfig, cfg: SamplerConfig, levels: np.ndarray) -> int:
    """Return the position in the schedule ``levels`` where each restart begins (the level nearest ``restart_sigma``)."""
    if cfg.restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {cfg.restarts}")
    sigmas = score.noise_levels(model.num_levels, model.sigma_min, model.sigma_max)[levels]
    if cfg.restarts and not sigmas[-1] < cfg.restart_sigma <= sigmas[0]:
        raise ValueError(f"restart_sigma must lie in ({sigmas[-1]:.3g}, {sigmas[0]:.3g}] A (the schedule's range), "
                         f"got {cfg.restart_sigma}")
    return int(np.argmin(np.abs(np.log(sigmas / cfg.restart_sigma))))


def band_levels(model: ModelConfig, cfg: SamplerConfig, levels: np.ndarray) -> np.ndarray:
    """Return ``[L]`` whether each level of the schedule lies in ``cfg.band`` (all False without a band)."""
    if not cfg.band:
        return np.zeros(len(levels), bool)
    lo, hi = cfg.band
    if not 0 < lo <= hi or cfg.band_steps < 1:
        raise ValueError(f"band must be 0 < low <= high sigma (A) with band_steps >= 1, got {cfg.band}, {cfg.band_steps}")
    if not cfg.band_temp >= 0:
        raise ValueError(f"band_temp must be >= 0, got {cfg.band_temp}")
    sigmas = score.noise_levels(model.num_levels, model.sigma_min, model.sigma_max)[levels]
    return (sigmas >= lo) & (sigmas <= hi)


def level_steps(model: ModelConfig, cfg: SamplerConfig, levels: np.ndarray) -> np.ndarray:
    """Return ``[L]`` the number of Langevin steps at each level of the schedule (``cfg.band`` levels: ``band_steps``)."""
    if cfg.quench_steps < 0:
        raise ValueError(f"quench_steps must be >= 0, got {cfg.quench_steps}")
    steps = np.full(len(levels), cfg.steps_per_level, np.int32)
    return np.where(band_levels(model, cfg, levels), cfg.band_steps, steps).astype(np.int32)


def _langevin_step(
    params: Any,
    x: Array,
    key: Array,
    *,
    lattice: Array,
    atom_types: Array,
    atom_mask: Array,
    z_pos: Array,
    alpha: Array,
    norm: Array,
    temp: Array,
    model: ModelConfig,
    graph_config: score.ScoreGraphConfig,
) -> tuple[Array, Array]:
    """Return ``(next positions [b, n, 3], overflow [b])`` of one Langevin step."""
    s, nl = coordinate_scores(params, model, x, lattice, atom_types, atom_mask, z_pos, graph_config=graph_config)
    noise = jax.random.normal(key, x.shape)
    x = x + alpha * s / norm + jnp.sqrt(2.0 * alpha) * temp * noise
    return jax.vmap(geometry.wrap_cart)(x, lattice, atom_mask), nl.overflow


def initial_positions(key: Array, lattice: Array, atom_mask: Array) -> Array:
    """Return ``[b, n, 3]`` cartesian positions uniform in fractional ``[-0.5, 0.5)^3`` (0 at padding)."""
    frac = jax.random.uniform(key, atom_mask.shape + (3,), minval=-0.5, maxval=0.5)
    frac = jnp.where(atom_mask[..., None], frac, 0.0)
    return geometry.frac_to_cart(frac, lattice)


def _constant_noise(cfg: SamplerConfig) -> bool:
    """Return whether every level uses the same noise scale ``temp_coord`` (the paper setting)."""
    return cfg.noise_schedule == "constant" and cfg.quiet_levels == 0 and (not cfg.band or cfg.band_temp == 1.0)


def _noise_scales(model: ModelConfig, cfg: SamplerConfig, levels: np.ndarray, score_norm: Sequence[float]) -> Array:
    """Return ``[L]`` the Langevin noise scale of each level of the schedule (0 on the quiet levels)."""
    sigmas = score.noise_levels(model.num_levels, model.sigma_min, model.sigma_max)[levels]
    if cfg.noise_schedule == "constant":
        temps = np.full(len(levels), cfg.temp_coord)
    elif cfg.noise_schedule == "sigma":
        temps = cfg.temp_coord * sigmas / np.asarray(score_norm, np.float64)[levels]
    else:
        raise ValueError(f"noise_schedule must be 'constant' or 'sigma', got {cfg.noise_schedule!r}")
    temps = np.where(band_levels(model, cfg, levels), cfg.band_temp * temps, temps)
    quiet = np.arange(len(levels)) >= len(levels) - cfg.quiet_levels
    return jnp.asarray(np.where(quiet, 0.0, temps), jnp.float32)


def denoise(
    params: Any,
    x: Array,
    *,
    lattice: Array,
    atom_types: Array,
    atom_mask: Array,
    z_pos: Array,
    norm: Array,
    scale: float,
    model: ModelConfig,
    graph_config: score.ScoreGraphConfig,
) -> Array:
    """Return ``[b, n, 3]`` the expected clean positions ``x + scale * norm(sigma) * s(x)`` (wrapped), a Tweedie step.

    The network's per-atom output ``s`` estimates the per-atom target divided
    by ``norm(sigma)`` (SPEC 3); the target is the bond-length correction that
    moves the noisy atom towards its clean position, so ``norm(sigma) * s`` is
    the model's estimate of the displacement still to go. The target sums the
    corrections along up to K bonds, which can exceed the displacement itself:
    ``scale`` (< 1) compensates (measured in ``experiments/recovery.py``).
    """
    s, _ = coordinate_scores(params, model, x, lattice, atom_types, atom_mask, z_pos, graph_config=graph_config)
    return jax.vmap(geometry.wrap_cart)(x + scale * norm * s, lattice, atom_mask)


def langevin(
    params: Any,
    key: Array,
    atom_types: Array,
    atom_mask: Array,
    lattice: Array,
    z_pos: Array,
    *,
    statics: RunStatics,
    model: ModelConfig,
    cfg: SamplerConfig,
    max_images: tuple[int, int, int] | None = None,
    x0: Array | None = None,
    python_loop: bool = False,
    trace: bool = False,
) -> tuple[Array, ...]:
    """Return ``(fractional coordinates [b, n, 3], neighbour-list overflow [b])`` after annealed Langevin dynamics.

    ``atom_types``/``atom_mask [b, n]``, ``lattice [b, 3, 3]``, ``z_pos [b, latent_pos]``.
    One program: ``lax.scan`` over the levels (high to low noise),
    ``fori_loop`` over the steps of each level; shapes are fixed. The chain
    starts uniform in the cell, or at cartesian ``x0 [b, n, 3]``; the last
    ``cfg.quiet_levels`` levels run without noise; ``cfg.restarts`` times the
    chain is then noised back up to ``cfg.restart_sigma`` and those levels run
    again; ``cfg.quench_steps`` noise-free steps at the lowest level follow, and
    ``cfg.final_denoise`` ends with :func:`denoise` at the lowest level.
    ``max_images`` (default: the training set's range, ``statics.max_images``)
    bounds the periodic images searched; a lattice that needs more raises the
    overflow flag. ``python_loop=True`` runs the same steps one jitted step at
    a time from Python instead (slow; the reference the compiled loop is tested against).
    ``trace=True`` adds a third output, ``[L, b, n, 3]`` the fractional
    coordinates after each level of the first pass (``level_schedule``'s order):
    where along the chain the crystals form or lose their bonds.
    """
    images = tuple(statics.max_images if max_images is None else max_images)
    graph_config = score.ScoreGraphConfig(model.score_cutoff, model.score_neighbors, images)
    levels, alphas = level_schedule(model, cfg, statics.score_norm)
    alphas = jnp.asarray(alphas, jnp.float32)
    norms = jnp.asarray(statics.score_norm, jnp.float32)[levels]
    temps = _noise_scales(model, cfg, levels, statics.score_norm)
    k0, kl = jax.random.split(key)
    level_keys = jax.random.split(kl, len(levels))
    start = initial_positions(k0, lattice, atom_mask) if x0 is None else x0
    carry = (start, jnp.zeros(atom_mask.shape[0], bool))
    inputs = dict(lattice=lattice, atom_types=atom_types, atom_mask=atom_mask, z_pos=z_pos)
    settings = dict(model=model, graph_config=graph_config)

    def step(i, c, alpha, norm, temp, lkey, step_fn=_langevin_step, quiet=False):
        x, overflow = c
        # The paper setting's noise scale is a constant, folded into the program exactly as SPEC 4 writes
        # it (a traced scale changes float rounding in the last bits).
        temp = 0.0 if quiet else cfg.temp_coord if _constant_noise(cfg) else temp
        x, ovf = step_fn(params, x, jax.random.fold_in(lkey, i), alpha=alpha, norm=norm, temp=temp, **inputs,
                         **settings)
        return x, overflow | ovf

    steps = level_steps(model, cfg, levels)
    jitted = (jax.jit(_langevin_step, static_argnames=tuple(settings) + (("temp",) if _constant_noise(cfg) else ()))
              if python_loop else None)

    def level(c, xs):
        alpha, norm, temp, lkey, n = xs
        body = functools.partial(step, alpha=alpha, norm=norm, temp=temp, lkey=lkey)
        # Without a band every level has the same static trip count (the paper program, unchanged).
        c = jax.lax.fori_loop(0, cfg.steps_per_level if not cfg.band else n, body, c)
        return c, c[0] if trace else None

    def run_levels(c, xs):
        if not python_loop:
            return jax.lax.scan(level, c, xs)
        states = []
        for alpha, norm, temp, lkey, n in zip(*xs):
            for i in range(int(n)):
                c = step(i, c, alpha, norm, temp, lkey, jitted)
            states.append(c[0])
        return c, jnp.stack(states) if trace else None

    def to_frac(x):
        frac = jax.vmap(geometry.wrap_frac)(geometry.cart_to_frac(x, lattice), atom_mask)
        return jnp.where(atom_mask[..., None], frac, 0.0)

    carry, states = run_levels(carry, (alphas, norms, temps, level_keys, jnp.asarray(steps)))
    if cfg.restarts:
        sigmas = jnp.asarray(score.noise_levels(model.num_levels, model.sigma_min, model.sigma_max)[levels], jnp.float32)
        r0 = restart_start(model, cfg, levels)
        for r in range(cfg.restarts):
            kr = jax.random.fold_in(key, 1_000_003 + r)
            x, overflow = carry
            # Forward noise from the last level up to the restart level: the chain's accumulated error is
            # blurred at that scale and annealed again (Restart sampling).
            lift = jnp.sqrt(sigmas[r0] ** 2 - sigmas[-1] ** 2)
            x = jax.vmap(score.perturb)(x, lattice, atom_mask, jnp.broadcast_to(lift, atom_mask.shape[:1]),
                                         jax.random.normal(jax.random.fold_in(kr, 0), x.shape))
            rkeys = jax.random.split(jax.random.fold_in(kr, 1), len(levels))
            carry, _ = run_levels((x, overflow), (alphas[r0:], norms[r0:], temps[r0:], rkeys[r0:],
                                                  jnp.asarray(steps[r0:])))
    if cfg.quench_steps:
        quench = functools.partial(step, alpha=alphas[-1], norm=norms[-1], temp=0.0, lkey=level_keys[-1], quiet=True)
        if python_loop:
            for i in range(cfg.quench_steps):
                carry = quench(i, carry, step_fn=jitted)
        else:
            carry = jax.lax.fori_loop(0, cfg.quench_steps, quench, carry)
    x, overflow = carry
    if cfg.final_denoise:
        x = denoise(params, x, norm=norms[-1], scale=cfg.denoise_scale, **inputs, **settings)
    if trace:
        return to_frac(x), overflow, jax.vmap(to_frac)(states)
    return to_frac(x), overflow


class Generated(NamedTuple):
    """Generated crystals padded to ``max_atoms``: types, counts, lattices, coordinates and diagnostics."""

    atom_types: Array  # [b, max_atoms]
    num_atoms: Array  # [b]
    lengths: Array  # [b, 3]
    angles: Array  # [b, 3]
    frac_coords: Array  # [b, max_atoms, 3]
    overflow: Array  # [b] neighbour list incomplete at some step
    too_many_atoms: Array  # [b] decoded N above max_atoms (coordinates cover only the first max_atoms)


def generate(
    params: Any,
    key: Array,
    num: int,
    *,
    statics: RunStatics,
    model: ModelConfig,
    cfg: SamplerConfig,
    max_images: tuple[int, int, int] | None = None,
    prior: MixturePrior | None = None,
) -> Generated:
    """Return ``num`` generated crystals, all padded to ``max_atoms`` (jittable: ``num`` and the configs static).

    ``prior`` (an array pytree, not static) is the run's fitted mixture, used when ``cfg.prior == "fitted"``.
    One chain per crystal: ``cfg.retry_coordination`` counts neighbours on the
    host, so the retry runs in :func:`sample` (or :func:`retry_unbonded`), not here.
    """
    kz, kd, kx = jax.random.split(key, 3)
    z = sample_latents(kz, num, model, cfg, prior)
    dec = decode_crystals(params, z, kd, model=model, cfg=cfg, statics=statics)
    mask = dec.atom_types > 0
    lattice = geometry.lattice_matrix(dec.lengths, dec.angles)
    frac, overflow = langevin(params, kx, dec.atom_types, mask, lattice, z.z_pos, statics=statics, model=model,
                              cfg=cfg, max_images=max_images)
    return Generated(dec.atom_types, dec.num_atoms, dec.lengths, dec.angles, frac, overflow,
                     dec.num_atoms > model.max_atoms)


# ----------------------------------------------------------------------------
# Host-side driver with size buckets.


def bucket_sizes(max_atoms: int, multiple: int = 4) -> list[int]:
    """Return padded atom counts of the size buckets: multiples of ``multiple`` up to ``max_atoms``."""
    sizes = list(range(multiple, max_atoms, multiple)) + [max_atoms]
    return sorted(set(min(s, max_atoms) for s in sizes))


@dataclasses.dataclass
class SampleResult:
    """Host-side result of :func:`sample`: accepted crystals, rejects and timings."""

    atom_types: list[np.ndarray]
    lengths: np.ndarray
    angles: np.ndarray
    frac_coords: list[np.ndarray]
    index: np.ndarray  # sample index of each accepted crystal
    rejects: list[dict[str, Any]]
    overflow: np.ndarray  # per accepted crystal
    compile_seconds: float
    run_seconds: float
    padded_atom_share: float
    z_pos: np.ndarray | None = None  # [accepted, latent_pos] the position latent each chain was run with
    # The retry (SamplerConfig.retry_coordination): which crystals ran a second chain, which kept its result, and
    # every accepted crystal's coordinates after the first chain (None without a retry).
    retried: np.ndarray | None = None
    replaced: np.ndarray | None = None
    first_frac_coords: list[np.ndarray] | None = None
    retry_seconds: float = 0.0

    def retry_summary(self, score_epoch: int | None = None) -> dict[str, Any] | None:
        """Return what the retry did (crystals retried, replaced, its network's epoch, seconds), or None without one."""
        if self.retried is None or self.replaced is None:
            return None
        return {"retried": int(self.retried.sum()), "replaced": int(self.replaced.sum()), "score_epoch": score_epoch,
                "seconds": round(self.retry_seconds, 2)}

    def to_cdvae(self, first_pass: bool = False) -> dict[str, np.ndarray]:
        """Return the accepted crystals in CDVAE's ``samples.npz`` layout (concatenated over crystals).

        ``first_pass``: their coordinates after the first chain, before the retry replaced any.
        """
        frac = self.frac_coords
        if first_pass:
            if self.first_frac_coords is None:
                raise ValueError("these samples ran no retry: there is no first pass apart from them")
            frac = self.first_frac_coords
        num = np.array([len(t) for t in self.atom_types], np.int64)
        return {
            "num_atoms": num,
            "atom_types": np.concatenate(self.atom_types) if self.atom_types else np.zeros(0, np.int64),
            "lengths": self.lengths,
            "angles": self.angles,
            "frac_coords": np.concatenate(frac) if frac else np.zeros((0, 3)),
            "sample_index": self.index,
        }


_DECODE_CACHE: dict[Any, Any] = {}
_LANGEVIN_CACHE: dict[Any, Any] = {}


def _jitted_decode(model: ModelConfig, cfg: SamplerConfig, statics: RunStatics):
    """Return a jitted ``(params, kz, kd, num, prior) -> (Decoded, z_pos)`` for static configs."""
    key = (model, cfg, statics)
    if key not in _DECODE_CACHE:
        def run(params, kz, kd, num, prior):
            z = sample_latents(kz, num, model, cfg, prior)
            return decode_crystals(params, z, kd, model=model, cfg=cfg, statics=statics), z.z_pos
        _DECODE_CACHE[key] = jax.jit(run, static_argnums=(3,))
    return _DECODE_CACHE[key]


def _compiled_langevin(
    model: ModelConfig, cfg: SamplerConfig, statics: RunStatics, max_images: tuple[int, int, int], args: tuple
):
    """Return ``(compiled langevin for these argument shapes, seconds spent compiling now)``."""
    # The retry and relaxation act on the host after the chain: a sampler with and one without them share the program.
    cfg = cfg.host_only()
    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args))
    key = (model, cfg, statics, max_images, shapes)
    if key in _LANGEVIN_CACHE:
        return _LANGEVIN_CACHE[key], 0.0
    t0 = time.perf_counter()
    fn = jax.jit(functools.partial(langevin, statics=statics, model=model, cfg=cfg, max_images=max_images))
    _LANGEVIN_CACHE[key] = fn.lower(*args).compile()
    return _LANGEVIN_CACHE[key], time.perf_counter() - t0


def sample(
    params: Any,
    key: Array,
    num: int,
    *,
    statics: RunStatics,
    model: ModelConfig,
    cfg: SamplerConfig,
    batch_size: int = 256,
    bucket_multiple: int = 4,
    progress: bool = True,
    prior: MixturePrior | None = None,
    retry_params: Any | None = None,
) -> SampleResult:
    """Return ``num`` crystals sampled in size buckets and chunks of ``batch_size``; rejects are listed, never dropped.

    The same ``key`` gives the same crystals. Crystals are grouped by atom
    count into buckets (multiples of ``bucket_multiple``) and padded only to
    their bucket; a bucket's chunks are padded to one shape so each bucket
    compiles once. Compile and run times are reported separately. With
    ``cfg.retry_coordination``, :func:`retry_unbonded` follows with
    ``retry_params`` (default: ``params``).
    """
    result = decode_samples(params, key, num, statics=statics, model=model, cfg=cfg, batch_size=batch_size, prior=prior)
    kx = jax.random.split(key, 3)[2]
    chains = _run_chains(params, kx, result, np.arange(len(result.atom_types)), statics=statics, model=model, cfg=cfg,
                         batch_size=batch_size, bucket_multiple=bucket_multiple, progress=progress, desc="sampling")
    result = dataclasses.replace(result, frac_coords=chains.frac_coords, overflow=chains.overflow,
                                 compile_seconds=chains.compile_seconds, run_seconds=chains.run_seconds,
                                 padded_atom_share=chains.padded_atom_share)
    if cfg.retry_coordination is not None:
        result = retry_unbonded(params if retry_params is None else retry_params, jax.random.fold_in(key, 1), result,
                                statics=statics, model=model, cfg=cfg, batch_size=batch_size,
                                bucket_multiple=bucket_multiple, progress=progress)
    return result


def decode_samples(
    params: Any,
    key: Array,
    num: int,
    *,
    statics: RunStatics,
    model: ModelConfig,
    cfg: SamplerConfig,
    batch_size: int = 256,
    prior: MixturePrior | None = None,
) -> SampleResult:
    """Return :func:`sample`'s decoded crystals for the same arguments: types, cells, latents and rejects, no coordinates yet."""
    # A setting the run cannot sample is refused before any work, whatever the decoded crystals turn out to be.
    levels = level_schedule(model, cfg, np.asarray(statics.score_norm))[0]
    level_steps(model, cfg, levels)
    restart_start(model, cfg, levels)
    kz, kd, _ = jax.random.split(key, 3)
    decode = _jitted_decode(model, cfg, statics)
    parts = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        dec, z_pos = decode(params, jax.random.fold_in(kz, start), jax.random.fold_in(kd, start), b, prior)
        parts.append([np.asarray(x) for x in (dec.atom_types, dec.num_atoms, dec.lengths, dec.angles, z_pos)])
    types, n, lengths, angles, z_pos = (np.concatenate(p) for p in zip(*parts))

    rejects: list[dict[str, Any]] = []
    ok = np.ones(num, bool)
    for i in range(num):
        reason = _reject_reason(int(n[i]), lengths[i], angles[i], model.max_atoms)
        if reason is not None:
            ok[i] = False
            rejects.append({"index": i, "reason": reason, "num_atoms": int(n[i]),
                            "lengths": lengths[i].tolist(), "angles": angles[i].tolist()})
    accepted = np.flatnonzero(ok)
    return SampleResult(
        atom_types=[types[i, : n[i]].astype(np.int64) for i in accepted],
        lengths=lengths[accepted],
        angles=angles[accepted],
        frac_coords=[],
        index=accepted,
        rejects=rejects,
        overflow=np.zeros(len(accepted), bool),
        compile_seconds=0.0,
        run_seconds=0.0,
        padded_atom_share=0.0,
        z_pos=z_pos[accepted],
    )


class _Chains(NamedTuple):
    """Coordinates after the chain of every accepted crystal that ran (others empty), overflow flags and timings."""

    frac_coords: list[np.ndarray]
    overflow: np.ndarray
    compile_seconds: float
    run_seconds: float
    padded_atom_share: float


def _run_chains(params: Any, key: Array, result: SampleResult, rows: np.ndarray, *, statics: RunStatics,
                model: ModelConfig, cfg: SamplerConfig, batch_size: int, bucket_multiple: int, progress: bool,
                desc: str) -> _Chains:
    """Return the Langevin chains of ``result``'s crystals ``rows`` (accepted-crystal positions), run in size buckets."""
    count = len(result.atom_types)
    n = np.array([len(t) for t in result.atom_types], np.int64)
    sizes = bucket_sizes(model.max_atoms, bucket_multiple)
    bucket_of = np.searchsorted(sizes, n)  # smallest bucket holding n atoms
    chosen = np.zeros(count, bool)
    chosen[rows] = True
    types = np.zeros((count, model.max_atoms), np.int64)
    for i, t in enumerate(result.atom_types):
        types[i, : len(t)] = t
    lattices = np.zeros((count, 3, 3))
    for i in rows:
        lattices[i] = np.asarray(geometry.lattice_matrix(result.lengths[i], result.angles[i]))
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
                jax.random.fold_in(key, int(result.index[idx[0]])),  # the chunk's first sample index
                jnp.asarray(types[sel, :size]),
                jnp.asarray(types[sel, :size] > 0),
                jnp.asarray(lattices[sel], jnp.float32),
                jnp.asarray(result.z_pos[sel]),
            )
            fn, seconds = _compiled_langevin(model, cfg, statics, images, args)
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
    return _Chains(frac_out, overflow, compile_s, run_s, 1.0 - real_atoms / max(padded_atoms, 1))


# The retry's rule, on the host; kept under this name for callers of earlier sessions.
coordination_in_range = geometry.coordination_in_range


def retry_unbonded(
    params: Any,
    key: Array,
    result: SampleResult,
    *,
    statics: RunStatics,
    model: ModelConfig,
    cfg: SamplerConfig,
    batch_size: int = 256,
    bucket_multiple: int = 4,
    progress: bool = True,
) -> SampleResult:
    """Return ``result`` after a second chain (with ``params``) for its crystals with atoms outside ``cfg.retry_coordination``.

    Same latent, same cell, new noise; a crystal keeps the second chain's
    coordinates when more of its atoms have a neighbour count in range
    (``cfg.retry_cutoff``). ``result`` needs its ``z_pos``; the returned copy
    records ``retried``, ``replaced`` and the first chain's coordinates.
    """
    if cfg.retry_coordination is None:
        raise ValueError("cfg.retry_coordination is None: no coordination to retry for")
    if result.z_pos is None or len(result.z_pos) != len(result.atom_types):
        raise ValueError("retry_unbonded needs the position latent of every accepted crystal (SampleResult.z_pos)")
    low, high = cfg.retry_coordination
    in_range = lambda i, frac: coordination_in_range(frac, result.lengths[i], result.angles[i],  # noqa: E731
                                                     cfg.retry_cutoff, low, high)
    first = np.array([in_range(i, f) for i, f in enumerate(result.frac_coords)])
    rows = np.flatnonzero(first < 1.0)
    t0 = time.perf_counter()
    chains = _run_chains(params, key, result, rows, statics=statics, model=model, cfg=cfg, batch_size=batch_size,
                         bucket_multiple=bucket_multiple, progress=progress, desc="retry")
    retried = np.zeros(len(first), bool)
    retried[rows] = True
    replaced = np.zeros(len(first), bool)
    replaced[rows] = [in_range(i, chains.frac_coords[i]) > first[i] for i in rows]  # only the retried need counting
    return dataclasses.replace(
        result,
        frac_coords=[chains.frac_coords[i] if replaced[i] else f for i, f in enumerate(result.frac_coords)],
        overflow=np.where(replaced, chains.overflow, result.overflow),
        compile_seconds=result.compile_seconds + chains.compile_seconds,
        run_seconds=result.run_seconds + chains.run_seconds,
        retried=retried,
        replaced=replaced,
        first_frac_coords=list(result.frac_coords),
        retry_seconds=time.perf_counter() - t0,
    )


def _reject_reason(n: int, lengths: np.ndarray, angles: np.ndarray, max_atoms: int) -> str | None:
    """Return why a decoded crystal cannot be sampled, or None."""
    if n > max_atoms:
        return f"{n} atoms, more than the padding limit max_atoms={max_atoms}"
    if n < 1:
        return "no atoms"
    return geometry.cell_defect(lengths, angles, n)
