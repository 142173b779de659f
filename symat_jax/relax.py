"""Force-field relaxation of generated carbon crystals: Tersoff's bond-order potential and FIRE, in JAX.

Generated crystals leave the chain with bonds of the right topology but with
positions about 0.1 A off (BENCHMARKS.md, session 7), and CDVAE's structure
fingerprint needs them to about 0.05 A. A chemist relaxes such candidates in a
force field before judging them; this module does that for carbon with
Tersoff's 1988 potential (Phys. Rev. Lett. 61, 2879: diamond 3.566 A,
-7.37 eV/atom), at fixed cell or under a pressure with the cell free
(Carbon-24 was relaxed at 10 GPa). A relaxation is a separate stage after
sampling: what was sampled is kept beside what was relaxed.

Every array function works on one padded crystal (``vmap`` for a batch);
:func:`relax_crystals` is the host-side entry point on a :class:`CrystalSet`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from symat_jax import geometry, neighbors
from symat_jax.crystal_sets import CrystalSet

Array = jax.Array
log = logging.getLogger(__name__)

GPA_IN_EV_PER_A3 = 1.0 / 160.21766208  # 1 GPa in eV / A^3


class TersoffParams(NamedTuple):
    """One element's Tersoff parameters (LAMMPS "metal" units: eV, A): pair terms A, B, lam1, lam2; bond order beta, n, c, d, h; cut-off R +- D."""

    A: float
    B: float
    lam1: float
    lam2: float
    beta: float
    n: float
    c: float
    d: float
    h: float
    R: float
    D: float


# Tersoff, Phys. Rev. Lett. 61, 2879 (1988); cut-off 1.8-2.1 A.
CARBON = TersoffParams(A=1393.6, B=346.74, lam1=3.4879, lam2=2.2119, beta=1.5724e-7, n=0.72751,
                       c=38049.0, d=4.3484, h=-0.57058, R=1.95, D=0.15)
CARBON_Z = 6
CARBON_DATASETS = ("carbon_24",)  # datasets whose crystals hold carbon only
# Basin hopping's threshold (eV/atom): 95% of 300 Carbon-24 training crystals relax (fixed cell, this potential)
# below it (median -6.92, 99% -6.29); half the generated crystals relax above it (BENCHMARKS.md, session 15).
HOP_ABOVE = -6.37


@dataclasses.dataclass(frozen=True)
class RelaxConfig:
    """How to relax: FIRE steps, the force (eV/A) at which a crystal counts as relaxed, the cell, the pressure (GPa).

    ``cell``: ``"fixed"`` keeps each generated lattice (positions only);
    ``"free"`` relaxes the lattice too, at ``pressure`` (Carbon-24's crystals
    were relaxed at 10 GPa). ``max_step`` (A) caps any atom's move per step.
    ``keep_coordination = (low, high)``: a relaxed crystal replaces the
    sampled one only when at least as many of its atoms have ``low`` to
    ``high`` neighbours within ``bond_cutoff`` (A) as before (the retry's rule:
    Tersoff's potential cuts bonds off at 1.8-2.1 A and may break stretched
    ones); None keeps every trusted relaxation.

    ``hops`` rounds of basin hopping follow (the step that makes AIRSS-style
    searches find low-energy carbon): each crystal whose relaxed energy per
    atom lies above ``hop_above`` (eV) has every atom moved by Gaussian noise
    of ``hop_sigma`` (A) and is relaxed again; the new crystal replaces it
    when its energy is lower (and, with ``keep_coordination``, no fewer atoms
    are in range).
    """

    steps: int = 1000
    fmax: float = 0.01
    cell: str = "fixed"
    pressure: float = 0.0
    max_step: float = 0.1
    max_neighbors: int = 16
    keep_coordination: tuple[int, int] | None = None
    bond_cutoff: float = 1.8
    hops: int = 0
    hop_sigma: float = 0.3
    hop_above: float = HOP_ABOVE

    def __post_init__(self) -> None:
        """Refuse settings that cannot describe a relaxation."""
        if self.keep_coordination is not None:
            low, high = (int(v) for v in self.keep_coordination)
            if not 0 <= low <= high or not self.bond_cutoff > 0:
                raise ValueError(f"keep_coordination must be (low, high) with 0 <= low <= high and bond_cutoff > 0, "
                                 f"got {self.keep_coordination!r}, {self.bond_cutoff!r}")
            object.__setattr__(self, "keep_coordination", (low, high))
        if self.cell not in ("fixed", "free"):
            raise ValueError(f"cell must be 'fixed' or 'free', got {self.cell!r}")
        if self.steps < 1 or not self.fmax > 0 or not self.max_step > 0 or self.max_neighbors < 1:
            raise ValueError(f"steps, fmax, max_step and max_neighbors must be positive, got {self}")
        if self.hops < 0 or not self.hop_sigma > 0 or not math.isfinite(self.hop_above):
            raise ValueError(f"hops must be >= 0, hop_sigma positive and hop_above finite, got {self}")
        if not math.isfinite(self.pressure):
            raise ValueError(f"pressure must be finite, got {self.pressure}")
        if self.cell == "fixed" and self.pressure != 0:
            raise ValueError("a pressure acts only on a free cell: use cell='free' with it")


