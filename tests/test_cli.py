"""Entry points on a tiny data root: ``symat preprocess`` and ``python -m experiments.train_carbon``."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import train_carbon
from symat_jax import cli
from symat_jax.data import load_split

from conftest import csv_rows, write_csv


@pytest.fixture()
def tiny_root(data_root, tmp_path):
    """Return a data root with 12 Carbon-24 crystals per split (one of them broken)."""
    for split in ("train", "val", "test"):
        rows = csv_rows(data_root / "carbon_24" / f"{split}.csv")[:12]
        rows[3] = dict(rows[3], material_id="broken-row", cif="not a cif")
        write_csv(tmp_path / "carbon_24" / f"{split}.csv", rows)
    return tmp_path


def test_symat_preprocess_fills_the_cache(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMAT_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["preprocess", "--dataset", "carbon_24", "--data-root", str(tiny_root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("11 crystals") == 3 and out.count("1 rows skipped") == 3
    cached = load_split("carbon_24", "train", tiny_root, progress=False)
    assert len(cached) == 11
    assert [mid for mid, _ in cached.skipped] == ["broken-row"] and cached.skipped[0][1].startswith("unparsable CIF")
    assert np.all(cached.num_edges > 0)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMAT_DOWNLOAD_URL", "http://127.0.0.1:9/none")
    assert cli.main(["preprocess", "--dataset", "perov_5", "--data-root", str(tmp_path), "--splits", "val"]) == 2
    assert "perov_5/val.csv" in capsys.readouterr().err


def test_train_carbon_reports_missing_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMAT_DOWNLOAD_URL", "http://127.0.0.1:9/none")
    assert train_carbon.main(["--data-root", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w")]) == 2
    assert "carbon_24/train.csv" in capsys.readouterr().err
