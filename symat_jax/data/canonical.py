"""Canonical form of a crystal (SPEC 1), computed on the host with pymatgen and numpy.

pymatgen is imported where it is used, so reading a cached dataset (and
training from it, on a machine without pymatgen) does not need it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from typing import TYPE_CHECKING

from symat_jax.crystals import MAX_ATOMIC_NUMBER  # noqa: F401  (the CSV reader checks elements with it)
from symat_jax.geometry import MIN_VOLUME_PER_ATOM, cell_defect, lattice_matrix_np

if TYPE_CHECKING:
    from pymatgen.core import Structure

_SPREAD_TIE_TOL = 1e-9


class BadCrystalError(ValueError):
    """A row that cannot become a canonical crystal; the message says why."""


@dataclasses.dataclass(frozen=True)
class CanonicalCrystal:
    """One crystal in canonical form.

    atomic_numbers: [n] int; frac_coords: [n, 3] in [-0.5, 0.5], centred;
    lengths: [3] in A; angles: [3] in degrees; edge_index: [e, 2] rows
    (sender j, receiver i) of the CrystalNN encoder graph with edge_offsets
    [e, 3] such that the edge vector is ``x_j + offset @ L - x_i``.
    """

    atomic_numbers: np.ndarray
    frac_coords: np.ndarray
    lengths: np.ndarray
    angles: np.ndarray
    edge_index: np.ndarray | None = None
    edge_offsets: np.ndarray | None = None

    @property
    def num_atoms(self) -> int:
        """Return the number of atoms."""
        return int(self.atomic_numbers.shape[0])

    def lattice(self) -> np.ndarray:
        """Return the [3, 3] lattice matrix (rows are lattice vectors)."""
        return lattice_matrix_np(self.lengths, self.angles)

    def to_structure(self) -> Structure:
        """Return the crystal as a pymatgen Structure."""
        return to_structure(self.atomic_numbers, self.lengths, self.angles, self.frac_coords)


def to_structure(atom_types: np.ndarray, lengths: np.ndarray, angles: np.ndarray, frac_coords: np.ndarray) -> Structure:
    """Return the pymatgen Structure of one crystal given as (atomic numbers, lengths, angles in degrees, fractional coordinates).

    The one crystal -> Structure builder (datasets, written samples, evaluation).
    """
    from pymatgen.core import Lattice, Structure

    return Structure(
        Lattice.from_parameters(*lengths, *angles), np.asarray(atom_types).tolist(), frac_coords, coords_are_cartesian=False
    )


def center_frac_coords(frac_coords: np.ndarray) -> np.ndarray:
    """Return [n, 3] fractional coordinates moved compactly around the origin (SPEC 1 step 3).

    Per axis: wrap into [0, 1); among the shifts that add 1 to the m smallest
    coordinates (m = 0 .. n-1), take the one with the smallest max-min spread
    (the last of spreads tied within 1e-9, as the reference does); subtract the midpoint of min and max.
    """
    f = np.mod(np.asarray(frac_coords, dtype=np.float64), 1.0)
    # mod can return exactly 1.0 for tiny negative inputs.
    f[f >= 1.0] -= 1.0
    out = np.empty_like(f)
    for axis in range(3):
        col = f[:, axis]
        order = np.argsort(col, kind="stable")
        s = col[order]
        # spread[m]: max - min after adding 1 to the m smallest values.
        spread = np.empty(len(s))
        spread[0] = s[-1] - s[0]
        spread[1:] = s[:-1] + 1.0 - s[1:]
        # The reference keeps the last of equally small spreads. Ties are common
        # in high-symmetry cells (cubic perovskites) and arrive blurred by
        # rounding (0.49999999999999994 vs 0.5), hence the tolerance.
        ties = np.flatnonzero(spread <= spread.min() + _SPREAD_TIE_TOL)
        m = int(ties[-1])
        shifted = s.copy()
        shifted[:m] += 1.0
        mid = 0.5 * (shifted.max() + shifted.min())
        res = np.empty_like(col)
        res[order] = shifted - mid
        out[:, axis] = res
    return out


def check_structure(structure: Structure, max_atoms: int) -> None:
    """Raise BadCrystalError when the structure is outside what the model can hold."""
    n = len(structure)
    if n == 0:
        raise BadCrystalError("no atoms")
    if n > max_atoms:
        raise BadCrystalError(f"{n} atoms, more than the dataset's max_atoms={max_atoms}")
    if not structure.is_ordered:
        raise BadCrystalError("disordered (partial occupancy) sites")
    for site in structure:
        z = site.specie.Z
        if not 1 <= z <= MAX_ATOMIC_NUMBER:
            raise BadCrystalError(f"element {site.specie} (Z={z}) outside 1..{MAX_ATOMIC_NUMBER}")
    params = np.asarray(structure.lattice.parameters, dtype=np.float64)
    if not np.all(np.isfinite(params)) or not np.all(np.isfinite(structure.frac_coords)):
        raise BadCrystalError("NaN or infinite lattice parameter or coordinate")
    defect = cell_defect(structure.lattice.abc, structure.lattice.angles, n)
    if defect is not None:
        raise BadCrystalError(defect)


def canonicalize(structure: Structure, max_atoms: int) -> CanonicalCrystal:
    """Return the canonical crystal (Niggli cell, SPEC lattice convention, centred coordinates)."""
    check_structure(structure, max_atoms)
    try:
        reduced = structure.get_reduced_structure()
    except Exception as err:  # pymatgen raises several types on broken cells
        raise BadCrystalError(f"Niggli reduction failed: {err}") from err
    lengths = np.asarray(reduced.lattice.abc, dtype=np.float64)
    angles = np.asarray(reduced.lattice.angles, dtype=np.float64)
    if not (np.all(np.isfinite(lengths)) and np.all(np.isfinite(angles))):
        raise BadCrystalError("NaN lattice after Niggli reduction")
    from pymatgen.core import Lattice

    rebuilt = Lattice.from_parameters(*lengths, *angles)
    if abs(rebuilt.volume) < MIN_VOLUME_PER_ATOM * len(reduced):
        raise BadCrystalError("degenerate lattice after Niggli reduction")
    return CanonicalCrystal(
        atomic_numbers=np.array([site.specie.Z for site in reduced], dtype=np.int32),
        frac_coords=center_frac_coords(reduced.frac_coords),
        lengths=lengths,
        angles=angles,
    )
