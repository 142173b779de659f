"""Experiments: ``cdvae_benchmark`` (every stage on a tiny data root, then a rerun that only evaluates), ``step_sweep``."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from experiments import cdvae_benchmark
from symat_jax.evaluate_cli import REQUIRED_KEYS

from conftest import csv_rows, write_csv


def test_train_sample_evaluate_and_resume(data_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SYMAT_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO)
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        write_csv(root / "perov_5" / f"{split}.csv", csv_rows(data_root / "perov_5" / f"{split}.csv")[:24])
    shutil.copy(data_root / "comp_scaler.json", root / "comp_scaler.json")
    args = ["--dataset", "perov_5", "--root", str(tmp_path / "run"), "--data-root", str(root), "--preset", "quick",
            "--epochs", "1", "--property-epochs", "1", "--num-samples", "8", "--langevin-steps", "2",
            "--batch-size", "8", "--sampler-preset", "paper"]
    assert cdvae_benchmark.main(args) == 0
    run = tmp_path / "run"
    report = json.loads((run / "metrics.json").read_text())
    assert all(k in report for k in REQUIRED_KEYS) and report["num_samples"] == 8
    assert isinstance(report["property_emd"], float)
    table = (run / "results.md").read_text()
    assert "DiffCSP (published) | 100.00 | 98.85 | 99.74 | 98.27" in table
    assert f"| 8 ({report['num_property_samples']}) |" in table
    samples = np.load(run / "samples" / "samples.npz")
    assert len(samples["num_atoms"]) + len(json.loads((run / "samples" / "rejects.json").read_text())) == 8
    # Rerunning finds every stage done: only the evaluation runs again, with the same result.
    caplog.clear()
    assert cdvae_benchmark.main(args) == 0
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage")]
    assert stages == ["stage 4: evaluation"]
    again = json.loads((run / "metrics.json").read_text())
    assert {k: again[k] for k in REQUIRED_KEYS} == {k: report[k] for k in REQUIRED_KEYS}


def test_step_sweep_reports_local_structure_per_setting(full_run, tmp_path, capsys):
    import argparse

    from experiments import step_sweep

    workdir, _ = full_run
    out = tmp_path / "sweep.jsonl"
    argv = ["--workdir", str(workdir), "--num", "3", "--weights", "raw", "--schedules", "2x1", "--fractions", "0.05",
            "0.02", "--batch-size", "3", "--out", str(out)]
    assert step_sweep.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["schedule"], r["step_fraction"], r["weights"]) for r in rows] == [("2x1", 0.05, "raw"), ("2x1", 0.02, "raw")]
    for r in rows:
        assert r["atoms"] > 0 and np.isclose(sum(r["coordination_share"]), 1.0)
    assert capsys.readouterr().out.count("3-4-fold") == 2
    with pytest.raises(argparse.ArgumentTypeError, match="LEVELSxSTEPS"):
        step_sweep.schedule("25-10")
    assert step_sweep.restart("2:0.3") == (2, 0.3) and step_sweep.restart("none") == (0, 0.3)
    with pytest.raises(argparse.ArgumentTypeError, match="COUNT:SIGMA"):
        step_sweep.restart("2")


def test_fingerprint_recovery_variants_parse_into_sampler_overrides():
    import argparse

    from experiments.fingerprint_recovery import override

    assert override("default") == {}
    assert override("band=none,quench_steps=100") == {"band": None, "quench_steps": 100}
    assert override("band=[0.01,0.1],final_denoise=False") == {"band": (0.01, 0.1), "final_denoise": False}
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        override("no_such_field=1")


def test_composition_probe_counts_rejects_and_fitted_counts_remove_them(full_run, capsys):
    from experiments import composition_probe
    from symat_jax import configs, run

    workdir, _ = full_run
    loaded = run.load_run(workdir, configs.sampler_checkpoint("default"), configs.sampler_weights("default"))
    prior = run.load_prior(workdir)
    off = composition_probe.probe(loaded, prior, 32, 1.0, fit_counts=False)
    on = composition_probe.probe(loaded, prior, 32, 1.0, fit_counts=True)
    assert on["rejected"] == 0 and 0 <= off["rejected"] <= 32
    assert 0 <= on["comp_valid_pct"] <= 100 and on["distinct"] >= 1
    if off["rejected"] == 0:  # every argmax fitted: fitting changes nothing
        assert on == {**off, "fit_counts": True}
    assert composition_probe.main(["--workdir", str(workdir), "--num", "8", "--temperatures", "1.0"]) == 0
    assert capsys.readouterr().out.count("composition validity") == 2


def test_interrupted_training_says_how_to_resume(monkeypatch, tmp_path, capsys):
    from experiments import common
    from symat_jax import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_training", interrupted)
    assert common.train_main("carbon_24", ["--workdir", str(tmp_path / "run")], None) == 130
    assert "--resume" in capsys.readouterr().err


def test_the_exact_score_target_brings_perturbed_test_crystals_back(full_run, data_root, tmp_path):
    import json

    from experiments import oracle_recovery

    workdir, _ = full_run
    out = tmp_path / "oracle.jsonl"
    assert oracle_recovery.main(["--workdir", str(workdir), "--data-root", str(data_root), "--num", "6", "--levels",
                                 "20", "--pairing", "spec", "assignment", "--steps", "150", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pairing"] for r in rows] == ["spec", "assignment"]
    for r in rows:  # from sigma 0.17 A (no start within 0.2) both pairings rebuild most crystals
        assert r["start_within_0.2"] == 0.0 and r["end_within_0.2"] >= 0.8 and r["end_median"] < 0.1
