"""The sampler's stages: crystals in, crystals out, plus a record; a preset runs its stages in order.

* :class:`Chain`: the compiled Langevin chain for every crystal (coordinates from noise);
* :class:`Retry`: a second chain for the crystals with atoms outside a
  coordination rule, kept where more atoms satisfy it;
* :class:`Relax`: FIRE in Tersoff's carbon potential, kept where trusted
  (and, with a guard, where no atom leaves the rule);
* :class:`Hop`: basin hopping for the crystals above an energy, kept where lower.

Every stage keeps its proposals by one rule, :func:`symat_jax.coordination.keep_proposals`.
Stages pass :class:`Samples` in memory: no stage reads a file another wrote.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol

import jax
import numpy as np

from symat_jax import relax
from symat_jax.configs import ChainConfig, HopConfig, ModelConfig, RelaxConfig, RetryConfig, StageConfig
from symat_jax.coordination import keep_proposals, rule_shares
from symat_jax.crystals import CrystalSet
from symat_jax.sampling.driver import run_chains
from symat_jax.statics import RunStatics

Array = jax.Array

# Files beside samples.npz: the crystals as the first chain left them (with a retry), as they came into the
# relaxation, and the relaxation's per-crystal record.
FIRST_PASS_FILE = "first_pass.npz"
UNRELAXED_FILE = "unrelaxed.npz"
RELAX_FILE = "relax.npz"


@dataclasses.dataclass(frozen=True)
class Samples:
    """Accepted crystals of a request as they stand after the stages so far, and what each stage recorded.

    ``crystals``: types, cells and current coordinates (``num_rejected``
    counts the rejects); ``index``: each crystal's sample index; ``z_pos``:
    the position latent its chains ran with; ``overflow``: a neighbour list
    of its kept chain was incomplete; ``rejects``: decoded crystals that could
    not be sampled. ``first_pass``: the crystals as the first chain left them
    (set by a retry); ``unrelaxed``: as they came into the relaxation.
    ``records``: per stage name, JSON-ready numbers; ``arrays``: per stage
    name, per-crystal arrays (``relax``: the relaxation's record).
    """

    crystals: CrystalSet
    index: np.ndarray
    z_pos: np.ndarray
    overflow: np.ndarray
    rejects: list[dict[str, Any]]
    first_pass: CrystalSet | None = None
    unrelaxed: CrystalSet | None = None
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    arrays: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        """Return the number of accepted crystals."""
        return len(self.crystals)

    def cdvae(self, which: str = "crystals") -> dict[str, np.ndarray]:
        """Return ``crystals`` (or ``first_pass``, ``unrelaxed``) in CDVAE's ``samples.npz`` layout, with each ``sample_index``."""
        c = getattr(self, which)
        if c is None:
            raise ValueError(f"these samples hold no {which} crystals (no stage made them)")
        return {"num_atoms": c.num_atoms, "atom_types": c.atom_types, "lengths": c.lengths, "angles": c.angles,
                "frac_coords": c.frac_coords, "sample_index": self.index}

    def npz_files(self) -> dict[str, dict[str, np.ndarray]]:
        """Return the arrays of every ``.npz`` file ``symat sample`` writes for these samples, by file name."""
        files = {"samples.npz": self.cdvae()}
        for which, name in (("first_pass", FIRST_PASS_FILE), ("unrelaxed", UNRELAXED_FILE)):
            if getattr(self, which) is not None:
                files[name] = self.cdvae(which)
        if "relax" in self.arrays:
            files[RELAX_FILE] = self.arrays["relax"]
        return files

    def recorded(self, stage: str, record: dict[str, Any], **changes: Any) -> "Samples":
        """Return a copy with ``changes`` applied and ``record`` stored under ``stage``."""
        return dataclasses.replace(self, records={**self.records, stage: record}, **changes)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every stage may use: the run's model, statics and parameters (per stage), the request's key and seed, batching."""

    model: ModelConfig
    statics: RunStatics
    params: Any
    key: Array
    seed: int
    batch_size: int = 256
    bucket_multiple: int = 4
    progress: bool = True
    stage_params: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. "retry": another epoch's network


class Stage(Protocol):
    """A sampler stage: ``stage(samples, context) -> samples`` with its record added under ``stage.name``."""

    name: str

    def __call__(self, samples: Samples, ctx: Context) -> Samples:
        """Return the samples after this stage."""
        ...


def _with_coords(crystals: CrystalSet, frac: list[np.ndarray] | np.ndarray) -> CrystalSet:
    """Return ``crystals`` with new coordinates (per crystal or concatenated)."""
    coords = np.concatenate(frac) if isinstance(frac, list) and frac else frac
    if isinstance(coords, list):  # no crystals
        coords = np.zeros((0, 3), crystals.frac_coords.dtype)
    return dataclasses.replace(crystals, frac_coords=coords)


@dataclasses.dataclass(frozen=True)
class Chain:
    """The compiled annealed-Langevin chain for every crystal, from uniform positions (the model's own coordinates)."""

    cfg: ChainConfig
    name: str = "chain"

    def __call__(self, samples: Samples, ctx: Context) -> Samples:
        """Return the samples with the chain's coordinates and overflow flags."""
        kx = jax.random.split(ctx.key, 3)[2]
        out = run_chains(ctx.params, kx, samples.crystals, samples.index, samples.z_pos, np.arange(len(samples)),
                         chain=self.cfg, model=ctx.model, statics=ctx.statics, batch_size=ctx.batch_size,
                         bucket_multiple=ctx.bucket_multiple, progress=ctx.progress, desc="sampling")
        record = {"compile_seconds": out.compile_seconds, "run_seconds": out.run_seconds,
                  "padded_atom_share": out.padded_atom_share, "neighbor_overflow": int(out.overflow.sum())}
        return samples.recorded(self.name, record, crystals=_with_coords(samples.crystals, out.frac_coords),
                                overflow=out.overflow)


@dataclasses.dataclass(frozen=True)
class Retry:
    """A second chain (the retry's network: ``Context.stage_params["retry"]``) for crystals with atoms outside the rule."""

    cfg: RetryConfig
    chain: ChainConfig
    name: str = "retry"

    def __call__(self, samples: Samples, ctx: Context) -> Samples:
        """Return the samples with the better of the two chains per retried crystal; ``first_pass`` keeps the first."""
        t0 = time.perf_counter()
        first = samples.crystals
        shares = rule_shares(self.cfg.rule, first)
        rows = np.flatnonzero(shares < 1.0)
        params = ctx.stage_params.get(self.name, ctx.params)
        out = run_chains(params, jax.random.fold_in(ctx.key, 1), first, samples.index, samples.z_pos, rows,
                         chain=self.chain, model=ctx.model, statics=ctx.statics, batch_size=ctx.batch_size,
                         bucket_multiple=ctx.bucket_multiple, progress=ctx.progress, desc="retry")
        retried = np.zeros(len(first), bool)
        retried[rows] = True
        second = _with_coords(first.subset(rows), [out.frac_coords[i] for i in rows])
        replaced = np.zeros(len(first), bool)
        replaced[rows] = keep_proposals(np.ones(len(rows), bool), self.cfg.rule, first.subset(rows), second,
                                        strict=True, before_shares=shares[rows])
        frac = [out.frac_coords[i] if replaced[i] else first.crystal(i)[3] for i in range(len(first))]
        record = {"retried": int(retried.sum()), "replaced": int(replaced.sum()),
                  "compile_seconds": out.compile_seconds, "run_seconds": out.run_seconds,
                  "seconds": time.perf_counter() - t0}
        return dataclasses.replace(
            samples.recorded(self.name, record, crystals=_with_coords(first, frac), first_pass=first,
                             overflow=np.where(replaced, out.overflow, samples.overflow)),
            arrays={**samples.arrays, self.name: {"retried": retried, "replaced": replaced}})


def _relax_record(result: relax.Relaxed) -> dict[str, np.ndarray]:
    """Return the per-crystal arrays of a relaxation (``relax.npz``)."""
    return dict(energy_per_atom=result.energy_per_atom, fmax=result.fmax, steps=result.steps,
                converged=result.converged, kept=result.kept, reverted=result.reverted, hops=result.hops)


def _relax_summary(result: relax.Relaxed) -> dict[str, Any]:
    """Return the JSON-ready counts of a relaxation (and its hops)."""
    energy = result.energy_per_atom[result.kept]
    n = len(result.kept)
    return {"num_crystals": n, "num_kept": int(result.kept.sum()), "num_converged": int(result.converged.sum()),
            "num_reverted": int(result.reverted.sum()), "num_hopped": int((result.hops > 0).sum()),
            "median_steps": float(np.median(result.steps)) if n else None,
            "energy_per_atom_quantiles": np.quantile(energy, [0.05, 0.5, 0.95]).round(4).tolist() if energy.size else []}


def _as_float64(crystals: CrystalSet) -> CrystalSet:
    """Return ``crystals`` with int64 types and float64 coordinates and cells (the relaxation works in double precision)."""
    return CrystalSet(crystals.num_atoms.astype(np.int64), crystals.atom_types.astype(np.int64),
                      crystals.frac_coords.astype(float), crystals.lengths.astype(float),
                      crystals.angles.astype(float), crystals.num_rejected)


@dataclasses.dataclass(frozen=True)
class Relax:
    """FIRE in Tersoff's carbon potential; a crystal keeps its relaxation where trusted and, with a guard, no worse bonded.

    ``strict``: refuse a set with no pure-carbon crystal (``symat relax``);
    otherwise such crystals stay as sampled, with a warning.
    """

    cfg: RelaxConfig
    strict: bool = False
    name: str = "relax"

    def __call__(self, samples: Samples, ctx: Context) -> Samples:
        """Return the samples relaxed; ``unrelaxed`` keeps them as they came."""
        if not len(samples):  # every crystal rejected: nothing to relax
            return samples.recorded(self.name, {"config": dataclasses.asdict(self.cfg), "num_crystals": 0})
        t0 = time.perf_counter()
        start = _as_float64(samples.crystals)
        result = relax.relax_once(start, self.cfg, relax.carbon_rows(start, self.strict), ctx.batch_size,
                                  ctx.progress, "relax")
        keep = keep_proposals(result.kept, self.cfg.guard, start, result.crystals)
        reverted = result.kept & ~keep
        if reverted.any():
            rows = np.repeat(reverted, start.num_atoms)
            c = result.crystals
            frac = np.where(rows[:, None], start.frac_coords, c.frac_coords)
            lengths = np.where(reverted[:, None], start.lengths, c.lengths)
            angles = np.where(reverted[:, None], start.angles, c.angles)
            result = result._replace(crystals=CrystalSet(c.num_atoms, c.atom_types, frac, lengths, angles,
                                                         c.num_rejected),
                                     energy_per_atom=np.where(keep, result.energy_per_atom, np.nan),
                                     converged=result.converged & keep, kept=keep, reverted=reverted)
        record = {"config": dataclasses.asdict(self.cfg), "potential": "Tersoff 1988 carbon (Phys. Rev. Lett. 61, 2879)",
                  **_relax_summary(result), "seconds": time.perf_counter() - t0}
        return dataclasses.replace(samples.recorded(self.name, record, crystals=result.crystals,
                                                    unrelaxed=samples.crystals),
                                   arrays={**samples.arrays, self.name: _relax_record(result)})


@dataclasses.dataclass(frozen=True)
class Hop:
    """Basin hopping after :class:`Relax`: crystals above ``cfg.above`` eV/atom rattled and relaxed again, kept where lower.

    The trials relax with ``relax_cfg`` (the preset's relaxation, without its
    guard: each trial is judged against where it started, by ``cfg.guard``);
    the displacements come from ``numpy``'s generator seeded with the request's seed.
    """

    cfg: HopConfig
    relax_cfg: RelaxConfig
    name: str = "hop"

    def __call__(self, samples: Samples, ctx: Context) -> Samples:
        """Return the samples after ``cfg.rounds`` rounds; the relaxation's record counts each crystal's accepted hops."""
        if "relax" not in samples.arrays:
            if not len(samples):
                return samples.recorded(self.name, {"config": dataclasses.asdict(self.cfg), "num_crystals": 0})
            raise ValueError("basin hopping needs a relaxation before it (a Relax stage)")
        t0 = time.perf_counter()
        rec = samples.arrays["relax"]
        current = relax.Relaxed(samples.crystals, rec["energy_per_atom"], rec["fmax"], rec["steps"], rec["converged"],
                                rec["kept"], rec["reverted"], rec["hops"])
        rng = np.random.default_rng(ctx.seed)
        trial_cfg = dataclasses.replace(self.relax_cfg, guard=None)
        for k in range(self.cfg.rounds):
            current = self._round(current, trial_cfg, rng, ctx, f"hop {k + 1}/{self.cfg.rounds}")
        record = {"config": dataclasses.asdict(self.cfg), "seed": ctx.seed, **_relax_summary(current),
                  "seconds": time.perf_counter() - t0}
        relax_record = {**samples.records.get("relax", {}), **_relax_summary(current)}
        out = samples.recorded(self.name, record, crystals=current.crystals)
        return dataclasses.replace(out, records={**out.records, "relax": relax_record},
                                   arrays={**samples.arrays, "relax": _relax_record(current)})

    def _round(self, current: relax.Relaxed, trial_cfg: RelaxConfig, rng: np.random.Generator, ctx: Context,
               desc: str) -> relax.Relaxed:
        """Return ``current`` after one round: its kept crystals above the threshold rattled, relaxed, kept where lower."""
        rows = np.flatnonzero(current.kept & (current.energy_per_atom > self.cfg.above))
        if not len(rows):
            return current
        start = current.crystals.subset(rows)
        trial = relax.relax_once(relax.rattle(start, self.cfg.sigma, rng), trial_cfg, np.ones(len(rows), bool),
                                 ctx.batch_size, ctx.progress, desc)
        lower = trial.kept & (trial.energy_per_atom < current.energy_per_atom[rows])
        better = keep_proposals(lower, self.cfg.guard, start, trial.crystals)
        take = rows[better]
        cs = current.crystals
        frac = cs.frac_coords.copy()
        frac[np.repeat(np.isin(np.arange(len(cs)), take), cs.num_atoms)] = \
            trial.crystals.frac_coords[np.repeat(better, trial.crystals.num_atoms)]
        lengths, angles = cs.lengths.copy(), cs.angles.copy()
        lengths[take], angles[take] = trial.crystals.lengths[better], trial.crystals.angles[better]
        fields = {}
        for name in ("energy_per_atom", "fmax", "steps", "converged"):
            value = getattr(current, name).copy()
            value[take] = getattr(trial, name)[better]
            fields[name] = value
        hops = current.hops.copy()
        hops[take] += 1
        return current._replace(crystals=CrystalSet(cs.num_atoms, cs.atom_types, frac, lengths, angles,
                                                    cs.num_rejected), hops=hops, **fields)


def build_stages(stages: tuple[StageConfig, ...], strict_relax: bool = False) -> list[Stage]:
    """Return the stages of a preset's configs, in order (a retry reruns the preset's chain; hops relax as its relaxation)."""
    chain = next((s for s in stages if isinstance(s, ChainConfig)), None)
    relax_cfg = next((s for s in stages if isinstance(s, RelaxConfig)), None)
    out: list[Stage] = []
    for cfg in stages:
        if isinstance(cfg, ChainConfig):
            out.append(Chain(cfg))
        elif isinstance(cfg, RetryConfig):
            if chain is None:
                raise ValueError("a retry reruns the chain: the stages need a ChainConfig")
            out.append(Retry(cfg, chain))
        elif isinstance(cfg, RelaxConfig):
            out.append(Relax(cfg, strict=strict_relax))
        elif isinstance(cfg, HopConfig):
            if relax_cfg is None:
                raise ValueError("basin hopping needs a relaxation (a RelaxConfig) before it")
            out.append(Hop(cfg, relax_cfg))
        else:
            raise ValueError(f"not a stage config: {cfg!r}")
    return out


def relax_crystals(crystals: CrystalSet, cfg: RelaxConfig = RelaxConfig(), hops: HopConfig | None = None, *,
                   seed: int = 0, batch_size: int = 256, progress: bool = True, strict: bool = True) -> Samples:
    """Return ``crystals`` after the :class:`Relax` stage (and the :class:`Hop` stage with ``hops``), as :class:`Samples`.

    The entry point of ``symat relax`` and of studies that relax crystals
    they did not sample; ``samples.arrays["relax"]`` holds the record.
    """
    samples = Samples(crystals, np.arange(len(crystals)), np.zeros((len(crystals), 0)), np.zeros(len(crystals), bool),
                      [])
    ctx = Context(model=None, statics=None, params=None, key=None, seed=seed, batch_size=batch_size,  # type: ignore[arg-type]
                  progress=progress)
    for stage in build_stages((cfg,) + ((hops,) if hops else ()), strict_relax=strict):
        samples = stage(samples, ctx)
    return samples
