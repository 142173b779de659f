"""Shared fixtures: the data beside the project, loaded once per session."""

from __future__ import annotations

import csv
import os
import pathlib

import numpy as np
import pytest

from symat_jax.data import read_csv

csv.field_size_limit(1 << 30)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_root() -> pathlib.Path:
    """Return the folder holding ``shared/`` data and golden outputs."""
    env = os.environ.get("SYMAT_SHARED_DIR")
    return pathlib.Path(env) if env else REPO.parent / "shared"


SHARED = _shared_root()
DATA = SHARED / "data"
GOLDEN = SHARED / "golden" / "reference_outputs.npz"


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """Return the shared data root (skip when it is absent)."""
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """Return the reference implementation's outputs (SPEC 8)."""
    if not GOLDEN.exists():
        pytest.skip(f"golden outputs not found at {GOLDEN}")
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    """Return a session-wide cache folder (tests never write beside the shared data)."""
    return tmp_path_factory.mktemp("symat_cache")


@pytest.fixture(scope="session")
def test_splits(data_root, cache_dir):
    """Return ``{dataset: CrystalDataset}`` of both test.csv files, without encoder graphs."""
    return {
        name: read_csv(data_root / name / "test.csv", name, with_graph=False, cache_dir=cache_dir, progress=False)
        for name in ("carbon_24", "perov_5")
    }


def csv_rows(path: pathlib.Path) -> list[dict[str, str]]:
    """Return the rows of a CDVAE CSV file."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: pathlib.Path, rows: list[dict[str, str]]) -> pathlib.Path:
    """Write ``rows`` as a CDVAE CSV file and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_tiny_data(data_root: pathlib.Path, folder: pathlib.Path):
    """Return (train, val) of the tiny run: the first 24 and next 8 Carbon-24 training crystals (cached in ``folder``)."""
    rows = csv_rows(data_root / "carbon_24" / "train.csv")
    tr = read_csv(write_csv(folder / "train.csv", rows[:24]), "carbon_24", cache_dir=folder, progress=False)
    va = read_csv(write_csv(folder / "val.csv", rows[24:32]), "carbon_24", cache_dir=folder, progress=False)
    return tr, va


def make_tiny_config():
    """Return the training config of the tiny run: the tiny model, 4 epochs of batch 8."""
    import dataclasses

    from symat_jax import configs
    from test_model import CONFIG as TINY_MODEL

    base = configs.get_config("carbon_24", "quick")
    return dataclasses.replace(base, model=TINY_MODEL, batch_size=8, epochs=4, num_buckets=2, max_train=None,
                               max_val=None, learning_rate=3e-3)


def first_tiny_batch(workdir: pathlib.Path, config, data):
    """Return ``(statics, pad budgets, the first batch of 8 crystals)`` of the tiny run trained in ``workdir``."""
    from symat_jax import input_pipeline, run

    statics = run.RunStatics.from_json((workdir / "normalizers.json").read_text())
    budgets = input_pipeline.pad_budgets(data, config.batch_size, config.num_buckets, seed=0)
    batch = next(input_pipeline.epoch_batches(data, np.arange(8), budgets, 8, 24, statics.element_slots,
                                              statics.lattice))
    return statics, budgets, batch


@pytest.fixture(scope="session")
def tiny_data(data_root, tmp_path_factory):
    """Return (train, val): 24 and 8 Carbon-24 crystals."""
    return make_tiny_data(data_root, tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def tiny_config():
    """Return the training config of the tiny run."""
    return make_tiny_config()


@pytest.fixture(scope="session")
def full_run(tiny_config, tiny_data, tmp_path_factory):
    """Return ``(workdir, last record)`` of the tiny run, trained once per session (tests must not change it)."""
    from symat_jax import train

    workdir = tmp_path_factory.mktemp("run_full")
    record = train.train(tiny_config, workdir, datasets=tiny_data, progress=False)
    return workdir, record
