"""The property model (invariances, training, checkpoints) and ``symat evaluate`` / ``symat train-property`` end to end."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from symat_jax import cli, configs, evaluate_cli, property_model
from symat_jax.crystals import CrystalSet

from conftest import csv_rows, write_csv


@pytest.fixture(scope="module")
def tiny_perov(data_root, tmp_path_factory):
    """Return a data root with 48 Perov-5 crystals per split and the composition scaler."""
    root = tmp_path_factory.mktemp("tiny_perov")
    for split in ("train", "val", "test"):
        write_csv(root / "perov_5" / f"{split}.csv", csv_rows(data_root / "perov_5" / f"{split}.csv")[:48])
    shutil.copy(data_root / "comp_scaler.json", root / "comp_scaler.json")
    return root


@pytest.fixture(scope="module")
def trained(tiny_perov, tmp_path_factory):
    """Return the workdir of a quick property model trained through the command line."""
    workdir = tmp_path_factory.mktemp("prop")
    args = ["train-property", "--dataset", "perov_5", "--data-root", str(tiny_perov), "--workdir", str(workdir),
            "--preset", "quick", "--epochs", "4"]
    assert cli.main(args) == 0
    return workdir


def _random_predictor(crystals: CrystalSet) -> property_model.PropertyPredictor:
    """Return an untrained quick model with random (non-zero) weights everywhere."""
    config = configs.get_property_config("perov_5", "quick")
    images = property_model._image_range(crystals.lengths, crystals.angles, config.encoder.cutoff)
    init, _ = property_model._training(config, images, 1)
    batch, _ = next(property_model._dense_batches(crystals.dense(5), np.arange(len(crystals)), 8, {"target": np.zeros(len(crystals))}))
    params = init(jax.random.PRNGKey(0), batch).params
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    stats = property_model.PropertyStats(0.0, 1.0, images, "heat_ref")
    return property_model.PropertyPredictor(config, stats, params, batch_size=8)


def test_predictions_are_invariant_to_atom_order_translation_and_supercells(test_splits):
    crystals = test_splits["perov_5"].crystal_set().subset(np.arange(6))
    model = _random_predictor(crystals)
    base = model(crystals)
    assert np.std(base) > 1e-3  # different crystals, different predictions
    rng = np.random.default_rng(0)
    moved = []
    for i in range(len(crystals)):
        z, lengths, angles, frac = crystals.crystal(i)
        perm = rng.permutation(len(z))
        moved.append((z[perm], lengths, angles, (frac[perm] + rng.uniform(0, 1, 3)) % 1.0))
    shuffled = CrystalSet(crystals.num_atoms, np.concatenate([m[0] for m in moved]),
                          np.concatenate([m[3] for m in moved]), crystals.lengths, crystals.angles)
    np.testing.assert_allclose(model(shuffled), base, atol=2e-4)
    # A 2x1x1 supercell repeats every local environment: the per-atom mean is unchanged.
    z, lengths, angles, frac = crystals.crystal(0)
    sup_frac = np.concatenate([frac * [0.5, 1, 1], frac * [0.5, 1, 1] + [0.5, 0, 0]])
    supercell = CrystalSet(np.array([2 * len(z)]), np.concatenate([z, z]), sup_frac,
                           (lengths * [2, 1, 1])[None], angles[None])
    np.testing.assert_allclose(model(supercell), base[:1], atol=2e-4)


def test_train_property_writes_a_usable_run(trained, tiny_perov):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_mse_std"] < records[0]["train_mse_std"]  # it learns
    result = json.loads((trained / "test_metrics.json").read_text())
    assert result["num_test"] == 48 and np.isfinite(result["test_mae"])
    model = property_model.load_property_model(trained)
    from symat_jax.data import load_split

    test = load_split("perov_5", "test", tiny_perov, with_graph=False, progress=False)
    pred = model(test.crystal_set())
    assert pred.shape == (48,)
    assert property_model.mae(pred, test.properties) == pytest.approx(result["test_mae"], rel=1e-5)
    # Resuming to more epochs continues the log instead of starting over.
    args = ["train-property", "--dataset", "perov_5", "--data-root", str(tiny_perov), "--workdir", str(trained),
            "--preset", "quick", "--epochs", "5", "--resume"]
    assert cli.main(args) == 0
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 5
    # A second run in the same folder without --resume is refused.
    assert cli.main(args[:-1]) == 2


def test_symat_evaluate_end_to_end(trained, tiny_perov, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMAT_CACHE_DIR", str(tmp_path / "cache"))
    from symat_jax.data import load_split

    ref = (load_split("perov_5", "test", tiny_perov, with_graph=False, progress=False)).crystal_set()
    gen = ref.subset(np.arange(0, 48, 2))
    np.savez(tmp_path / "samples.npz", num_atoms=gen.num_atoms, atom_types=gen.atom_types,
             frac_coords=gen.frac_coords, lengths=gen.lengths, angles=gen.angles)
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--samples", str(tmp_path), "--dataset", "perov_5", "--data-root", str(tiny_perov),
            "--out", str(out), "--workers", "1"]
    assert cli.main(args + ["--property-model", str(trained)]) == 0
    assert "cov_recall" in capsys.readouterr().out
    report = json.loads(out.read_text())
    for key in evaluate_cli.REQUIRED_KEYS:
        assert key in report, key
    # Half of the reference, generated again: every sample is covered, about half the reference is.
    assert report["num_samples"] == 24 and report["cov_precision"] == 1.0 and report["cov_recall"] == pytest.approx(0.5, abs=0.1)
    assert isinstance(report["property_emd"], float) and report["property_emd"] >= 0
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["property_emd"] is None
    # A CDVAE CSV is accepted as the generated side: the test split against itself.
    csv_args = args.copy()
    csv_args[2] = str(tiny_perov / "perov_5" / "test.csv")
    assert cli.main(csv_args) == 0
    self_check = json.loads(out.read_text())
    assert self_check["cov_recall"] == 1.0 and self_check["cov_precision"] == 1.0 and self_check["num_samples"] == 48
    # A file that is not in the CDVAE layout is a clear error naming it.
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "samples.npz", num_atoms=gen.num_atoms)
    bad = args.copy()
    bad[2] = str(tmp_path / "bad")
    assert cli.main(bad) == 2
    assert "samples.npz" in capsys.readouterr().err


def test_a_collapsed_cell_gets_no_prediction_and_changes_no_other(test_splits):
    crystals = test_splits["perov_5"].crystal_set().subset(np.arange(6))
    predict = _random_predictor(crystals)
    alone = predict(crystals)
    lengths = crystals.lengths.copy()
    lengths[2] = [0.3, 0.3, 0.3]  # a 6 A search would span over 40^3 images
    collapsed = CrystalSet(crystals.num_atoms, crystals.atom_types, crystals.frac_coords, lengths, crystals.angles)
    out = predict(collapsed)
    assert np.isnan(out[2]) and np.allclose(np.delete(out, 2), np.delete(alone, 2), atol=1e-5)
