"""CDVAE evaluation: validity verdicts, fingerprints, coverage and EMDs, against the test splits and by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pymatgen.core import Composition, Element

from symat_jax import metrics
from symat_jax.crystals import CrystalSet
from symat_jax.metrics import build_crystal, min_periodic_distance, smact_validity, structure_validity


def _z(formula: str) -> list[int]:
    """Return one atomic number per atom of a formula."""
    return [Element(el).Z for el, n in Composition(formula).items() for _ in range(int(n))]


def _crystal_set(crystals: list[tuple[list[int], list[float], list[float], list[list[float]]]], rejected: int = 0) -> CrystalSet:
    """Return a CrystalSet of hand-made ``(atomic numbers, lengths, angles, frac)`` crystals."""
    return CrystalSet(
        np.array([len(z) for z, *_ in crystals]),
        np.concatenate([np.asarray(z) for z, *_ in crystals]),
        np.concatenate([np.asarray(f, float) for *_, f in crystals]),
        np.array([l for _, l, _, _ in crystals], float),
        np.array([a for _, _, a, _ in crystals], float),
        rejected,
    )


@pytest.fixture(scope="session")
def scaler(data_root) -> metrics.CompScaler:
    """Return the composition scaler shipped with the data."""
    return metrics.CompScaler.from_json(data_root / "comp_scaler.json")


@pytest.fixture(scope="session")
def self_reports(test_splits, scaler, cache_dir):
    """Return ``{dataset: report}`` of each full test split scored against itself."""
    out = {}
    for name, data in test_splits.items():
        crystals = data.crystal_set()
        out[name] = metrics.evaluate(crystals, crystals, name, scaler, workers=2, progress=False, cache_dir=cache_dir)
    return out


# ----------------------------------------------------------------------------
# Structure validity.

def test_close_atoms_and_bad_cells_are_invalid(test_splits):
    close = build_crystal([6, 6], [4.0, 4.0, 4.0], [90, 90, 90], [[0, 0, 0], [0.05, 0, 0]])  # 0.2 A apart
    assert abs(min_periodic_distance(close) - 0.2) < 1e-6
    image = build_crystal([6, 6], [4.0, 4.0, 4.0], [90, 90, 90], [[0.02, 0, 0], [0.98, 0, 0]])  # 0.16 A via the image
    flat = build_crystal([6], [4.0, 4.0, 0.001], [90, 90, 90], [[0, 0, 0]])  # volume 0.016 A^3
    negative = build_crystal([6], [-4.0, 4.0, 4.0], [90, 90, 90], [[0, 0, 0]])
    nan = build_crystal([6], [4.0, 4.0, 4.0], [90, 90, 90], [[np.nan, 0, 0]])
    assert flat is None and negative is None and nan is None
    assert list(structure_validity([close, image, flat, negative])) == [False, False, False, False]
    data = test_splits["carbon_24"]
    real = [build_crystal(c.atomic_numbers, c.lengths, c.angles, c.frac_coords) for c in list(data)[:50]]
    assert structure_validity(real).all()  # the test split itself is valid


# ----------------------------------------------------------------------------
# Composition validity (SMACT, CDVAE's rules).

@pytest.mark.parametrize("formula, valid", [
    ("NaCl", True), ("NaCl2", False), ("CaTiO3", True), ("SrTiO3", True), ("Na2O", True), ("KF2", False),
    ("Fe", True), ("C", True),                 # one element
    ("FeNi3", True), ("CuZn", True),           # all metals: alloys
    ("O3", True), ("NaO", True),               # O has -1 (peroxide) in the SMACT 1.4 list
    ("Na4Cl4", True),                          # counts reduced by their gcd first
    ("PmCl3", True),                           # Pm has no Pauling electronegativity: the test passes (SMACT 1.x)
    ("PmCl5", False),                          # ... but charge neutrality is still required
    ("HeO", False),                            # no oxidation states for He
    ("ClNa", True), ("OCs2", True), ("FO2", False),
])
def test_known_smact_verdicts(formula, valid):
    assert smact_validity(_z(formula)) is valid
    assert smact_validity(list(reversed(_z(formula)))) is valid  # order of atoms is irrelevant


def test_smact_verdicts_agree_with_smact_library_on_perovskites(test_splits):
    """SMACT 4's own screening with the 1.4 oxidation states agrees wherever every element has an electronegativity."""
    from smact.screening import smact_validity as library

    data = test_splits["perov_5"]
    verdicts = []
    for c in data:
        z, n = np.unique(c.atomic_numbers, return_counts=True)
        comp = Composition({Element.from_Z(int(a)).symbol: int(k) for a, k in zip(z, n)})
        assert smact_validity(c.atomic_numbers) == library(comp, oxidation_states_set="smact14"), comp
        verdicts.append(smact_validity(c.atomic_numbers))
    # SPEC 5: 98.4% of Perov-5's test.csv is composition-valid under these rules.
    assert abs(np.mean(verdicts) - 0.984) < 0.003


