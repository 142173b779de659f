"""Datasets: canonical form against the reference, bad rows, caching, the registry and targets."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from pymatgen.analysis.local_env import CrystalNN
from pymatgen.core import Composition, Structure

from symat_jax.data import (
    DatasetNotFoundError,
    center_frac_coords,
    dataset as dataset_mod,
    read_csv,
    registry,
    resolve_data_root,
    split_path,
)

from conftest import csv_rows, write_csv


def _golden_split(golden, name):
    return {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(name + "/")}


@pytest.mark.parametrize("name", ["carbon_24", "perov_5"])
def test_canonical_form_matches_reference(test_splits, golden, name):
    data = test_splits[name]
    g = _golden_split(golden, name)
    n = len(g["num_atoms"])
    np.testing.assert_array_equal(data.material_id[:n], g["material_id"].astype(str))
    np.testing.assert_array_equal(data.num_atoms[:n], g["num_atoms"])
    np.testing.assert_allclose(data.lengths[:n], g["lengths"], rtol=1e-6)
    np.testing.assert_allclose(data.angles[:n], g["angles"], atol=1e-5)
    starts = np.concatenate([[0], np.cumsum(g["num_atoms"])])
    exact = 0
    for c in range(n):
        mine = data.crystal(c)
        ref = g["frac_coords"][starts[c] : starts[c + 1]]
        np.testing.assert_array_equal(mine.atomic_numbers, g["atomic_numbers"][starts[c] : starts[c + 1]])
        if np.allclose(mine.frac_coords, ref, atol=1e-5):
            exact += 1
            continue
        # Otherwise a tie of the spread at the CIF's 8-digit precision: the
        # reference picked another, equally compact, centring. Same atoms per
        # axis up to integer shifts and one common translation, same spread.
        diff = mine.frac_coords - ref
        diff = diff - diff[0]
        np.testing.assert_allclose(diff - np.round(diff), 0.0, atol=1e-5)
        np.testing.assert_allclose(np.ptp(mine.frac_coords, 0), np.ptp(ref, 0), atol=1e-6)
    assert exact >= n - 1, f"only {exact} of {n} crystals match the reference exactly"


def test_center_frac_coords_picks_the_most_compact_shift():
    rng = np.random.default_rng(0)
    for _ in range(50):
        f = rng.uniform(0, 1, size=(int(rng.integers(1, 12)), 3))
        out = center_frac_coords(f)
        diff = out - f
        diff = diff - diff[0]  # one translation per axis, otherwise only periodic images
        np.testing.assert_allclose(diff - np.round(diff), 0, atol=1e-12)
        np.testing.assert_allclose(out.max(0) + out.min(0), 0, atol=1e-12)  # centred
        for axis in range(3):  # the most compact of the n cyclic shifts:
            s = np.sort(np.mod(f[:, axis], 1))
            best = min([s[-1] - s[0]] + [s[m - 1] + 1 - s[m] for m in range(1, len(s))])
            assert np.ptp(out[:, axis]) == pytest.approx(best, abs=1e-9)


def test_targets_match_pymatgen_composition(test_splits):
    data = test_splits["perov_5"]
    counts = data.element_counts()
    for i in range(0, len(data), 37):
        comp = Composition(data.crystal(i).to_structure().composition)
        expect = np.zeros(100, int)
        for el, amount in comp.items():
            expect[el.Z - 1] = int(amount)
        np.testing.assert_array_equal(counts[i], expect)
        assert data.num_elements()[i] == len(comp)
    np.testing.assert_array_equal(data.element_multi_hot().sum(1), data.num_elements())
    np.testing.assert_allclose(data.scaled_lengths() * np.cbrt(data.num_atoms)[:, None], data.lengths)
    assert np.all(np.isfinite(data.properties))


# ----------------------------------------------------------------------------
# Bad rows.

def _bad_rows(data_root):
    good = csv_rows(data_root / "carbon_24" / "test.csv")[:3]
    template = good[0]["cif"]
    big = Structure.from_str(template, fmt="cif") * (2, 2, 2)  # 10 * 8 = 80 atoms > 24
    rows = [dict(good[0]), dict(good[1])]
    def bad(mid, cif):
        return dict(good[2], material_id=mid, cif=cif)
    rows += [
        bad("garbage", "this is not a CIF"),
        bad("empty", ""),
        bad("element-101", template.replace("  C  C0", "  Md  Md0").replace("_chemical_formula_sum   C", "_x x")),
        bad("too-many", big.to(fmt="cif")),
        bad("nan-lattice", _set_param(template, "_cell_length_a", "nan")),
        bad("flat-cell", _set_param(_set_param(_set_param(template, "_cell_angle_alpha", "60"),
                                               "_cell_angle_beta", "60"), "_cell_angle_gamma", "120")),
        bad("thin-cell", _set_param(template, "_cell_length_c", "0.0001")),
        dict(good[2]),
    ]
    return rows


def _set_param(cif: str, key: str, value: str) -> str:
    lines = [f"{key}   {value}" if line.startswith(key + " ") else line for line in cif.splitlines()]
    return "\n".join(lines) + "\n"


def test_bad_rows_are_skipped_with_one_warning_each(data_root, tmp_path, caplog):
    path = write_csv(tmp_path / "bad.csv", _bad_rows(data_root))
    with caplog.at_level(logging.WARNING, logger="symat_jax.data.dataset"):
        data = read_csv(path, "carbon_24", with_graph=False, cache_dir=tmp_path, progress=False)
    assert len(data) == 3
    reasons = dict(data.skipped)
    assert set(reasons) == {"garbage", "empty", "element-101", "too-many", "nan-lattice", "flat-cell", "thin-cell"}
    assert "unparsable" in reasons["garbage"]
    assert "Z=101" in reasons["element-101"]
    assert "80 atoms" in reasons["too-many"] and "max_atoms=24" in reasons["too-many"]
    assert "degenerate" in reasons["flat-cell"] and "degenerate" in reasons["thin-cell"]
    assert "NaN" in reasons["nan-lattice"]
    messages = [r.getMessage() for r in caplog.records]
    for mid in reasons:
        assert sum(f"skipped {mid}:" in m for m in messages) == 1
    assert any("skipped 7 of 10 rows" in m for m in messages)
    # The good rows are the canonical crystals the clean file gives.
    clean = read_csv(data_root / "carbon_24" / "test.csv", "carbon_24", with_graph=False, cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(data.frac_coords, clean.subset([0, 1, 2]).frac_coords)


def test_a_file_without_usable_rows_is_an_error(data_root, tmp_path):
    rows = [r for r in _bad_rows(data_root) if r["material_id"] in ("garbage", "flat-cell")]
    path = write_csv(tmp_path / "allbad.csv", rows)
    with pytest.raises(ValueError, match="no usable row.*allbad.csv|allbad.csv.*no usable row"):
        read_csv(path, "carbon_24", with_graph=False, cache_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------
# Cache, parallel processing, encoder graph.

def test_cache_is_used_and_keyed_by_content(data_root, tmp_path, monkeypatch):
    rows = csv_rows(data_root / "perov_5" / "test.csv")[:40]
    path = write_csv(tmp_path / "small.csv", rows)
    first = read_csv(path, "perov_5", cache_dir=tmp_path / "c", num_workers=2, progress=False)
    assert first.has_graph and first.num_edges.sum() > 0

    def fail(*args, **kwargs):
        raise AssertionError("processed again although cached")

    monkeypatch.setattr(dataset_mod.hostpool, "parallel_map", fail)
    t0 = time.perf_counter()
    second = read_csv(path, "perov_5", cache_dir=tmp_path / "c", progress=False)
    assert time.perf_counter() - t0 < 2.0
    np.testing.assert_array_equal(second.edge_index, first.edge_index)
    np.testing.assert_array_equal(second.frac_coords, first.frac_coords)
    # The graph cache also serves a request without the graph.
    read_csv(path, "perov_5", with_graph=False, cache_dir=tmp_path / "c", progress=False)

    write_csv(path, rows[:39])  # edited file: must be processed again
    with pytest.raises(AssertionError, match="processed again"):
        read_csv(path, "perov_5", cache_dir=tmp_path / "c", progress=False)


def test_encoder_graph_is_crystalnn_in_both_directions(data_root, tmp_path):
    rows = csv_rows(data_root / "carbon_24" / "test.csv")[:6] + csv_rows(data_root / "perov_5" / "test.csv")[:2]
    path = write_csv(tmp_path / "mix.csv", rows)
    data = read_csv(path, "carbon_24", cache_dir=tmp_path, progress=False)
    nn = CrystalNN(distance_cutoffs=None, x_diff_weight=-1, porous_adjustment=False)
    for crystal in data:
        s = crystal.to_structure()
        rows_ = [(int(a), int(b), *map(int, o)) for (a, b), o in zip(crystal.edge_index, crystal.edge_offsets)]
        edges = set(rows_)
        assert len(edges) == len(rows_)  # no bond twice
        # CrystalNN is not symmetric: the graph holds a bond when either end lists the other.
        expect = set()
        for i in range(len(s)):
            for info in nn.get_nn_info(s, i):
                j, o = int(info["site_index"]), tuple(int(x) for x in info["image"])
                expect.add((j, i, *o))
                expect.add((i, j, *(-x for x in o)))
        assert edges == expect
        lat = s.lattice.matrix
        x = s.cart_coords
        vec = x[crystal.edge_index[:, 1]] - x[crystal.edge_index[:, 0]] - crystal.edge_offsets @ lat
        assert np.all(np.linalg.norm(vec, axis=1) < 5.0)  # bonds, not stray images


# ----------------------------------------------------------------------------
# Registry.

def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.DATA_ROOT_ENV, raising=False)
    assert str(resolve_data_root()) == "data"
    monkeypatch.setenv(registry.DATA_ROOT_ENV, str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert str(resolve_data_root("elsewhere")) == "elsewhere"


def test_missing_split_offline_says_where_to_put_it(monkeypatch, tmp_path):
    # Port 9 on loopback refuses at once: the download fails as it would offline.
    monkeypatch.setenv(registry.DOWNLOAD_URL_ENV, "http://127.0.0.1:9/cdvae")
    with pytest.raises(DatasetNotFoundError) as err:
        split_path("mp_20", "train", tmp_path, timeout=5)
    msg = str(err.value)
    assert str(tmp_path / "mp_20" / "train.csv") in msg and "--data-root" in msg
    assert not (tmp_path / "mp_20" / "train.csv").exists()
    with pytest.raises(ValueError, match="unknown dataset"):
        split_path("mp_21", "train", tmp_path)


def test_existing_split_is_found(data_root):
    assert split_path("perov_5", "val", data_root) == data_root / "perov_5" / "val.csv"


def test_duplicate_ids_and_missing_properties_are_reported_and_kept(data_root, tmp_path, caplog):
    rows = csv_rows(data_root / "carbon_24" / "test.csv")[:6]
    rows[1] = dict(rows[1], material_id=rows[0]["material_id"])
    rows[2] = dict(rows[2], energy_per_atom="")
    rows[3] = dict(rows[3], energy_per_atom="abc")
    caplog.set_level(logging.WARNING)
    data = read_csv(write_csv(tmp_path / "x.csv", rows), "carbon_24", with_graph=False, cache_dir=tmp_path,
                    progress=False)
    assert len(data) == 6 and int(np.isnan(data.properties).sum()) == 2
    text = caplog.text
    assert f"material_id {rows[0]['material_id']} is used by 2 rows" in text
    assert "2 rows have no numeric energy_per_atom" in text and rows[3]["material_id"] in text
