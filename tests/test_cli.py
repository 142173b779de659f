"""Entry points on a tiny data root: ``symat preprocess`` and ``python -m experiments.train_carbon``."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("args, message", [
    (["--num", "ten"], "not a whole number"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--decode-sample-temperature", "0"], "sample_temperature must be None (argmax) or positive"),
    (["--chain-step-scale", "nan"], "step_scale must be positive"),
    (["--chain-num-levels", "-3"], "must be at least 1"),
    (["--chain-num-levels", "three"], "--chain-num-levels: 'three' is not a int"),
    (["--chain-band", "0", "0.1", "10"], "band must be 0 < low <= high"),
    (["--chain-band", "0.1"], "--chain-band: takes 3 values"),
    (["--retry-rule", "4", "3", "1.8"], "0 <= low <= high"),
    (["--relax-cell", "npt"], "invalid choice: 'npt'"),
    (["--hop-rounds", "0"], "rounds >= 1"),
    (["--no-hop", "--hop-rounds", "2"], "--no-hop with --hop-rounds: choose one"),
    (["--prior-temperature", "2", "--prior", "standard"], "a setting of the fitted prior"),
])
def test_out_of_range_sampling_arguments_are_refused_before_any_work(tmp_path, capsys, args, message):
    base = ["sample", "--workdir", str(tmp_path), "--num", "4", "--out", str(tmp_path / "out")]
    try:
        code = cli.main(base + args)
    except SystemExit as exc:  # argparse's own types
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stage_flags_change_exactly_their_stage():
    from symat_jax import configs
    from symat_jax.stage_flags import apply_stage_args

    parser = cli.argparse.ArgumentParser()
    cli.add_stage_args(parser)
    default = configs.get_sampler_preset("carbon_24", "default")
    same = apply_stage_args(default, parser.parse_args([]))
    assert same == default
    changed = apply_stage_args(default, parser.parse_args(
        ["--chain-band", "none", "--chain-final-denoise", "none", "--no-retry", "--relax-guard", "3", "4", "1.8",
         "--hop-rounds", "2", "--decode-fit-counts", "no", "--prior-temperature", "0.5"]))
    assert changed.chain == dataclasses.replace(default.chain, band=None, final_denoise=None)
    assert changed.stage(configs.RetryConfig) is None
    assert changed.stage(configs.RelaxConfig).guard == configs.CoordinationRule(3, 4, 1.8)
    assert changed.stage(configs.HopConfig).rounds == 2 and changed.prior == configs.FittedPrior(0.5)
    assert changed.decode.fit_counts is False
    paper = configs.get_sampler_preset("carbon_24", "paper")
    added = apply_stage_args(paper, parser.parse_args(["--hop-rounds", "3", "--relax", "--retry-checkpoint", "40"]))
    assert [type(s).__name__ for s in added.stages] == ["ChainConfig", "RetryConfig", "RelaxConfig", "HopConfig"]
    assert apply_stage_args(paper, parser.parse_args(["--no-relax"])) == paper


def test_errors_are_one_line_naming_the_problem_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    assert cli.main(["sample", "--workdir", str(tmp_path / "none"), "--num", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds no SyMat run" in err and "Traceback" not in err and not (tmp_path / "o").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "preprocess", broken)
    assert cli.main(["preprocess", "--dataset", "carbon_24", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unexpected RuntimeError: disk on fire" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--debug", "preprocess", "--dataset", "carbon_24", "--data-root", str(tmp_path)])


def test_too_many_levels_is_an_error_not_a_silent_cap():
    from symat_jax import configs, sampling

    model = configs.get_config("carbon_24").model
    chain = configs.ChainConfig(num_levels=500)
    with pytest.raises(ValueError, match="num_levels must be in 1..50"):
        sampling.build_schedule(chain, model, [1.0] * 50)


def test_evaluate_refuses_a_folder_as_its_report_file_before_any_work(tmp_path, monkeypatch):
    from symat_jax import evaluate_cli

    monkeypatch.setattr(evaluate_cli.CrystalSet, "from_samples", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="is a folder"):
        evaluate_cli.run_evaluate(str(tmp_path / "samples.npz"), "carbon_24", out=str(tmp_path))


def test_focus_sigma_and_ema_decay_options_and_configs_written_before_them(capsys):
    import argparse
    import json

    from symat_jax import configs

    p = argparse.ArgumentParser()
    cli.add_train_args(p, workdir_default="w")
    assert p.parse_args(["--focus-sigma", "uniform"]).focus_sigma == "uniform"
    assert p.parse_args(["--focus-sigma", "0.5"]).focus_sigma == 0.5
    with pytest.raises(SystemExit):
        p.parse_args(["--focus-sigma", "0"])
    assert "must be a finite number above 0" in capsys.readouterr().err
    assert p.parse_args(["--ema-decay", "0.999"]).ema_decay == 0.999
    assert p.parse_args(["--ema-decay", "0"]).ema_decay == 0.0
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["--ema-decay", bad])
    assert "must be at least 0 and below 1" in capsys.readouterr().err
    config = configs.get_config("carbon_24")
    assert config.focus_sigma == 1.0 and config.ema_decay == 0.999
    assert (config.batch_size, config.epochs, config.lr_schedule) == (32, 80, "constant")  # Carbon-24's departures
    perov = configs.get_config("perov_5")
    assert (perov.batch_size, perov.epochs, perov.lr_schedule, perov.ema_decay) == (256, 700, "constant", 0.99)
    stored = json.loads(config.to_json())
    del stored["focus_sigma"], stored["ema_decay"], stored["lr_schedule"], stored["lr_floor"]
    older = configs.TrainConfig.from_dict(stored)  # a run from before these fields: uniform levels, no EMA
    assert older.focus_sigma is None and older.ema_decay == 0.0 and older.lr_schedule == "constant"


def test_divergence_guard_options_reach_the_training_config(monkeypatch, capsys):
    import argparse

    from symat_jax import train

    p = argparse.ArgumentParser()
    cli.add_train_args(p, workdir_default="w")
    p.add_argument("--data-root", default=None)
    for bad in ("1", "0.5", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["--divergence-factor", bad])
    assert "must be a finite number above 1, or 'off'" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(train, "train", lambda config, *a, **k: seen.append(config) or {})
    for argv, expected in ((["--divergence-factor", "off"], (None, 3)),
                           (["--divergence-factor", "5", "--divergence-retries", "0"], (5.0, 0)),
                           ([], (3.0, 3))):
        args = p.parse_args(argv)
        args.dataset = "carbon_24"
        cli.run_training(args)
        assert (seen[-1].divergence_factor, seen[-1].divergence_retries) == expected
    assert train.divergence_guard(seen[0]) is None and train.divergence_guard(seen[1]).retries == 0


@pytest.mark.parametrize("flag,field,value,default", [("--target-matching", "target_matching", "assignment", "none"),
                                                      ("--score-latent", "score_latent", "mean", "sample")])
def test_score_model_options_reach_the_training_config(monkeypatch, flag, field, value, default):
    import argparse

    from symat_jax import train

    p = argparse.ArgumentParser()
    cli.add_train_args(p, workdir_default="w")
    with pytest.raises(SystemExit):
        p.parse_args([flag, "hungarian"])
    seen = []
    monkeypatch.setattr(train, "train", lambda config, *a, **k: seen.append(config) or {})
    for argv, expected in (([flag, value], value), ([], default)):
        args = p.parse_args(argv)
        args.dataset, args.data_root = "carbon_24", None
        cli.run_training(args)
        assert getattr(seen[-1], field) == expected
