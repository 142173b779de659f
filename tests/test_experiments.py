"""Experiments: ``cdvae_benchmark`` (every stage on a tiny data root, then a rerun that only evaluates), ``step_sweep``, ``quality_study``'s data ceiling."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import types

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
    assert step_sweep.band("0.1:1:100") == (0.1, 1.0, 100) and step_sweep.band("none") is None


def test_chain_trace_reports_each_level_beside_the_perturbed_data(full_run, data_root, tmp_path, capsys):
    from experiments import chain_trace

    workdir, _ = full_run
    out = tmp_path / "trace.json"
    assert chain_trace.main(["--workdir", str(workdir), "--data-root", str(data_root), "--num", "6", "--max-atoms",
                             "8", "--schedule", "3x2", "--out", str(out)]) == 0
    (trace,) = json.loads(out.read_text())
    rows = trace["rows"]
    assert [r["level"] for r in rows] == [49, 24, 0] and all(r["steps"] == 2 for r in rows)
    # The data column is real carbon noised at each level: all bonds at sigma 0.01 A, few at 10 A.
    assert rows[-1]["data"]["share_3_or_4"] > 0.95 and 1.3 < rows[-1]["data"]["nn_median"] < 1.6
    assert rows[0]["data"]["share_3_or_4"] < 0.5
    assert all(r["nn_w1"] >= 0 and np.isfinite(r["relative_score_error"]) for r in rows)
    assert "final (after the denoising step)" in capsys.readouterr().out


def test_fingerprint_recovery_variants_parse_into_chain_overrides():
    import argparse

    from experiments.fingerprint_recovery import override

    assert override("default") == {}
    assert override("band=none,steps_per_level=100") == {"band": None, "steps_per_level": 100}
    assert override("band=[0.01,0.1,30],final_denoise=0.5") == {"band": (0.01, 0.1, 30), "final_denoise": 0.5}
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        override("quench_steps=100")  # a knob no stage has


def test_composition_probe_counts_rejects_and_fitted_counts_remove_them(full_run, capsys, monkeypatch):
    from experiments import composition_probe
    from symat_jax import configs, run

    workdir, _ = full_run
    default = configs.get_sampler_preset("carbon_24", "default")
    loaded = run.load_run(workdir, default.checkpoint, default.weights)
    prior = run.load_prior(workdir)
    off = composition_probe.probe(loaded, prior, 32, 1.0, fit_counts=False)
    on = composition_probe.probe(loaded, prior, 32, 1.0, fit_counts=True)
    assert on["rejected"] == 0 and 0 <= off["rejected"] <= 32
    assert 0 <= on["comp_valid_pct"] <= 100 and on["distinct"] >= 1
    if off["rejected"] == 0:  # every argmax fitted: fitting changes nothing
        assert on == {**off, "fit_counts": True}
    assert composition_probe.main(["--workdir", str(workdir), "--num", "8", "--temperatures", "1.0"]) == 0
    assert capsys.readouterr().out.count("composition validity") == 2
    # Novelty: the share of written cells whose reduced formula is not known.
    assert composition_probe.reduced_formula([8, 22, 8, 38, 8]) == "SrTiO3"
    assert composition_probe.probe(loaded, prior, 8, 1.0, True, known=set())["novel_pct"] == 100.0
    # Density EMD against a test split of one crystal far above every decoded cell: that density minus the cells'
    # mean, so moving the test crystal 10^4 g/cm^3 further moves the EMD by exactly as much.
    far = [composition_probe.probe(loaded, prior, 8, 1.0, True, test_densities=np.array([d]))["density_emd"]
           for d in (1e4, 2e4)]
    assert far[1] - far[0] == pytest.approx(1e4, rel=1e-6) and 0 < far[0] < 1e4
    seen = []
    monkeypatch.setattr(composition_probe, "reduced_formula", lambda t: seen.append(len(t)) or f"X{len(seen) % 2}")
    assert composition_probe.probe(loaded, prior, 8, 1.0, True, known={"X0"})["novel_pct"] == 50.0
    assert len(seen) == 8 and min(seen) >= 1  # one formula per written cell, from its atoms


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


def test_quality_study_scores_the_data_ceiling_beside_the_variants(data_root, tmp_path, monkeypatch, capsys):
    from experiments import quality_study
    from symat_jax import cli
    from symat_jax.data import load_split

    monkeypatch.setenv("SYMAT_CACHE_DIR", str(tmp_path / "cache"))
    # A data root whose training split is its test split: every drawn training crystal is a test crystal.
    root = tmp_path / "data"
    rows = csv_rows(data_root / "carbon_24" / "test.csv")[:20]
    for split in ("train", "test"):
        write_csv(root / "carbon_24" / f"{split}.csv", rows)
    shutil.copy(data_root / "comp_scaler.json", root / "comp_scaler.json")
    test = (load_split("carbon_24", "test", root, with_graph=False, progress=False)).crystal_set()
    variant = tmp_path / "study" / "default"
    variant.mkdir(parents=True)
    gen = test.subset(np.arange(5))
    np.savez(variant / "samples.npz", num_atoms=gen.num_atoms, atom_types=gen.atom_types, frac_coords=gen.frac_coords,
             lengths=gen.lengths, angles=gen.angles)
    (variant / "summary.json").write_text(json.dumps({"run_seconds": 1.0, "num_requested": 5, "device": "cpu"}))
    args = ["--workdir", str(tmp_path / "unused"), "--root", str(tmp_path / "study"), "--data-root", str(root),
            "--num", "8", "--variants", "default", "--skip-sampling"]
    assert quality_study.main(args) == 0
    result = json.loads((tmp_path / "study" / "results.json").read_text())
    ceiling = result["rows"]["training set, 8 drawn (data ceiling)"]
    # 8 of the 20 test crystals drawn: each is its own nearest test crystal, and covers at least itself.
    assert ceiling["num_samples"] == 8 and ceiling["cov_precision"] == 1.0 and ceiling["cov_recall"] >= 8 / 20
    assert ceiling["share_3_or_4"] > 0.99 and ceiling["subsample"] == 8
    # The 'generated' crystals are test crystals: fully bonded, and each its own match.
    sampled = result["rows"]["default"]
    assert sampled["share_bonded_crystals"] == 1.0 and sampled["match_rate_bonded"] == 1.0
    assert sampled["nearest_struct_median_bonded"] == pytest.approx(0.0, abs=1e-9)
    assert sampled["match_rate_unbonded"] is None and "near a test crystal" in (tmp_path / "study" / "results.md").read_text()
    assert "data ceiling" in capsys.readouterr().out
    # The same seed draws the same crystals; more than the split holds is refused, naming the count.
    train_csv = str(root / "carbon_24" / "train.csv")
    drawn = [quality_study.load_generated(train_csv, "carbon_24", subsample=8, progress=False) for _ in range(2)]
    assert drawn[0].digest() == drawn[1].digest() != test.subset(np.arange(8)).digest()
    assert cli.main(["evaluate", "--samples", train_csv, "--dataset", "carbon_24", "--data-root", str(root),
                     "--subsample", "21"]) == 2
    assert "holds 20 crystals" in capsys.readouterr().err


def test_a_retry_variant_reuses_the_first_chain_of_its_base_variant(full_run, tmp_path, monkeypatch):
    from experiments import quality_sample
    from symat_jax.crystals import CrystalSet

    workdir, _ = full_run
    from symat_jax.configs import CoordinationRule, RetryConfig

    short = dict(num_levels=2, steps_per_level=2, band=None)
    monkeypatch.setitem(quality_sample.VARIANTS, "default_noretry", ("default", "latest", dict(short, retry=None)))
    # No atom has 30 neighbours within 1.8 A: every crystal is retried, and no second chain does better, so
    # every crystal keeps its first chain: the base variant's.
    monkeypatch.setitem(quality_sample.VARIANTS, "default_unrelaxed", (
        "default", "latest", dict(short, retry=RetryConfig(CoordinationRule(30, 40, 1.8), checkpoint="2"))))
    args = ["--workdir", str(workdir), "--root", str(tmp_path), "--num", "6", "--batch-size", "6"]
    assert quality_sample.main(args + ["--variants", "default_noretry", "default_unrelaxed"]) == 0
    summary = json.loads((tmp_path / "default_unrelaxed" / "summary.json").read_text())
    assert summary["first_pass_from"] == str(tmp_path / "default_noretry")
    retry = summary["stages"]["retry"]
    assert (retry["retried"], retry["replaced"], summary["retry_epoch"]) == (6, 0, 2)
    base_seconds = json.loads((tmp_path / "default_noretry" / "summary.json").read_text())["run_seconds"]
    assert summary["run_seconds"] > base_seconds  # both chains' time
    base, retried = (CrystalSet.from_samples(tmp_path / v) for v in ("default_noretry", "default_unrelaxed"))
    assert base.digest() == retried.digest()
    # A base sampled for another request is refused, not mixed in.
    (tmp_path / "default_unrelaxed" / "summary.json").unlink()
    with pytest.raises(ValueError, match="other crystals"):
        quality_sample.main(["--workdir", str(workdir), "--root", str(tmp_path), "--num", "5", "--batch-size", "6",
                             "--variants", "default_unrelaxed"])


def test_a_relaxed_variant_samples_its_base_once_and_relaxes_a_copy(data_root, tmp_path, monkeypatch):
    from experiments import quality_sample
    from symat_jax.crystals import CrystalSet
    from symat_jax.data import load_split

    test = (load_split("carbon_24", "test", data_root, with_graph=False, progress=False)).crystal_set()
    gen = test.subset(np.arange(4))
    noisy = (gen.frac_coords + np.random.default_rng(0).normal(0, 0.01, gen.frac_coords.shape)) % 1.0
    calls = []
    real = quality_sample.sample_variant

    def fake_sample(workdir, name, out, num, *rest):  # stands in for the chains: test crystals, slightly moved
        if name in quality_sample.RELAXED_OF:
            return real(workdir, name, out, num, *rest)
        calls.append(name)
        out.mkdir(parents=True)
        np.savez(out / "samples.npz", num_atoms=gen.num_atoms, atom_types=gen.atom_types, frac_coords=noisy,
                 lengths=gen.lengths, angles=gen.angles, sample_index=np.arange(4))
        (out / "rejects.json").write_text("[]")
        (out / "summary.json").write_text(json.dumps({"run_seconds": 2.0, "num_requested": num, "variant": name, "num_written": 4,
                                                       "num_rejected": 0, "compile_seconds": 0.0, "device": "cpu"}))

    monkeypatch.setattr(quality_sample, "sample_variant", fake_sample)
    monkeypatch.setattr(quality_sample.run, "read_config", lambda workdir: types.SimpleNamespace(dataset="carbon_24"))
    args = ["--workdir", str(tmp_path / "unused"), "--root", str(tmp_path), "--num", "4"]
    assert quality_sample.main(args + ["--variants", "default", "default"]) == 0
    assert calls == ["default_unrelaxed"]  # the base once; the second request finds the relaxed folder
    relaxed = CrystalSet.from_samples(tmp_path / "default")
    assert np.array_equal(relaxed.num_atoms, gen.num_atoms) and np.allclose(relaxed.lengths, gen.lengths)
    assert not np.allclose(relaxed.frac_coords, noisy)
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["relaxed_from"] == str(tmp_path / "default_unrelaxed") and summary["relax"]["num_crystals"] == 4
    assert summary["run_seconds"] == pytest.approx(2.0 + summary["relax"]["relax_seconds"], abs=0.02)
    with np.load(tmp_path / "default" / "unrelaxed.npz") as z:
        assert np.array_equal(z["frac_coords"], noisy)
    # A base of another size is refused, not relaxed into this row.
    (tmp_path / "default" / "summary.json").unlink()
    with pytest.raises(ValueError, match="not 5"):
        quality_sample.main(["--workdir", str(tmp_path / "unused"), "--root", str(tmp_path), "--num", "5",
                             "--variants", "default"])


def test_two_score_chain_switches_networks_at_the_first_level_below_the_switch(full_run, tmp_path, monkeypatch, capsys):
    from experiments import two_score_chain
    from symat_jax import configs
    from symat_jax.crystals import CrystalSet

    workdir, _ = full_run
    build = configs.SAMPLER_PRESET_BUILDERS["default"]

    def short(dataset):  # the default preset with 2 steps per level, in the band too
        preset = build(dataset)
        return preset.replace_stage(dataclasses.replace(preset.chain, steps_per_level=2, band=(0.03, 0.1, 2)))

    monkeypatch.setitem(configs.SAMPLER_PRESET_BUILDERS, "default", short)
    out = tmp_path / "two"
    assert two_score_chain.main(["--workdir", str(workdir), "--low", "2", "--switch", "0.1", "--num", "4",
                                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["high_epoch"], summary["low_epoch"]) == (4, 2)
    assert 0.054 < summary["switch_sigma"] <= 0.1  # the first of the schedule's levels at or below 0.1 A
    crystals = CrystalSet.from_samples(out)
    assert len(crystals) == summary["num_written"] == 4 - summary["num_rejected"]
    assert np.all((crystals.frac_coords > -1) & (crystals.frac_coords < 1))
    with pytest.raises(ValueError, match="no level on one side"):
        two_score_chain.main(["--workdir", str(workdir), "--low", "2", "--switch", "100", "--out", str(tmp_path / "x")])


def test_relax_probe_brings_noised_test_crystals_back_and_leaves_real_ones_near(data_root, capsys):
    from experiments import relax_probe

    assert relax_probe.main(["--data-root", str(data_root), "--num", "3", "--sigmas", "0", "0.1"]) == 0
    real, noisy = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert real["start_median"] == 0.0 and real["end_within_0.2"] == 1.0 and real["density_ratio_median"] == 1.0
    assert noisy["end_median"] < noisy["start_median"] / 2
