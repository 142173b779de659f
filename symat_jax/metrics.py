"""Evaluation metrics of generated crystals: the CDVAE protocol (SPEC 5); host-side (pymatgen, SMACT, matminer).

Per crystal (:func:`score_crystal`, run in parallel by :func:`score_crystals`
and cached by content): construction, structure validity, SMACT composition
validity, CrystalNN "ops" and Magpie fingerprints, density, number of
elements. Over sets: :func:`coverage` (COV-R / COV-P) and
:func:`property_statistics` (earth mover's distances); :func:`evaluate`
puts them together into the report ``symat evaluate`` writes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import pathlib
import warnings
from typing import Callable, Sequence

import numpy as np
from pymatgen.core import Composition, Element, Structure
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance

from symat_jax import hostpool
from symat_jax.crystals import CrystalSet
from symat_jax.data import registry
from symat_jax.data.canonical import to_structure
from symat_jax.files import UNREADABLE_NPZ, read_json, set_aside
from symat_jax.geometry import cell_defect

log = logging.getLogger(__name__)

MIN_DISTANCE = 0.5  # A: shortest allowed interatomic distance
STRUCT_FP_SIZE = 61  # CrystalNNFingerprint "ops" features per site
COMP_FP_SIZE = 132  # Magpie ElementProperty features
PROPERTY_SAMPLES = 1000  # valid generated crystals drawn for the property statistics
# Bump when a per-crystal score changes: older fingerprint caches are then ignored.
SCORE_CACHE_VERSION = 1

# (structure, composition) fingerprint-distance cut-offs of COV-R / COV-P.
COV_CUTOFFS: dict[str, dict[str, tuple[float, float]]] = {
    # CDVAE / DiffCSP evaluation code: every published CDVAE and DiffCSP row.
    "cdvae": {"carbon_24": (0.2, 4.0), "perov_5": (0.2, 4.0), "mp_20": (0.4, 10.0)},
    # SyMat's own evaluation code.
    "symat": {"carbon_24": (1.0, 4.0), "perov_5": (0.8, 6.0), "mp_20": (0.6, 12.0)},
}


# ----------------------------------------------------------------------------
# One crystal.


def build_crystal(atom_types: np.ndarray, lengths: np.ndarray, angles: np.ndarray, frac: np.ndarray) -> Structure | None:
    """Return the pymatgen Structure of a generated crystal, or None when CDVAE would not construct it."""
    # CDVAE: a negative length, a failed construction or a volume under 0.1 A^3 is "not constructed".
    if cell_defect(lengths, angles) is not None or not np.all(np.isfinite(frac)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = to_structure(atom_types, lengths, angles, frac)
    except Exception:  # pymatgen raises several types on impossible cells and unknown elements
        return None
    return s


def min_periodic_distance(structure: Structure) -> float:
    """Return the smallest off-diagonal entry of pymatgen's periodic distance matrix (inf for one atom)."""
    d = structure.distance_matrix
    if len(d) < 2:
        return float("inf")
    return float(np.min(d + np.diag(np.full(len(d), np.inf))))


def is_structure_valid(structure: Structure | None) -> bool:
    """Return whether a crystal is constructed and its shortest periodic distance is >= 0.5 A (CDVAE)."""
    return structure is not None and min_periodic_distance(structure) >= MIN_DISTANCE


def structure_validity(structures: list[Structure | None]) -> np.ndarray:
    """Return ``[c]`` bool: :func:`is_structure_valid` of each crystal."""
    return np.array([is_structure_valid(s) for s in structures], bool)


@functools.lru_cache(maxsize=None)
def _smact_data(symbol: str) -> tuple[tuple[int, ...], float | None, bool]:
    """Return ``(SMACT 1.4 oxidation states, Pauling electronegativity or None, is a SMACT metal)`` of an element."""
    import smact

    el = smact.Element(symbol)
    return tuple(el.oxidation_states_smact14 or ()), el.pauling_eneg, symbol in smact.metals