# ----------------------------------------------------------------------------
# Whole reports.

def test_test_split_against_itself(self_reports):
    c24 = self_reports["carbon_24"]
    assert c24["struct_validity"] == 1.0 and c24["comp_validity"] == 1.0 and c24["validity"] == 1.0
    for name, report in self_reports.items():
        assert report["cov_recall"] == 1.0 and report["cov_precision"] == 1.0, name
        assert report["cov_recall_symat"] == 1.0 and report["cov_precision_symat"] == 1.0, name
        assert report["cov_precision_struct_only"] == 1.0 and report["cov_recall_comp_only"] == 1.0, name
        assert report["num_atoms_emd"] == 0.0 or name == "perov_5"
    assert c24["density_emd"] < 1e-12 and c24["num_elements_emd"] == 0.0 and c24["num_atoms_emd"] == 0.0
    assert c24["property_emd"] is None and c24["num_property_samples"] == 200
    # Perov-5: the ~1.6% composition-invalid crystals leave the generated side only: small, not zero.
    p5 = self_reports["perov_5"]
    assert 0.98 < p5["comp_validity"] < 0.99
    assert 0 < p5["density_emd"] < 0.05 and 0 < p5["num_elements_emd"] < 0.02


def test_invalid_crystals_and_rejects_count_against_the_sample(test_splits, scaler, cache_dir):
    nacl = (_z("NaCl"), [5.6, 5.6, 5.6], [90, 90, 90], [[0, 0, 0], [0.5, 0.5, 0.5]])
    close = (_z("NaCl"), [5.6, 5.6, 5.6], [90, 90, 90], [[0, 0, 0], [0.03, 0.0, 0.0]])  # 0.17 A apart
    nacl2 = (_z("NaCl2"), [5.6, 5.6, 5.6], [90, 90, 90], [[0, 0, 0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]])
    flat = (_z("NaCl"), [5.6, 5.6, 1e-4], [90, 90, 90], [[0, 0, 0], [0.5, 0.5, 0.5]])  # not constructed
    generated = _crystal_set([nacl, close, nacl2, flat], rejected=1)
    ref = test_splits["perov_5"].crystal_set().subset(np.arange(40))
    report = metrics.evaluate(generated, ref, "perov_5", scaler, workers=1, progress=False, cache_dir=cache_dir)
    assert report["num_samples"] == 5
    assert report["struct_validity"] == pytest.approx(2 / 5)  # NaCl and NaCl2
    assert report["comp_validity"] == pytest.approx(3 / 5)  # NaCl, close NaCl, flat NaCl
    assert report["validity"] == pytest.approx(1 / 5) and report["num_valid"] == 1
    assert report["num_with_fingerprint"] == 3  # the flat cell has none
    assert report["num_property_samples"] == 1


def test_coverage_matches_a_slow_reference(scaler):
    rng = np.random.default_rng(0)

    struct_centres = rng.uniform(0, 1, (25, metrics.STRUCT_FP_SIZE))
    comp_centres = rng.normal(0, 1, (25, metrics.COMP_FP_SIZE))

    def scores(n: int, noise: np.ndarray, fp_ok: np.ndarray | None = None) -> metrics.CrystalScores:
        # Crystals near the 25 centres at per-crystal noise levels; structure and
        # composition draw their centres independently, so their minima differ.
        ok = np.ones(n, bool) if fp_ok is None else fp_ok
        s_c, c_c = rng.integers(0, 25, n), rng.integers(0, 25, n)
        struct = struct_centres[s_c] + noise[:, None] * rng.normal(0, 1, (n, metrics.STRUCT_FP_SIZE)) / 8
        comp = comp_centres[c_c] + noise[:, None] * rng.normal(0, 1, (n, metrics.COMP_FP_SIZE)) / 12
        return metrics.CrystalScores(
            constructed=ok, struct_valid=ok, comp_valid=ok, has_fingerprint=ok, struct_fp=struct,
            comp_fp=scaler.means + scaler.stds * comp, density=rng.uniform(1, 3, n),
            num_elements=np.ones(n, int), num_atoms=np.full(n, 4),
        )

    gen = scores(30, rng.uniform(0, 1, 30), fp_ok=np.arange(30) % 7 != 0)
    ref = scores(25, np.zeros(25))
    cut_s, cut_c = 0.5, 0.5
    got = metrics.coverage(gen, ref, scaler, cut_s, cut_c, num_generated=33)

    def dist(a, b):
        return float(np.sqrt(np.sum((a - b) ** 2)))

    gen_ids = [i for i in range(30) if gen.has_fingerprint[i]]
    comp = lambda s, i: (s.comp_fp[i] - scaler.means) / scaler.stds  # noqa: E731
    hits_r, struct_r, comp_r = 0, 0, 0
    for j in range(25):
        ds = min(dist(gen.struct_fp[i], ref.struct_fp[j]) for i in gen_ids)
        dc = min(dist(comp(gen, i), comp(ref, j)) for i in gen_ids)
        hits_r += ds <= cut_s and dc <= cut_c
        struct_r, comp_r = struct_r + (ds <= cut_s), comp_r + (dc <= cut_c)
    hits_p, struct_p, comp_p = 0, 0, 0
    for i in gen_ids:
        ds = min(dist(gen.struct_fp[i], ref.struct_fp[j]) for j in range(25))
        dc = min(dist(comp(gen, i), comp(ref, j)) for j in range(25))
        hits_p += ds <= cut_s and dc <= cut_c
        struct_p, comp_p = struct_p + (ds <= cut_s), comp_p + (dc <= cut_c)
    assert 0 < hits_r < 25 and 0 < hits_p < len(gen_ids)  # the cut-offs really split the set
    assert got["cov_recall"] == pytest.approx(hits_r / 25)
    assert got["cov_precision"] == pytest.approx(hits_p / 33)
    # One side alone (the other cut-off open), as the report's *_struct_only / *_comp_only keys use it.
    assert hits_p < min(struct_p, comp_p)  # each side misses crystals the other keeps
    for cuts, (want_r, want_p) in (((cut_s, np.inf), (struct_r, struct_p)), ((np.inf, cut_c), (comp_r, comp_p))):
        one = metrics.coverage(gen, ref, scaler, *cuts, num_generated=33)
        assert one["cov_recall"] == pytest.approx(want_r / 25) and one["cov_precision"] == pytest.approx(want_p / 33)


