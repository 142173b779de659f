"""Crystals in CDVAE's flat layout (numpy only): what the sampler's stages pass on, ``samples.npz`` files, dataset splits.

A :class:`CrystalSet` holds atoms and cells only, plus the count of crystals
a sampler rejected. The training container,
:class:`~symat_jax.data.dataset.CrystalDataset`, also carries ids, properties
and encoder edges; both store atoms with the same ragged helpers
(:mod:`symat_jax.ragged`), and :meth:`~symat_jax.data.dataset.CrystalDataset.crystal_set`
converts. This floor imports no jax, pymatgen or CSV reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import zipfile

import numpy as np

from symat_jax import ragged
from symat_jax.files import read_json
from symat_jax.geometry import cell_defect, volume_factor
from symat_jax.ragged import pad_atoms

log = logging.getLogger(__name__)

MAX_ATOMIC_NUMBER = 100  # the decoders' element slots (SPEC 2)


def _check_samples(file: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError naming ``file`` when its arrays cannot be crystals (the CDVAE layout's rules)."""
    num = arrays["num_atoms"]
    if num.size == 0:
        raise ValueError(f"{file} holds no crystals")
    for name in ("num_atoms", "atom_types"):
        x = arrays[name]
        if not (np.issubdtype(x.dtype, np.number) and np.all(np.isfinite(x)) and np.all(x == np.round(x))):
            bad = x[~(np.isfinite(x) & (x == np.round(x)))] if np.issubdtype(x.dtype, np.number) else x[:1]
            raise ValueError(f"{file}: {name} holds values that are not whole numbers (e.g. {bad.flat[0]})")
    if np.any(num < 0):
        raise ValueError(f"{file}: num_atoms holds a negative count ({int(num.min())})")


def read_rejects(path: pathlib.Path) -> list[dict]:
    """Return the rejects a sampler listed in ``rejects.json`` (none where there is no file; ValueError naming a bad one)."""
    if not path.exists():
        return []
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} is not a list of rejected crystals (a JSON list of objects, as symat sample writes)")
    return data


def crystal_problems(num_atoms: np.ndarray, atom_types: np.ndarray, frac_coords: np.ndarray, lengths: np.ndarray,
                     angles: np.ndarray) -> list[str | None]:
    """Return per crystal why it cannot be a crystal (None where it can): the one validator of crystal arrays.

    Atoms >= 1, atomic numbers 1..100, finite coordinates, and a cell by
    :func:`symat_jax.geometry.cell_defect` (finite positive lengths, angles of
    a positive volume, a volume per atom above the floor). The arrays'
    shapes must agree (the caller checks the layout).
    """
    starts = ragged.starts(num_atoms)
    out: list[str | None] = []
    for i, n in enumerate(np.asarray(num_atoms, np.int64)):
        types, frac = atom_types[starts[i] : starts[i + 1]], frac_coords[starts[i] : starts[i + 1]]
        if n < 1:
            out.append("no atoms")
        elif np.any((types < 1) | (types > MAX_ATOMIC_NUMBER)):
            out.append(f"atomic number {int(types[(types < 1) | (types > MAX_ATOMIC_NUMBER)][0])} outside "
                       f"1-{MAX_ATOMIC_NUMBER}")
        elif not np.all(np.isfinite(frac)):
            out.append("NaN or infinite fractional coordinate")
        else:
            out.append(cell_defect(lengths[i], angles[i], int(n)))
    return out


