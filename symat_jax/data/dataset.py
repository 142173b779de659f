"""Reading CDVAE CSV files into canonical crystals, in parallel and cached."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import math
import os
import pathlib
import warnings
from typing import Iterator, Sequence

import numpy as np

from symat_jax import hostpool, ragged
from symat_jax.data import registry
from symat_jax.data.canonical import MAX_ATOMIC_NUMBER, BadCrystalError, CanonicalCrystal, canonicalize
from symat_jax.crystals import CrystalSet
from symat_jax.files import UNREADABLE_NPZ, set_aside
from symat_jax.geometry import cell_defect

log = logging.getLogger(__name__)

# Bump whenever canonicalisation or the cached layout changes: old caches are
# then ignored rather than trusted.
CACHE_VERSION = 1

csv.field_size_limit(1 << 30)


@dataclasses.dataclass(frozen=True)
class CrystalDataset:
    """Canonical crystals concatenated CDVAE-style (per-crystal arrays + per-atom arrays).

    material_id: [c] str; num_atoms: [c]; atomic_numbers: [a]; frac_coords: [a, 3];
    lengths, angles: [c, 3]; properties: [c] float (NaN where missing);
    edge_index: [e, 2] (sender, receiver) local to each crystal; edge_offsets:
    [e, 3]; num_edges: [c] (all zero when the encoder graph was not computed);
    skipped: (material_id, reason) of rows that were left out.
    """

    name: str
    property_column: str
    material_id: np.ndarray
    num_atoms: np.ndarray
    atomic_numbers: np.ndarray
    frac_coords: np.ndarray
    lengths: np.ndarray
    angles: np.ndarray
    properties: np.ndarray
    edge_index: np.ndarray
    edge_offsets: np.ndarray
    num_edges: np.ndarray
    has_graph: bool
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        """Return the number of crystals."""
        return int(self.num_atoms.shape[0])

    @property
    def atom_offsets(self) -> np.ndarray:
        """Return [c + 1] start of each crystal's atoms in the per-atom arrays."""
        return ragged.starts(self.num_atoms)

    @property
    def edge_offsets_start(self) -> np.ndarray:
        """Return [c + 1] start of each crystal's edges in the edge arrays."""
        return ragged.starts(self.num_edges)

    def crystal(self, i: int) -> CanonicalCrystal:
        """Return crystal ``i`` as a CanonicalCrystal."""
        a0, a1 = self.atom_offsets[i], self.atom_offsets[i + 1]
        e0, e1 = self.edge_offsets_start[i], self.edge_offsets_start[i + 1]
        return CanonicalCrystal(
            atomic_numbers=self.atomic_numbers[a0:a1],
            frac_coords=self.frac_coords[a0:a1],
            lengths=self.lengths[i],
            angles=self.angles[i],
            edge_index=self.edge_index[e0:e1] if self.has_graph else None,
            edge_offsets=self.edge_offsets[e0:e1] if self.has_graph else None,
        )

    def __iter__(self) -> Iterator[CanonicalCrystal]:
        """Yield every crystal in order."""
        return (self.crystal(i) for i in range(len(self)))

    def max_in_degree(self) -> int:
        """Return the largest number of incoming encoder edges of any atom (1 without graphs)."""
        if not self.has_graph or len(self.edge_index) == 0:
            return 1
        owner = np.repeat(np.arange(len(self)), self.num_edges)
        node = self.atom_offsets[owner] + self.edge_index[:, 1]
        return int(np.bincount(node).max())

    def element_counts(self) -> np.ndarray:
        """Return [c, 100] int32: how many atoms of element Z (column Z - 1) each crystal holds."""
        counts = np.zeros((len(self), MAX_ATOMIC_NUMBER), dtype=np.int32)
        owner = np.repeat(np.arange(len(self)), self.num_atoms)
        np.add.at(counts, (owner, self.atomic_numbers - 1), 1)
        return counts

    def element_multi_hot(self) -> np.ndarray:
        """Return [c, 100] float32 multi-hot set of the elements present (SPEC 2 target)."""
        return (self.element_counts() > 0).astype(np.float32)

    def num_elements(self) -> np.ndarray:
        """Return [c] number of distinct elements ``k``."""
        return (self.element_counts() > 0).sum(axis=1).astype(np.int32)

    def scaled_lengths(self) -> np.ndarray:
        """Return [c, 3] lattice lengths divided by ``N^(1/3)`` (SPEC 1)."""
        return self.lengths / np.cbrt(self.num_atoms)[:, None]

    def crystal_set(self) -> CrystalSet:
        """Return the crystals of this split (canonical cells) as the project's numpy container."""
        return CrystalSet(np.asarray(self.num_atoms, np.int64), np.asarray(self.atomic_numbers, np.int64),
                          np.asarray(self.frac_coords, float), np.asarray(self.lengths, float),
                          np.asarray(self.angles, float))

    def subset(self, indices: Sequence[int] | np.ndarray) -> "CrystalDataset":
        """Return the crystals at ``indices`` (in that order) as a new dataset."""
        indices = np.asarray(indices, dtype=np.int64)
        atoms = ragged.take_rows(self.num_atoms, indices)
        edges = ragged.take_rows(self.num_edges, indices)
        return dataclasses.replace(
            self,
            material_id=self.material_id[indices],
            num_atoms=self.num_atoms[indices],
            atomic_numbers=self.atomic_numbers[atoms],
            frac_coords=self.frac_coords[atoms],
            lengths=self.lengths[indices],
            angles=self.angles[indices],
            properties=self.properties[indices],
            edge_index=self.edge_index[edges],
            edge_offsets=self.edge_offsets[edges],
            num_edges=self.num_edges[indices],
            skipped=(),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the dataset to an ``.npz`` file atomically (no pickle)."""
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        skipped = np.asarray(self.skipped, dtype=str).reshape(-1, 2)
        np.savez(
            tmp,
            cache_version=CACHE_VERSION,
            name=self.name,
            property_column=self.property_column,
            material_id=self.material_id.astype(str),
            num_atoms=self.num_atoms,
            atomic_numbers=self.atomic_numbers,
            frac_coords=self.frac_coords,
            lengths=self.lengths,
            angles=self.angles,
            properties=self.properties,
            edge_index=self.edge_index,
            edge_offsets=self.edge_offsets,
            num_edges=self.num_edges,
            has_graph=self.has_graph,
            skipped=skipped,
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CrystalDataset":
        """Return the dataset stored by :meth:`save` (ValueError on a stale or foreign file)."""
        with np.load(path, allow_pickle=False) as z:
            if int(z["cache_version"]) != CACHE_VERSION:
                raise ValueError(f"{path}: cache version {int(z['cache_version'])}, need {CACHE_VERSION}")
            return cls(
                name=str(z["name"]),
                property_column=str(z["property_column"]),
                material_id=z["material_id"],
                num_atoms=z["num_atoms"],
                atomic_numbers=z["atomic_numbers"],
                frac_coords=z["frac_coords"],
                lengths=z["lengths"],
                angles=z["angles"],
                properties=z["properties"],
                edge_index=z["edge_index"],
                edge_offsets=z["edge_offsets"],
                num_edges=z["num_edges"],
                has_graph=bool(z["has_graph"]),
                skipped=tuple((str(a), str(b)) for a, b in z["skipped"]),
            )


# ----------------------------------------------------------------------------
# Row processing (runs in worker processes: host-side only, no JAX).


def _parse_float(text: str | None) -> float:
    """Return ``text`` as a float, NaN when empty or unparsable."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def process_row(cif: str, max_atoms: int, with_graph: bool) -> CanonicalCrystal:
    """Return the canonical crystal (with CrystalNN graph if asked) of one CIF text; BadCrystalError if unusable."""
    from pymatgen.core import Structure  # imported here: workers start lean

    if not cif or not cif.strip():
        raise BadCrystalError("empty CIF")
    # Before pymatgen: it reads a negative length as a different, valid cell.
    _raise_if_bad_cell(cif)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            structure = Structure.from_str(cif, fmt="cif")
    except Exception as err:  # pymatgen's CIF parser raises many types
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # The parser's warnings say why it found "no structures" (e.g. overlapping sites).
        why = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in said if str(w.message).strip()))
        raise BadCrystalError(f"unparsable CIF ({msg}{': ' + why if why else ''})") from None
    crystal = canonicalize(structure, max_atoms)
    if not with_graph:
        return crystal
    from symat_jax.data.encoder_graph import crystalnn_edges

    try:
        edge_index, edge_offsets = crystalnn_edges(crystal.to_structure())
    except Exception as err:
        raise BadCrystalError(f"CrystalNN failed ({type(err).__name__}: {err})") from None
    return dataclasses.replace(crystal, edge_index=edge_index, edge_offsets=edge_offsets)