def _pauling_ok(ox_states: Sequence[int], enegs: Sequence[float | None]) -> bool:
    """Return SMACT 1.x's electronegativity test: cations less electronegative than anions.

    The pairs are checked in order, as SMACT 1.x did; the first opposite-sign
    pair with a missing electronegativity raised TypeError there, which CDVAE
    counted as a pass, so it passes here (SMACT 4 fails it instead).
    """
    for (ox1, en1), (ox2, en2) in itertools.combinations(zip(ox_states, enegs), 2):
        if (ox1 > 0 and ox2 < 0) or (ox1 < 0 and ox2 > 0):
            if en1 is None or en2 is None:
                return True
            if (ox1 > 0 and en1 >= en2) or (ox1 < 0 and en1 <= en2):
                return False
    return True


@functools.lru_cache(maxsize=65536)
def _smact_valid_reduced(symbols: tuple[str, ...], counts: tuple[int, ...]) -> bool:
    """Return the SMACT verdict of a composition given as sorted symbols and gcd-reduced counts."""
    if len(symbols) == 1:
        return True
    data = [_smact_data(s) for s in symbols]
    if all(metal for _, _, metal in data):
        return True
    ox_lists = [ox for ox, _, _ in data]
    if any(len(ox) == 0 for ox in ox_lists):
        return False
    enegs = [en for _, en, _ in data]
    for ox_states in itertools.product(*ox_lists):
        if sum(o * c for o, c in zip(ox_states, counts)) == 0 and _pauling_ok(ox_states, enegs):
            return True
    return False


def smact_validity(atomic_numbers: Sequence[int]) -> bool:
    """Return whether a composition (one atomic number per atom) passes CDVAE's SMACT test.

    Element counts divided by their gcd; one element or all metals: valid;
    else some combination of SMACT-1.4 oxidation states must be charge
    neutral with those counts and pass the Pauling test.
    """
    z, n = np.unique(np.asarray(atomic_numbers, int), return_counts=True)
    if len(z) == 0:
        return False
    n = n // np.gcd.reduce(n)
    try:
        symbols = tuple(Element.from_Z(int(x)).symbol for x in z)
    except ValueError:
        return False
    return _smact_valid_reduced(symbols, tuple(int(c) for c in n))


@functools.lru_cache(maxsize=1)
def _featurizers():
    """Return the matminer ``(CrystalNNFingerprint "ops", ElementProperty "magpie")`` featurizers (built once per process)."""
    from matminer.featurizers.composition.composite import ElementProperty
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

    return CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")


@dataclasses.dataclass(frozen=True)
class CrystalScore:
    """Per-crystal results of :func:`score_crystal` (NaN fingerprints where they could not be computed)."""

    constructed: bool
    struct_valid: bool
    comp_valid: bool
    has_fingerprint: bool
    struct_fp: np.ndarray  # [61]
    comp_fp: np.ndarray  # [132], raw (not standardised)
    density: float  # g/cm^3, NaN when not constructed
    num_elements: int
    num_atoms: int