def _cutoff_fn(r: Array, p: TersoffParams) -> Array:
    """Return Tersoff's smooth cut-off f_C(r): 1 below R - D, 0 beyond R + D."""
    x = jnp.clip((r - p.R) / p.D, -1.0, 1.0)
    return 0.5 - 0.5 * jnp.sin(0.5 * jnp.pi * x)


def _angle_fn(cos: Array, p: TersoffParams) -> Array:
    """Return g(theta) = 1 + c^2/d^2 - c^2/(d^2 + (cos - h)^2), written without the cancelling large terms."""
    x = (cos - p.h) ** 2
    return 1.0 + p.c**2 * x / (p.d**2 * (p.d**2 + x))


def tersoff_energy(positions: Array, lattice: Array, atom_mask: Array, *, max_images: tuple[int, int, int],
                   params: TersoffParams = CARBON, max_neighbors: int = 16) -> tuple[Array, Array]:
    """Return ``(energy in eV, overflow)`` of one padded periodic crystal under Tersoff's potential.

    ``overflow`` is True when an atom has more than ``max_neighbors``
    neighbours within R + D or the image range is too small: the energy then
    misses terms and the caller must not trust it.
    """
    p = params
    nl = neighbors.periodic_neighbors(positions, lattice, atom_mask, cutoff=p.R + p.D,
                                      max_neighbors=max_neighbors, max_images=max_images)
    mask = nl.mask
    r = jnp.where(mask, nl.distances, 1.0)
    fc = jnp.where(mask, _cutoff_fn(r, p), 0.0)  # [n, k]
    unit = nl.vectors / r[..., None]
    cos = jnp.einsum("nkx,nlx->nkl", unit, unit)  # angle j-i-k between slots k (j) and l (k)
    k = mask.shape[-1]
    others = mask[:, None, :] & ~jnp.eye(k, dtype=bool)[None]
    zeta = jnp.sum(jnp.where(others, fc[:, None, :] * _angle_fn(cos, p), 0.0), axis=-1)  # [n, k]
    # (beta zeta)^n has an infinite slope at zeta = 0 (n < 1); an atom with one neighbour has zeta = 0.
    bz = p.beta * zeta
    safe = jnp.where(bz > 0, bz, 1.0)
    term = jnp.where(bz > 0, safe ** p.n, 0.0)
    bond_order = (1.0 + term) ** (-0.5 / p.n)
    pair = fc * (p.A * jnp.exp(-p.lam1 * r) - bond_order * p.B * jnp.exp(-p.lam2 * r))
    return 0.5 * jnp.sum(jnp.where(mask, pair, 0.0)), nl.overflow