_CELL_KEYS = tuple(f"_cell_{k}" for k in ("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"))


def _raise_if_bad_cell(cif: str) -> None:
    """Raise BadCrystalError when the CIF's cell parameters are NaN or describe a flat cell."""
    values = {}
    for line in cif.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in _CELL_KEYS:
            values[parts[0]] = _parse_float(parts[1].split("(")[0])
    if len(values) != 6:
        return
    a, b, c, alpha, beta, gamma = (values[k] for k in _CELL_KEYS)
    defect = cell_defect(np.array([a, b, c]), np.array([alpha, beta, gamma]))
    if defect is not None:
        raise BadCrystalError(defect)


def _process_one(cif: str, max_atoms: int, with_graph: bool) -> CanonicalCrystal | str:
    """Return the canonical crystal of one CIF, or the reason it was rejected."""
    try:
        return process_row(cif, max_atoms, with_graph)
    except BadCrystalError as err:
        return str(err)


# ----------------------------------------------------------------------------
# Cache.


def _cache_file(folder: pathlib.Path, csv_path: pathlib.Path, digest: str, dataset: str, with_graph: bool) -> pathlib.Path:
    """Return the cache file name for one content digest and setting."""
    kind = "graph" if with_graph else "nograph"
    return folder / f"{csv_path.stem}-{dataset}-{kind}-v{CACHE_VERSION}-{digest[:20]}.npz"