def score_crystal(crystal: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> CrystalScore:
    """Return the CDVAE per-crystal scores of ``(atom_types, lengths, angles, frac_coords)``."""
    atom_types, lengths, angles, frac = crystal
    structure = build_crystal(atom_types, lengths, angles, frac)
    comp_valid = smact_validity(atom_types)
    struct_fp = np.full(STRUCT_FP_SIZE, np.nan)
    comp_fp = np.full(COMP_FP_SIZE, np.nan)
    has_fp = False
    site_fp, comp_featurizer = _featurizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            elements = {Element.from_Z(int(z)).symbol: int(c) for z, c in zip(*np.unique(atom_types, return_counts=True))}
            comp_fp = np.asarray(comp_featurizer.featurize(Composition(elements)), float)
        except Exception:  # unknown elements: no composition fingerprint, so no fingerprint at all
            structure_ok = False
        else:
            structure_ok = structure is not None
        if structure_ok:
            try:
                sites = [site_fp.featurize(structure, i) for i in range(len(structure))]
                struct_fp = np.asarray(sites, float).mean(axis=0)
                has_fp = True
            except Exception:  # CDVAE: a crystal whose site fingerprint raises counts as invalid
                has_fp = False
    return CrystalScore(
        constructed=structure is not None,
        struct_valid=is_structure_valid(structure),
        comp_valid=bool(comp_valid),
        has_fingerprint=has_fp,
        struct_fp=struct_fp,
        comp_fp=comp_fp,
        density=float(structure.density) if structure is not None else float("nan"),
        num_elements=int(len(np.unique(atom_types))),
        num_atoms=int(len(atom_types)),
    )


# ----------------------------------------------------------------------------
# Many crystals, in parallel and cached.


@dataclasses.dataclass(frozen=True)
class CrystalScores:
    """:class:`CrystalScore` of many crystals as arrays ``[c, ...]``."""

    constructed: np.ndarray
    struct_valid: np.ndarray
    comp_valid: np.ndarray
    has_fingerprint: np.ndarray
    struct_fp: np.ndarray  # [c, 61]
    comp_fp: np.ndarray  # [c, 132]
    density: np.ndarray
    num_elements: np.ndarray
    num_atoms: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """Return ``[c]`` bool: structure- and composition-valid with fingerprints (CDVAE's ``valid``)."""
        return self.struct_valid & self.comp_valid & self.has_fingerprint

    def __len__(self) -> int:
        """Return the number of crystals."""
        return len(self.constructed)

    def save(self, path: str | os.PathLike) -> None:
        """Write the arrays to an ``.npz`` file."""
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CrystalScores":
        """Return scores read from :meth:`save`'s file."""
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def stack(cls, rows: Sequence[CrystalScore]) -> "CrystalScores":
        """Return the scores of ``rows`` as arrays."""
        if not rows:
            return cls(*(np.zeros(0, bool) for _ in range(4)), np.zeros((0, STRUCT_FP_SIZE)),
                       np.zeros((0, COMP_FP_SIZE)), np.zeros(0), np.zeros(0, int), np.zeros(0, int))
        return cls(**{f.name: np.stack([getattr(r, f.name) for r in rows]) for f in dataclasses.fields(cls)})


def score_crystals(
    crystals: CrystalSet,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    desc: str = "fingerprints",
    chunk_size: int = 2048,
) -> CrystalScores:
    """Return the per-crystal scores of a set, computed in parallel (all cores) and cached by content.

    The set is scored in chunks of ``chunk_size`` crystals, each cached on its
    own, so an interrupted evaluation resumes from the last finished chunk.
    """
    folder = registry.cache_folder(cache_dir)
    starts = list(range(0, len(crystals), chunk_size)) or [0]
    parts = []
    for k, start in enumerate(starts):
        part = crystals.subset(np.arange(start, min(start + chunk_size, len(crystals))))
        path = folder / f"scores-v{SCORE_CACHE_VERSION}-{part.digest()[:24]}.npz"
        scores = _load_scores(path, len(part)) if cache else None
        if scores is None:
            label = desc if len(starts) == 1 else f"{desc} {k + 1}/{len(starts)}"
            rows = hostpool.parallel_map(score_crystal, [part.crystal(i) for i in range(len(part))],
                                         workers=workers, progress=progress, desc=label, max_chunk=4)
            scores = CrystalScores.stack(rows)
            if cache:
                _save_scores(scores, path)
        parts.append(scores)
    if len(parts) == 1:
        return parts[0]
    return CrystalScores(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                            for f in dataclasses.fields(CrystalScores)})


def _load_scores(path: pathlib.Path, expected: int) -> CrystalScores | None:
    """Return cached scores of ``expected`` crystals, or None when absent or unreadable."""
    if not path.exists():
        return None
    try:
        scores = CrystalScores.load(path)
    except UNREADABLE_NPZ as err:
        set_aside(path, err)
        return None
    return scores if len(scores) == expected else None