class FireState(NamedTuple):
    """FIRE's state for one crystal: positions in the starting cell's frame, cell strain, their velocities, step, mixing, counter."""

    u: Array
    strain: Array
    vu: Array
    vs: Array
    dt: Array
    alpha: Array
    since_negative: Array


class RelaxTrace(NamedTuple):
    """What a relaxation ends with per crystal: positions, lattice, energy (eV), largest residual force (eV/A), steps, overflow."""

    positions: Array
    lattice: Array
    energy: Array
    fmax: Array
    steps: Array
    overflow: Array


# FIRE (Bitzek et al., Phys. Rev. Lett. 97, 170201 (2006)), with its published defaults.
_DT0, _DT_MAX, _N_MIN, _F_INC, _F_DEC, _ALPHA0, _F_ALPHA = 0.1, 1.0, 5, 1.1, 0.5, 0.1, 0.99


def relax_one(positions: Array, lattice: Array, atom_mask: Array, *, cfg: RelaxConfig,
              max_images: tuple[int, int, int], params: TersoffParams = CARBON) -> RelaxTrace:
    """Return the relaxed crystal: FIRE on the enthalpy E + P V, positions only or positions and cell (``cfg.cell``)."""
    n_atoms = jnp.maximum(jnp.sum(atom_mask), 1).astype(positions.dtype)
    free = cfg.cell == "free"
    pressure = cfg.pressure * GPA_IN_EV_PER_A3
    eye = jnp.eye(3, dtype=positions.dtype)
    m = atom_mask[:, None]

    def deform(u: Array, strain: Array) -> tuple[Array, Array]:
        # Strain is scaled by the atom count (ASE's cell filter does the same) so that
        # the cell's forces are comparable with an atom's.
        f = eye + strain / n_atoms
        return u @ f, lattice @ f

    def enthalpy(u: Array, strain: Array) -> tuple[Array, Array]:
        x, lat = deform(u, strain)
        e, overflow = tersoff_energy(x, lat, atom_mask, max_images=max_images, params=params,
                                     max_neighbors=cfg.max_neighbors)
        return e + pressure * jnp.abs(jnp.linalg.det(lat)), (e, overflow)

    grad = jax.grad(enthalpy, argnums=(0, 1), has_aux=True)

    def forces(state: FireState) -> tuple[Array, Array, Array, Array]:
        (gu, gs), (e, overflow) = grad(state.u, state.strain)
        fu = jnp.where(m, -gu, 0.0)
        # A symmetric strain: rotations of the cell change nothing and must not drift.
        fs = -0.5 * (gs + gs.T) if free else jnp.zeros_like(gs)
        return fu, fs, e, overflow

    def residual(fu: Array, fs: Array) -> Array:
        return jnp.maximum(jnp.max(jnp.linalg.norm(fu, axis=-1)), jnp.max(jnp.abs(fs)))

    def step(carry):
        state, fu, fs, taken = carry
        # Velocity Verlet with unit masses, mixed towards the force (FIRE).
        vu = state.vu + state.dt * fu
        vs = state.vs + state.dt * fs
        power = jnp.sum(fu * vu) + jnp.sum(fs * vs)
        fnorm = jnp.sqrt(jnp.sum(fu**2) + jnp.sum(fs**2))
        vnorm = jnp.sqrt(jnp.sum(vu**2) + jnp.sum(vs**2))
        scale = state.alpha * vnorm / jnp.maximum(fnorm, 1e-12)
        vu = (1 - state.alpha) * vu + scale * fu
        vs = (1 - state.alpha) * vs + scale * fs
        uphill = power <= 0
        grow = (~uphill) & (state.since_negative > _N_MIN)
        dt = jnp.where(uphill, state.dt * _F_DEC, jnp.where(grow, jnp.minimum(state.dt * _F_INC, _DT_MAX), state.dt))
        alpha = jnp.where(uphill, _ALPHA0, jnp.where(grow, state.alpha * _F_ALPHA, state.alpha))
        since = jnp.where(uphill, 0, state.since_negative + 1)
        vu = jnp.where(uphill, 0.0, vu)
        vs = jnp.where(uphill, 0.0, vs)
        du = dt * vu
        ds = dt * vs
        # No atom (and no strain component, in the same units) moves more than max_step per step.
        longest = jnp.maximum(jnp.max(jnp.linalg.norm(du, axis=-1)), jnp.max(jnp.abs(ds)))
        shrink = jnp.minimum(1.0, cfg.max_step / jnp.maximum(longest, 1e-12))
        new = FireState(state.u + jnp.where(m, du * shrink, 0.0), state.strain + ds * shrink, vu, vs, dt, alpha, since)
        nfu, nfs, _, _ = forces(new)
        return new, nfu, nfs, taken + 1

    def running(carry) -> Array:
        # Under vmap the loop runs until the slowest crystal of the batch is done; the others stay put.
        _, fu, fs, taken = carry
        return (taken < cfg.steps) & (residual(fu, fs) >= cfg.fmax)

    zeros_s = jnp.zeros((3, 3), positions.dtype)
    state = FireState(jnp.where(m, positions, 0.0), zeros_s, jnp.zeros_like(positions), zeros_s,
                      jnp.asarray(_DT0, positions.dtype), jnp.asarray(_ALPHA0, positions.dtype), jnp.asarray(0))
    fu, fs, _, _ = forces(state)
    state, fu, fs, taken = jax.lax.while_loop(running, step, (state, fu, fs, jnp.asarray(0)))
    x, lat = deform(state.u, state.strain)
    energy, overflow = tersoff_energy(x, lat, atom_mask, max_images=max_images, params=params,
                                      max_neighbors=cfg.max_neighbors)
    return RelaxTrace(x, lat, energy, residual(fu, fs), taken, overflow)


