"""Local structure as a chemist reads it: coordination numbers and nearest-neighbour distances (host-side numpy).

Beyond the CDVAE protocol: a generated carbon whose atoms have no neighbour
within bonding distance is "valid" (no pair closer than 0.5 A) but not a
material. These statistics compare generated sets with the data, and
:func:`keep_proposals` is the rule by which the sampler's stages keep a
proposed crystal (more atoms bonded as carbon bonds, or no fewer).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from symat_jax.crystals import CrystalSet
from symat_jax.configs import CoordinationRule
from symat_jax.geometry import coordination_in_range, lattice_matrix_np, neighbor_distances

BOND_CUTOFF = 1.8  # A: a C-C bond (graphite 1.42, diamond 1.54, carbon-24 test split 1.37-1.52)


def crystal_coordination(crystals: CrystalSet, cutoff: float = BOND_CUTOFF,
                         nn_cutoff: float = 4.0) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Return per crystal ``(neighbours within cutoff [n], nearest-neighbour distance [n], inf beyond nn_cutoff)``; None for a degenerate cell."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i in range(len(crystals)):
        types, lengths, angles, frac = crystals.crystal(i)
        lat = lattice_matrix_np(lengths, angles)
        if not np.all(np.isfinite(lat)) or abs(np.linalg.det(lat)) < 1e-3:
            out.append(None)
            continue
        rows = neighbor_distances(np.asarray(frac, float), lat, max(cutoff, nn_cutoff))
        out.append((np.array([int(np.sum(r <= cutoff)) for r in rows], int),
                    np.array([float(r[0]) if len(r) else np.inf for r in rows])))
    return out


def local_structure(crystals: CrystalSet, cutoff: float = BOND_CUTOFF, nn_cutoff: float = 4.0,
                    coordination: list[tuple[np.ndarray, np.ndarray] | None] | None = None) -> dict[str, Any]:
    """Return per-atom coordination within ``cutoff`` (share of atoms with 0..6+ neighbours) and nearest-neighbour distances.

    ``coordination_share[k]``: share of all atoms with exactly k neighbours
    within ``cutoff`` (the last entry: k or more); ``nn_distance``: each
    atom's nearest neighbour (within ``nn_cutoff``; inf beyond).
    ``coordination``: :func:`crystal_coordination` of ``crystals`` at the same
    cut-offs, when the caller has it already.
    """
    if coordination is None:
        coordination = crystal_coordination(crystals, cutoff, nn_cutoff)
    kept = [c for c in coordination if c is not None]
    coord_arr = np.concatenate([c for c, _ in kept]) if kept else np.zeros(0, int)
    nn_arr = np.concatenate([d for _, d in kept]) if kept else np.zeros(0)
    share = np.bincount(np.minimum(coord_arr, 6), minlength=7) / max(len(coord_arr), 1)
    finite = nn_arr[np.isfinite(nn_arr)]
    return {
        "atoms": int(len(coord_arr)),
        "coordination_share": [float(x) for x in share],
        "share_3_or_4": float(share[3] + share[4]),
        "share_isolated": float(share[0]),
        "nn_distance_quantiles": [float(q) for q in np.quantile(finite, [0.05, 0.25, 0.5, 0.75, 0.95])] if len(finite) else [],
        "nn_distances": nn_arr,
    }


def coordination_by_density(crystals: CrystalSet, edges: np.ndarray, cutoff: float = BOND_CUTOFF) -> list[dict[str, Any]]:
    """Return, per density bin ``[edges[k], edges[k+1])`` (g/cm^3; open ends), the share of crystals in it and of their atoms 3-4-fold / isolated.

    Separates "the cells are too sparse to bond" from "the chain did not
    build the bonds a cell of that density allows": pass the reference
    set's density quantiles as ``edges`` and read the two sets side by side.
    """
    dens = crystals.densities()
    per = crystal_coordination(crystals, cutoff)
    bins = np.digitize(dens, np.asarray(edges, float))  # 0 .. len(edges); NaN lands past the last edge
    bounds = [-np.inf, *map(float, edges), np.inf]
    out = []
    for b in range(len(edges) + 1):
        members = [per[i] for i in np.flatnonzero((bins == b) & np.isfinite(dens)) if per[i] is not None]
        coord = np.concatenate([c for c, _ in members]) if members else np.zeros(0, int)
        out.append({"low": bounds[b], "high": bounds[b + 1], "share_crystals": len(members) / max(len(crystals), 1),
                    "share_3_or_4": float(np.mean((coord == 3) | (coord == 4))) if len(coord) else None,
                    "share_isolated": float(np.mean(coord == 0)) if len(coord) else None})
    return out


def rule_shares(rule: CoordinationRule, crystals: CrystalSet, rows: np.ndarray | None = None) -> np.ndarray:
    """Return ``[len(rows)]`` the share of each crystal's atoms that satisfy ``rule`` (all crystals without ``rows``)."""
    rows = np.arange(len(crystals)) if rows is None else np.asarray(rows, np.int64)
    out = np.zeros(len(rows))
    for k, i in enumerate(rows):
        _, lengths, angles, frac = crystals.crystal(int(i))
        out[k] = coordination_in_range(frac, lengths, angles, rule.cutoff, rule.low, rule.high)
    return out


def keep_proposals(proposed: np.ndarray, rule: CoordinationRule | None, before: CrystalSet, after: CrystalSet,
                   *, strict: bool = False, before_shares: np.ndarray | None = None) -> np.ndarray:
    """Return ``[c]`` where a stage keeps its proposal ``after[i]`` over ``before[i]``: the one accept rule of the sampler.

    A proposal is kept where ``proposed`` (it is trusted and better by the
    stage's own measure: a relaxation, a lower energy) and, with a ``rule``,
    where no fewer of its atoms satisfy the rule (``strict``: more). The retry
    (``strict``: its measure is the rule itself), the relaxation's guard and
    the hops all keep their proposals by it. Counts only the proposed rows;
    ``before_shares`` (``[c]``, already counted by the caller) spares counting ``before`` again.
    """
    keep = np.asarray(proposed, bool).copy()
    if rule is None:
        return keep
    rows = np.flatnonzero(keep)
    old = rule_shares(rule, before, rows) if before_shares is None else np.asarray(before_shares)[rows]
    new = rule_shares(rule, after, rows)
    keep[rows] = new > old if strict else new >= old
    return keep