def _save_scores(scores: CrystalScores, path: pathlib.Path) -> None:
    """Write scores atomically (a kill leaves no half-written cache file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        scores.save(tmp)
        tmp.replace(path)
    except OSError as err:
        log.warning("could not cache fingerprints in %s (%s)", path.parent, err)


# ----------------------------------------------------------------------------
# Set metrics.


@dataclasses.dataclass(frozen=True)
class CompScaler:
    """Standardiser of Magpie composition fingerprints (CDVAE's means/stds; NaN -> 0 after scaling)."""

    means: np.ndarray
    stds: np.ndarray

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "CompScaler":
        """Return the scaler stored in ``comp_scaler.json`` (keys ``means``, ``stds``)."""
        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: the composition scaler ships beside the datasets")
        d = read_json(path, ("means", "stds"))
        try:
            means, stds = np.asarray(d["means"], float), np.asarray(d["stds"], float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: means and stds must be lists of numbers ({err})") from None
        if means.shape != (COMP_FP_SIZE,) or stds.shape != (COMP_FP_SIZE,):
            raise ValueError(f"{path}: expected {COMP_FP_SIZE} means and stds, got {means.shape} / {stds.shape}")
        return cls(means, stds)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Return standardised features, NaN replaced by 0."""
        return np.nan_to_num((np.asarray(x, float) - self.means) / self.stds, nan=0.0)


@dataclasses.dataclass(frozen=True)
class NearestDistances:
    """Fingerprint distances to the nearest crystal on the other side: ``recall_*`` per reference, ``precision_*`` per generated crystal."""

    recall_struct: np.ndarray
    recall_comp: np.ndarray
    precision_struct: np.ndarray
    precision_comp: np.ndarray


def nearest_distances(generated: CrystalScores, reference: CrystalScores, scaler: CompScaler) -> NearestDistances | None:
    """Return the nearest-neighbour distances between crystals with fingerprints (None when a side has none).

    Structure and composition minima are taken separately (CDVAE); every
    generated crystal with fingerprints takes part, valid or not.
    """
    ref = reference.has_fingerprint
    if not ref.all():
        log.warning("%d reference crystals have no fingerprint; left out of coverage", int((~ref).sum()))
    gen = generated.has_fingerprint
    if not gen.any() or not ref.any():
        return None
    struct_d = cdist(generated.struct_fp[gen], reference.struct_fp[ref])
    comp_d = cdist(scaler.transform(generated.comp_fp[gen]), scaler.transform(reference.comp_fp[ref]))
    return NearestDistances(struct_d.min(axis=0), comp_d.min(axis=0), struct_d.min(axis=1), comp_d.min(axis=1))


def coverage_from_distances(
    d: NearestDistances | None, struct_cutoff: float, comp_cutoff: float, num_generated: int
) -> dict[str, float]:
    """Return ``{"cov_recall", "cov_precision"}`` under one pair of cut-offs; COV-P divides by ``num_generated``."""
    if d is None:
        return {"cov_recall": 0.0, "cov_precision": 0.0}
    recall = (d.recall_struct <= struct_cutoff) & (d.recall_comp <= comp_cutoff)
    precision = (d.precision_struct <= struct_cutoff) & (d.precision_comp <= comp_cutoff)
    return {"cov_recall": float(recall.mean()), "cov_precision": float(precision.sum() / max(num_generated, 1))}


def coverage(
    generated: CrystalScores,
    reference: CrystalScores,
    scaler: CompScaler,
    struct_cutoff: float,
    comp_cutoff: float,
    num_generated: int | None = None,
) -> dict[str, float]:
    """Return ``{"cov_recall", "cov_precision"}`` of generated crystals against reference crystals (CDVAE).

    COV-P divides by ``num_generated`` (default: all generated crystals), so
    crystals without fingerprints count as misses.
    """
    num_generated = len(generated) if num_generated is None else num_generated
    return coverage_from_distances(nearest_distances(generated, reference, scaler), struct_cutoff, comp_cutoff,
                                   num_generated)


def property_sample(valid: np.ndarray, n: int = PROPERTY_SAMPLES, seed: int = 0) -> np.ndarray:
    """Return indices of ``n`` valid crystals drawn at random without replacement (all valid ones when fewer)."""
    idx = np.flatnonzero(valid)
    if len(idx) <= n:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))


def emd(a: np.ndarray, b: np.ndarray) -> float | None:
    """Return scipy's earth mover's distance between two samples (None when either is empty)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        return None
    return float(wasserstein_distance(a, b))


def property_statistics(
    generated: CrystalScores,
    reference: CrystalScores,
    picked: np.ndarray,
    gen_property: np.ndarray | None = None,
    ref_property: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Return EMDs of density, number of elements, atoms per cell and predicted property: ``generated[picked]`` vs all reference crystals."""
    ref = reference.constructed
    return {
        "density_emd": emd(generated.density[picked], reference.density[ref]),
        "num_elements_emd": emd(generated.num_elements[picked], reference.num_elements),
        "num_atoms_emd": emd(generated.num_atoms[picked], reference.num_atoms),
        "property_emd": None if gen_property is None or ref_property is None else emd(gen_property, ref_property),
    }


PropertyFn = Callable[[CrystalSet], np.ndarray]


def evaluate(
    generated: CrystalSet,
    reference: CrystalSet,
    dataset: str,
    scaler: CompScaler,
    property_fn: PropertyFn | None = None,
    num_property_samples: int = PROPERTY_SAMPLES,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Return the CDVAE report of ``generated`` against ``reference`` (keys as ``symat evaluate`` writes them).

    Crystals the sampler rejected (``generated.num_rejected``) count as
    generated but not constructed: invalid, and misses for COV-P.
    """
    if len(generated) + generated.num_rejected == 0:
        raise ValueError("no generated crystals to evaluate (the rates would be 0/0)")
    if len(reference) == 0:
        raise ValueError("no reference crystals to compare with")
    gen = score_crystals(generated, workers, progress, cache_dir, desc="fingerprints (generated)")
    ref = score_crystals(reference, workers, progress, cache_dir, desc="fingerprints (reference)")
    total = len(generated) + generated.num_rejected
    report: dict = {
        "dataset": dataset,
        "num_samples": total,
        "num_rejected_by_sampler": generated.num_rejected,
        "num_reference": len(reference),
        "struct_validity": float(gen.struct_valid.sum() / max(total, 1)),
        "comp_validity": float(gen.comp_valid.sum() / max(total, 1)),
        "validity": float(gen.valid.sum() / max(total, 1)),
        "num_valid": int(gen.valid.sum()),
        "num_with_fingerprint": int(gen.has_fingerprint.sum()),
    }
    distances = nearest_distances(gen, ref, scaler)
    for name, cut in COV_CUTOFFS.items():
        if dataset not in cut:
            continue
        s_cut, c_cut = cut[dataset]
        cov = coverage_from_distances(distances, s_cut, c_cut, num_generated=total)
        suffix = "" if name == "cdvae" else f"_{name}"
        report[f"cov_recall{suffix}"] = cov["cov_recall"]
        report[f"cov_precision{suffix}"] = cov["cov_precision"]
        report[f"cov_cutoffs{suffix}"] = [s_cut, c_cut]
        if name == "cdvae":
            # Each side alone under its cut-off: which of structure and composition a miss comes from.
            for side, cuts in (("struct", (s_cut, np.inf)), ("comp", (np.inf, c_cut))):
                one = coverage_from_distances(distances, *cuts, num_generated=total)
                report[f"cov_recall_{side}_only"] = one["cov_recall"]
                report[f"cov_precision_{side}_only"] = one["cov_precision"]
    picked = property_sample(gen.valid, num_property_samples, seed)
    gen_prop = ref_prop = None
    if property_fn is not None and len(picked):
        gen_prop = property_fn(generated.subset(picked))
        ref_prop = property_fn(reference.subset(np.flatnonzero(ref.constructed)))
    report.update(property_statistics(gen, ref, picked, gen_prop, ref_prop))
    report["num_property_samples"] = int(len(picked))
    if len(picked) < num_property_samples:
        log.warning("only %d valid crystals for the property statistics (protocol: %d)", len(picked), num_property_samples)
    return report


def format_report(report: dict) -> str:
    """Return a two-column text table of a :func:`evaluate` report."""
    rows = []
    for key, value in report.items():
        if isinstance(value, float):
            text = "n/a" if math.isnan(value) else f"{value:.4f}"
        elif value is None:
            text = "n/a"
        else:
            text = str(value)
        rows.append((key, text))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