@partial(jax.jit, static_argnames=("cfg", "max_images"))
def relax_batch(positions: Array, lattice: Array, atom_mask: Array, *, cfg: RelaxConfig,
                max_images: tuple[int, int, int]) -> RelaxTrace:
    """Return :func:`relax_one` over a batch ``[b, n, 3]`` of padded carbon crystals."""
    return jax.vmap(lambda x, lat, msk: relax_one(x, lat, msk, cfg=cfg, max_images=max_images))(
        positions, lattice, atom_mask)


class Relaxed(NamedTuple):
    """A relaxed crystal set and per crystal: energy per atom (eV), residual force (eV/A), FIRE steps, converged, kept, hops accepted.

    ``kept`` is False where the relaxation could not be trusted (neighbour
    overflow, a non-finite result, a collapsed cell, another element) or was
    ``reverted`` by ``RelaxConfig.keep_coordination``: that crystal is
    returned as it came in. ``hops``: basin-hopping moves that lowered its
    energy (``RelaxConfig.hops``).
    """

    crystals: CrystalSet
    energy_per_atom: np.ndarray
    fmax: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    kept: np.ndarray
    reverted: np.ndarray
    hops: np.ndarray


def rattle(crystals: CrystalSet, sigma: float, rng: np.random.Generator) -> CrystalSet:
    """Return ``crystals`` with every atom moved by isotropic Gaussian noise of ``sigma`` A (cells unchanged)."""
    frac = crystals.frac_coords.copy()
    for i in range(len(crystals)):
        a, b = crystals.offsets[i], crystals.offsets[i + 1]
        lat = geometry.lattice_matrix_np(crystals.lengths[i], crystals.angles[i])
        frac[a:b] = ((frac[a:b] @ lat + rng.normal(0.0, sigma, (b - a, 3))) @ np.linalg.inv(lat)) % 1.0
    return CrystalSet(crystals.num_atoms, crystals.atom_types, frac, crystals.lengths, crystals.angles,
                      crystals.num_rejected)


