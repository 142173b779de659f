"""Relaxing crystal sets on the host: Tersoff's carbon potential (:mod:`symat_jax.tersoff`) minimised by FIRE (:mod:`symat_jax.fire`).

Generated crystals leave the chain with bonds of the right topology but with
positions about 0.1 A off, and CDVAE's structure fingerprint needs them to
about 0.05 A. A chemist relaxes such candidates in a force field before
judging them; this module does that for carbon, at fixed cell or under a
pressure with the cell free (Carbon-24 was relaxed at 10 GPa). The sampler's
``Relax`` and ``Hop`` stages (:mod:`symat_jax.sampling.stages`) call it; what
was sampled is kept beside what was relaxed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from symat_jax import geometry, neighbors
from symat_jax.configs import RelaxConfig
from symat_jax.crystals import CrystalSet
from symat_jax.fire import relax_batch
from symat_jax.tersoff import CARBON, CARBON_Z

log = logging.getLogger(__name__)

# The most periodic images one crystal's neighbour search may span (9 x 9 x 9: a cell thinner than a fifth of
# Tersoff's 2.1 A cut-off needs more). A collapsed cell would ask for terabytes; it stays as it came, untrusted.
MAX_IMAGE_CELLS = 9**3


class Relaxed(NamedTuple):
    """A relaxed crystal set and per crystal: energy per atom (eV), residual force (eV/A), FIRE steps, converged, kept, hops accepted.

    ``kept`` is False where the relaxation could not be trusted (neighbour
    overflow, a non-finite result, a collapsed cell, another element) or was
    ``reverted`` by the relaxation's guard (``RelaxConfig.guard``): that
    crystal is returned as it came in. ``hops``: basin-hopping moves that
    lowered its energy (``HopConfig``).
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


def carbon_rows(crystals: CrystalSet, strict: bool = True) -> np.ndarray:
    """Return ``[c]`` whether each crystal holds carbon only (others are left unrelaxed, with a warning).

    With ``strict``, a set without any pure-carbon crystal is refused: it is not carbon data.
    """
    carbon_only = np.array([bool(np.all(t == CARBON_Z)) for t in np.split(crystals.atom_types, crystals.offsets[1:-1])],
                           bool) if len(crystals) else np.zeros(0, bool)
    if strict and len(crystals) and not carbon_only.any():
        other = np.unique(crystals.atom_types[crystals.atom_types != CARBON_Z])
        raise ValueError(f"the Tersoff relaxation knows carbon only; the crystals hold atomic numbers {other.tolist()}")
    if not carbon_only.all():
        log.warning("%d of %d crystals hold elements other than carbon: left unrelaxed", int((~carbon_only).sum()),
                    len(crystals))
    return carbon_only


def relax_once(crystals: CrystalSet, cfg: RelaxConfig, carbon_only: np.ndarray, batch_size: int = 256,
               progress: bool = True, desc: str = "relax") -> Relaxed:
    """Return ``crystals`` relaxed once (no guard, no hops); untrusted rows and rows not ``carbon_only`` come back unchanged."""
    c = len(crystals)
    fire_cfg = dataclasses.replace(cfg, guard=None)  # the guard acts on the host: one program with or without it
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
    searchable = np.array([neighbors.image_cells(lat, search) <= MAX_IMAGE_CELLS for lat in lattice], bool)
    if not searchable.all():
        log.warning("%d crystals have cells too thin to search for neighbours (over %d periodic images): left as "
                    "they came", int((~searchable).sum()), MAX_IMAGE_CELLS)
    order = order[searchable[order]]
    c_run = len(order)
    for start in tqdm(range(0, c_run, batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start:start + batch_size]
        width = min(n_max, -(-int(crystals.num_atoms[rows].max()) // 4) * 4)
        pad = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])]) if c > batch_size else rows
        images = neighbors.required_image_range(lattice[pad], search)
        trace = jax.device_get(relax_batch(jnp.asarray(cart[pad, :width]), jnp.asarray(lattice[pad]),
                                           jnp.asarray(mask[pad, :width]), cfg=fire_cfg, max_images=images))
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
    # An untrusted row keeps its own coordinates exactly (no float32 round trip).
    atom_kept = np.repeat(kept, crystals.num_atoms)
    frac_out = np.where(atom_kept[:, None], out_frac[mask], crystals.frac_coords)
    relaxed = CrystalSet(crystals.num_atoms.copy(), crystals.atom_types.copy(), frac_out, lengths, angles,
                         crystals.num_rejected)
    converged = kept & (fmax < cfg.fmax)
    return Relaxed(relaxed, np.where(kept, energy, np.nan), fmax, steps, converged, kept, np.zeros(c, bool),
                   np.zeros(c, np.int64))