# ----------------------------------------------------------------------------
# Public entry point.


def read_csv(
    path: str | os.PathLike,
    dataset: str,
    *,
    with_graph: bool = True,
    num_workers: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> CrystalDataset:
    """Return the canonical crystals of a CDVAE CSV file, skipping (and reporting) bad rows.

    ``dataset`` names the registry entry (max atoms, property column). With
    ``with_graph`` the CrystalNN encoder graph is computed too (slow: done in
    ``num_workers`` processes, default all cores, and cached under a key of the
    file's content, so an edited file is processed again).
    """
    info = registry.get_info(dataset)
    csv_path = pathlib.Path(path)
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} does not exist")
    raw = csv_path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    folder = registry.cache_folder(cache_dir, beside=csv_path.parent)
    if cache:
        # A cache with the graph also serves a request without it.
        for flag in (True,) if with_graph else (False, True):
            cached = _cache_file(folder, csv_path, digest, dataset, flag)
            if cached.exists():
                try:
                    data = CrystalDataset.load(cached)
                except UNREADABLE_NPZ as err:
                    set_aside(cached, err)
                    continue
                _report_rows(csv_path, data)
                return data

    if not raw.strip():
        raise ValueError(f"{csv_path} is empty: a CDVAE CSV has a header (material_id, cif, ...) and one row per crystal")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{csv_path} is not UTF-8 text (byte {err.start}, line {line}: {raw[err.start:err.start + 1]!r}); "
                         "save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path} has no data rows (header: {', '.join(reader.fieldnames or [])})")
    if "cif" not in rows[0]:
        raise ValueError(f"{csv_path}: no 'cif' column (columns: {', '.join(rows[0])})")
    ids = [str(r.get("material_id") or f"row {k}") for k, r in enumerate(rows)]
    results = hostpool.parallel_map(
        _process_one, [r.get("cif") or "" for r in rows], info.max_atoms, with_graph,
        workers=num_workers, progress=progress, desc=f"{csv_path.name} ({dataset})",
    )
    keep, skipped = [], []
    for k, res in enumerate(results):
        if isinstance(res, str):
            skipped.append((ids[k], res))
        else:
            keep.append(k)
    if not keep:
        raise ValueError(
            f"{csv_path}: no usable row among {len(rows)}"
            + (f" (first problem: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
        )
    crystals = [results[k] for k in keep]
    props = np.array([_parse_float(rows[k].get(info.property_column)) for k in keep])
    data = _assemble(info, [ids[k] for k in keep], crystals, props, with_graph, tuple(skipped))
    _report_rows(csv_path, data)
    if cache:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            data.save(_cache_file(folder, csv_path, digest, dataset, with_graph))
        except OSError as err:
            log.warning("could not write the cache in %s (%s); continuing without it", folder, err)
    return data


def load_split(
    dataset: str,
    split: str,
    data_root: str | os.PathLike | None = None,
    **kwargs,
) -> CrystalDataset:
    """Return ``split`` of ``dataset`` from the data root (downloaded when missing); kwargs go to read_csv."""
    return read_csv(registry.split_path(dataset, split, data_root), dataset, **kwargs)


def _report_rows(csv_path: pathlib.Path, data: CrystalDataset) -> None:
    """Log one warning per skipped row and a summary; warn about kept rows a user should know of.

    Kept but suspicious: a ``material_id`` used by more than one row, and a
    missing or non-numeric property (NaN: training ignores it, the property
    model leaves the crystal out).
    """
    skipped, kept = data.skipped, len(data)
    for mid, reason in skipped:
        log.warning("%s: skipped %s: %s", csv_path.name, mid, reason)
    if skipped:
        log.warning("%s: skipped %d of %d rows; loaded %d", csv_path.name, len(skipped), len(skipped) + kept, kept)
    ids, counts = np.unique(data.material_id.astype(str), return_counts=True)
    for mid in ids[counts > 1]:
        log.warning("%s: material_id %s is used by %d rows (all kept)", csv_path.name, mid, int(counts[ids == mid][0]))
    missing = data.material_id[~np.isfinite(data.properties)]
    if len(missing):
        shown = ", ".join(str(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        log.warning("%s: %d rows have no numeric %s (%s); kept, without a property", csv_path.name, len(missing),
                    data.property_column, shown)


def _assemble(
    info: registry.DatasetInfo,
    ids: list[str],
    crystals: list[CanonicalCrystal],
    props: np.ndarray,
    with_graph: bool,
    skipped: tuple[tuple[str, str], ...],
) -> CrystalDataset:
    """Return the concatenated dataset of processed crystals."""
    def cat(arrays: list[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)

    edges_i = [c.edge_index for c in crystals] if with_graph else []
    edges_o = [c.edge_offsets for c in crystals] if with_graph else []
    return CrystalDataset(
        name=info.name,
        property_column=info.property_column,
        material_id=np.asarray(ids, dtype=str),
        num_atoms=np.array([c.num_atoms for c in crystals], dtype=np.int32),
        atomic_numbers=cat([c.atomic_numbers for c in crystals], (0,), np.int32),
        frac_coords=cat([c.frac_coords for c in crystals], (0, 3), np.float64),
        lengths=np.stack([c.lengths for c in crystals]).astype(np.float64),
        angles=np.stack([c.angles for c in crystals]).astype(np.float64),
        properties=props.astype(np.float64),
        edge_index=cat(edges_i, (0, 2), np.int32),
        edge_offsets=cat(edges_o, (0, 3), np.int32),
        num_edges=np.array([len(e) for e in edges_i] if with_graph else [0] * len(crystals), dtype=np.int32),
        has_graph=with_graph,
        skipped=skipped,
    )