def relax_crystals(crystals: CrystalSet, cfg: RelaxConfig = RelaxConfig(), batch_size: int = 256,
                   progress: bool = True, strict: bool = True, seed: int = 0) -> Relaxed:
    """Return ``crystals`` relaxed under Tersoff's carbon potential (host side), then ``cfg.hops`` rounds of basin hopping.

    A crystal holding any element other than carbon is returned as it came
    (``kept`` False, with a warning); with ``strict``, a set without any
    pure-carbon crystal is refused (it is not carbon data). ``seed`` draws
    the hops' displacements.
    """
    carbon_only = np.array([bool(np.all(t == CARBON_Z)) for t in np.split(crystals.atom_types, crystals.offsets[1:-1])],
                           bool) if len(crystals) else np.zeros(0, bool)
    if strict and len(crystals) and not carbon_only.any():
        other = np.unique(crystals.atom_types[crystals.atom_types != CARBON_Z])
        raise ValueError(f"the Tersoff relaxation knows carbon only; the crystals hold atomic numbers {other.tolist()}")
    if not carbon_only.all():
        log.warning("%d of %d crystals hold elements other than carbon: left unrelaxed", int((~carbon_only).sum()),
                    len(crystals))
    result = _relax_set(crystals, cfg, carbon_only, batch_size, progress, "relax")
    rng = np.random.default_rng(seed)
    for k in range(cfg.hops):
        result = _hop(result, cfg, rng, batch_size, progress, f"hop {k + 1}/{cfg.hops}")
    return result


def _hop(current: Relaxed, cfg: RelaxConfig, rng: np.random.Generator, batch_size: int, progress: bool,
         desc: str) -> Relaxed:
    """Return ``current`` after one basin-hopping round: its kept crystals above ``cfg.hop_above`` rattled, relaxed, kept where lower."""
    rows = np.flatnonzero(current.kept & (current.energy_per_atom > cfg.hop_above))
    if not len(rows):
        return current
    start = current.crystals.subset(rows)
    # Each trial is judged against where it started (below), not by relax_crystals' own coordination guard.
    trial = _relax_set(rattle(start, cfg.hop_sigma, rng), dataclasses.replace(cfg, keep_coordination=None),
                       np.ones(len(rows), bool), batch_size, progress, desc)
    better = trial.kept & (trial.energy_per_atom < current.energy_per_atom[rows])
    if cfg.keep_coordination is not None:
        low, high = cfg.keep_coordination
        in_range = lambda s, j: geometry.coordination_in_range(s.crystal(j)[3], s.lengths[j], s.angles[j],  # noqa: E731
                                                               cfg.bond_cutoff, low, high)
        better &= np.array([not b or in_range(trial.crystals, j) >= in_range(start, j) for j, b in enumerate(better)])
    take = rows[better]
    frac = current.crystals.frac_coords.copy()
    frac[np.repeat(np.isin(np.arange(len(current.crystals)), take), current.crystals.num_atoms)] = \
        trial.crystals.frac_coords[np.repeat(better, trial.crystals.num_atoms)]
    cs = current.crystals
    crystals = CrystalSet(cs.num_atoms, cs.atom_types, frac, cs.lengths.copy(), cs.angles.copy(), cs.num_rejected)
    crystals.lengths[take], crystals.angles[take] = trial.crystals.lengths[better], trial.crystals.angles[better]
    fields = {}
    for name in ("energy_per_atom", "fmax", "steps", "converged"):
        value = getattr(current, name).copy()
        value[take] = getattr(trial, name)[better]
        fields[name] = value
    hops = current.hops.copy()
    hops[take] += 1
    return current._replace(crystals=crystals, hops=hops, **fields)