def test_scaler_replaces_nan_and_checks_its_file(scaler, tmp_path):
    x = scaler.means.copy()
    x[3] = np.nan
    out = scaler.transform(x[None])
    assert out[0, 3] == 0.0 and np.allclose(out, 0.0)
    (tmp_path / "bad.json").write_text(json.dumps({"means": [0.0], "stds": [1.0]}))
    with pytest.raises(ValueError, match="bad.json"):
        metrics.CompScaler.from_json(tmp_path / "bad.json")


# ----------------------------------------------------------------------------
# Crystal sets from samples.npz.

def test_samples_npz_in_cdvae_layout(tmp_path, test_splits):
    cs = test_splits["carbon_24"].crystal_set().subset(np.arange(5))
    arrays = dict(num_atoms=cs.num_atoms, atom_types=cs.atom_types, frac_coords=cs.frac_coords,
                  lengths=cs.lengths, angles=cs.angles)
    np.savez(tmp_path / "ours.npz", **arrays)
    # CDVAE's own files carry a leading evaluation axis.
    np.savez(tmp_path / "cdvae.npz", **{k: v[None] for k, v in arrays.items()})
    (tmp_path / "rejects.json").write_text(json.dumps([{"index": 7, "reason": "too many atoms"}]))
    for name in ("ours.npz", "cdvae.npz"):
        loaded = CrystalSet.from_samples(tmp_path / name)
        assert loaded.digest() == cs.digest() and loaded.num_rejected == 1
    np.savez(tmp_path / "broken.npz", num_atoms=cs.num_atoms, atom_types=cs.atom_types)
    with pytest.raises(ValueError, match="broken.npz"):
        CrystalSet.from_samples(tmp_path / "broken.npz")
    np.savez(tmp_path / "short.npz", **{**arrays, "atom_types": cs.atom_types[:-1]})
    with pytest.raises(ValueError, match="short.npz"):
        CrystalSet.from_samples(tmp_path / "short.npz")
    with pytest.raises(FileNotFoundError):
        CrystalSet.from_samples(tmp_path / "missing")


def test_scores_are_cached_per_chunk(test_splits, tmp_path, monkeypatch):
    crystals = test_splits["perov_5"].crystal_set().subset(np.arange(10))
    whole = metrics.score_crystals(crystals, workers=1, progress=False, cache_dir=tmp_path, chunk_size=4)
    assert len(list(tmp_path.glob("scores-*.npz"))) == 3  # chunks of 4, 4, 2
    calls = []
    real = metrics.hostpool.parallel_map
    monkeypatch.setattr(metrics.hostpool, "parallel_map", lambda fn, items, **kw: calls.append(len(items)) or real(fn, items, **kw))
    (sorted(tmp_path.glob("scores-*.npz"))[0]).unlink()  # as if killed before that chunk was written
    again = metrics.score_crystals(crystals, workers=1, progress=False, cache_dir=tmp_path, chunk_size=4)
    assert len(calls) == 1 and calls[0] in (2, 4)  # only the missing chunk is scored again
    np.testing.assert_array_equal(again.struct_fp, whole.struct_fp)
    np.testing.assert_array_equal(again.comp_valid, whole.comp_valid)