@dataclasses.dataclass(frozen=True)
class CrystalSet:
    """Crystals concatenated over atoms: ``num_atoms`` [c], ``atom_types`` [a], ``frac_coords`` [a, 3], ``lengths``/``angles`` [c, 3].

    ``num_rejected`` counts crystals a sampler generated but could not write
    (too many atoms, degenerate cell): evaluation counts them as invalid.
    """

    num_atoms: np.ndarray
    atom_types: np.ndarray
    frac_coords: np.ndarray
    lengths: np.ndarray
    angles: np.ndarray
    num_rejected: int = 0
    rejects: tuple = ()  # the rejected crystals' records ({"index", "reason", ...}) where known

    def __post_init__(self) -> None:
        """Check that the arrays agree with each other."""
        c, a = len(self.num_atoms), int(np.sum(self.num_atoms))
        if self.atom_types.shape != (a,) or self.frac_coords.shape != (a, 3):
            raise ValueError(f"{a} atoms in num_atoms but atom_types {self.atom_types.shape}, "
                             f"frac_coords {self.frac_coords.shape}")
        if self.lengths.shape != (c, 3) or self.angles.shape != (c, 3):
            raise ValueError(f"{c} crystals but lengths {self.lengths.shape}, angles {self.angles.shape}")

    def __len__(self) -> int:
        """Return the number of crystals with coordinates (rejects not included)."""
        return len(self.num_atoms)

    def densities(self) -> np.ndarray:
        """Return ``[c]`` densities in g/cm^3 (SPEC 5's density EMD quantity; NaN for a cell without volume)."""
        from pymatgen.core import Element

        mass = {int(z): float(Element.from_Z(int(z)).atomic_mass) for z in np.unique(self.atom_types)}
        cell_mass = np.array([sum(mass[int(z)] for z in t) for t in np.split(self.atom_types, self.offsets[1:-1])])
        volume = np.prod(self.lengths, axis=1) * np.sqrt(np.maximum([volume_factor(a) for a in self.angles], 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(volume > 1e-9, cell_mass / volume * 1.66053906660, np.nan)  # amu / A^3 -> g / cm^3

    @property
    def offsets(self) -> np.ndarray:
        """Return ``[c + 1]`` start of each crystal's atoms."""
        return ragged.starts(self.num_atoms)

    def crystal(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(atom_types, lengths, angles, frac_coords)`` of crystal ``i``."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.atom_types[a:b], self.lengths[i], self.angles[i], self.frac_coords[a:b]

    def subset(self, indices: np.ndarray) -> "CrystalSet":
        """Return crystals ``indices`` (in that order; no rejects)."""
        indices = np.asarray(indices, np.int64)
        atoms = ragged.take_rows(self.num_atoms, indices)
        return CrystalSet(self.num_atoms[indices], self.atom_types[atoms], self.frac_coords[atoms],
                          self.lengths[indices], self.angles[indices])

    def digest(self) -> str:
        """Return the sha256 of the crystals' arrays (the key of cached fingerprints)."""
        h = hashlib.sha256()
        for arr in (self.num_atoms, self.atom_types, self.frac_coords, self.lengths, self.angles):
            a = np.ascontiguousarray(arr)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def dense(self, max_atoms: int | None = None) -> dict[str, np.ndarray]:
        """Return the crystals padded to ``max_atoms`` (default: the largest): ``atomic_numbers``, ``frac_coords``, ``atom_mask`` [c, n...], ``lengths``, ``angles``."""
        n = int(self.num_atoms.max(initial=1)) if max_atoms is None else max_atoms
        if len(self) and self.num_atoms.max() > n:
            raise ValueError(f"a crystal has {self.num_atoms.max()} atoms, more than max_atoms={n}")
        z, frac, mask = pad_atoms(self.num_atoms, self.atom_types, self.frac_coords, n)
        return {"atomic_numbers": z, "frac_coords": frac, "atom_mask": mask,
                "lengths": self.lengths.astype(np.float32), "angles": self.angles.astype(np.float32)}

    @classmethod
    def from_samples(cls, path: str | os.PathLike, batch_idx: int = 0) -> "CrystalSet":
        """Return the crystals of a CDVAE-layout ``samples.npz`` (a file, or a folder holding one).

        Arrays may carry CDVAE's leading evaluation axis (``num_atoms`` [k, c]):
        ``batch_idx`` picks one, as CDVAE's evaluation does. A ``rejects.json``
        beside the file (written by ``symat sample``) adds its crystals as rejects.
        """
        path = pathlib.Path(path)
        folder = path if path.is_dir() else path.parent
        file = path / "samples.npz" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist")
        keys = ("num_atoms", "atom_types", "frac_coords", "lengths", "angles")
        try:
            with np.load(file, allow_pickle=False) as z:
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise ValueError(f"{file}: not in the CDVAE layout (missing {', '.join(repr(k) for k in missing)}); "
                                     f"needs {', '.join(keys)}")
                arrays = {k: z[k] for k in keys}
                sample_index = z["sample_index"] if "sample_index" in z.files else None
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{file} is not a readable .npz ({err})") from None
        except ValueError as err:
            if str(file) in str(err):
                raise
            raise ValueError(f"{file} is not a readable .npz ({err})") from None
        if arrays["num_atoms"].ndim == 2:
            arrays = {k: v[batch_idx] for k, v in arrays.items()}
            sample_index = None
        _check_samples(file, arrays)
        sample_index = sample_index if sample_index is None else np.asarray(sample_index)
        earlier = read_rejects(folder / "rejects.json")
        try:
            crystals = cls(arrays["num_atoms"].astype(np.int64), arrays["atom_types"].astype(np.int64),
                           arrays["frac_coords"].astype(float), arrays["lengths"].astype(float),
                           arrays["angles"].astype(float))
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None
        problems = crystal_problems(crystals.num_atoms, crystals.atom_types, crystals.frac_coords, crystals.lengths,
                                    crystals.angles)
        bad = [i for i, p in enumerate(problems) if p is not None]
        if len(bad) == len(problems):
            raise ValueError(f"{file}: none of its {len(problems)} crystals is a crystal (crystal 0: {problems[0]})")
        if bad:
            log.warning("%s: %d of %d crystals are not crystals and count as rejects (first: crystal %d, %s)", file,
                        len(bad), len(problems), bad[0], problems[bad[0]])
        good = crystals.subset(np.array([i for i, p in enumerate(problems) if p is None], np.int64))
        index = sample_index if sample_index is not None and len(sample_index) == len(problems) else range(len(problems))
        found = tuple({"index": int(index[i]), "reason": problems[i]} for i in bad)
        return dataclasses.replace(good, num_rejected=len(earlier) + len(bad), rejects=tuple(earlier) + found)