def _relax_set(crystals: CrystalSet, cfg: RelaxConfig, carbon_only: np.ndarray, batch_size: int, progress: bool,
               desc: str) -> Relaxed:
    """Return ``crystals`` relaxed once (no hops); rows not ``carbon_only`` come back unchanged."""
    from tqdm.auto import tqdm

    c = len(crystals)
    n_max = int(crystals.num_atoms.max(initial=1))
    dense = crystals.dense(n_max)
    lattice = np.asarray(geometry.lattice_matrix(dense["lengths"], dense["angles"]), np.float32)
    frac = dense["frac_coords"].astype(np.float64)
    mask = dense["atom_mask"]
    cart = np.einsum("bnx,bxy->bny", frac, lattice).astype(np.float32)
    # The cell may shrink while it relaxes: search images for a cut-off with room to spare.
    search = (CARBON.R + CARBON.D) * (1.5 if cfg.cell == "free" else 1.0)
    out_frac = frac.copy()
    lengths, angles = crystals.lengths.astype(np.float64), crystals.angles.astype(np.float64)
    energy = np.full(c, np.nan)
    fmax = np.full(c, np.nan)
    steps = np.zeros(c, np.int64)
    kept = np.zeros(c, bool)
    # Batches of similar size, each padded to its largest crystal rounded up to 4 atoms: most cells hold 6-8
    # atoms, and the pair search grows with the square of the padding.
    order = np.argsort(crystals.num_atoms, kind="stable")
    for start in tqdm(range(0, c, batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start:start + batch_size]
        width = min(n_max, -(-int(crystals.num_atoms[rows].max()) // 4) * 4)
        pad = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])]) if c > batch_size else rows
        images = neighbors.required_image_range(lattice[pad], search)
        trace = jax.device_get(relax_batch(jnp.asarray(cart[pad, :width]), jnp.asarray(lattice[pad]),
                                           jnp.asarray(mask[pad, :width]), cfg=cfg, max_images=images))
        t = slice(0, len(rows))
        lat = np.asarray(trace.lattice[t], np.float64)
        vol = np.abs(np.linalg.det(lat))
        n_atoms = crystals.num_atoms[rows]
        ok = (carbon_only[rows] & ~np.asarray(trace.overflow[t]) & np.isfinite(np.asarray(trace.energy[t]))
              & np.all(np.isfinite(trace.positions[t]), axis=(1, 2)) & (vol > 3.0 * n_atoms))
        new_frac = np.einsum("bny,byx->bnx", np.asarray(trace.positions[t], np.float64), np.linalg.inv(lat))
        new_frac = new_frac - np.floor(new_frac)
        out_frac[rows, :width] = new_frac
        # An untrusted row keeps its own numbers exactly (no float32 round trip).
        new_lengths, new_angles = (np.asarray(a, np.float64) for a in geometry.lattice_params(lat))
        lengths[rows] = np.where(ok[:, None], new_lengths, lengths[rows])
        angles[rows] = np.where(ok[:, None], new_angles, angles[rows])
        energy[rows] = np.asarray(trace.energy[t]) / n_atoms
        fmax[rows] = trace.fmax[t]
        steps[rows] = trace.steps[t]
        kept[rows] = ok
    reverted = np.zeros(c, bool)
    if cfg.keep_coordination is not None:
        low, high = cfg.keep_coordination
        for i in np.flatnonzero(kept):
            a, b = crystals.offsets[i], crystals.offsets[i + 1]
            before = geometry.coordination_in_range(crystals.frac_coords[a:b], crystals.lengths[i],
                                                    crystals.angles[i], cfg.bond_cutoff, low, high)
            after = geometry.coordination_in_range(out_frac[i, : b - a], lengths[i], angles[i], cfg.bond_cutoff,
                                                   low, high)
            reverted[i] = after < before
        kept &= ~reverted
        lengths[reverted], angles[reverted] = crystals.lengths[reverted], crystals.angles[reverted]
    # An untrusted row keeps its own coordinates exactly (no float32 round trip).
    atom_kept = np.repeat(kept, crystals.num_atoms)
    frac_out = np.where(atom_kept[:, None], out_frac[mask], crystals.frac_coords)
    relaxed = CrystalSet(crystals.num_atoms.copy(), crystals.atom_types.copy(), frac_out, lengths, angles,
                         crystals.num_rejected)
    converged = kept & (fmax < cfg.fmax)
    return Relaxed(relaxed, np.where(kept, energy, np.nan), fmax, steps, converged, kept, reverted,
                   np.zeros(c, np.int64))
