"""Property optimisation: Adam on latents lowers an objective (jit == step by step), success rates by hand, decoding a
latent equals the sampler, the property head learns, and ``symat optimize`` refuses bad input and resumes after a kill."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from symat_jax import cli, sampling
from symat_jax.configs import HeadConfig, OptimizeConfig, StandardPrior, get_sampler_preset
from symat_jax.optimize import best_per_start, optimize, percentile_thresholds, success_rates
from symat_jax.property_head import fit_head, fit_run_head, load_head

BAD = pathlib.Path(__file__).resolve().parent / "data" / "bad"
ROOT = BAD / "root_ok"
CHAIN = ["--chain-num-levels", "2", "--chain-steps-per-level", "2", "--batch-size", "4"]


def _toy(z):
    """A non-convex objective of one latent: a bowl off the origin with ripples."""
    return jnp.sum((z - 1.5) ** 2) + 0.3 * jnp.sum(jnp.sin(3.0 * z))


def test_adam_on_latents_lowers_the_objective_and_jit_equals_a_step_by_step_loop():
    z0 = jax.random.normal(jax.random.PRNGKey(0), (5, 6))
    cfg = OptimizeConfig(steps=60, learning_rate=0.05, every=20)
    traj = jax.jit(lambda z: optimize(_toy, z, cfg))(z0)
    value = np.asarray(traj.value)
    assert traj.z.shape == (4, 5, 6) and list(np.asarray(traj.steps)) == [0, 20, 40, 60]
    assert np.all(np.isfinite(np.asarray(traj.z))) and np.all(np.diff(value, axis=0) < 0)  # every start, every save
    # A plain loop: one jitted Adam step per call, each start alone.
    tx = optax.adam(cfg.learning_rate)
    grad = jax.jit(jax.grad(_toy))
    for i in range(len(z0)):
        z, state = z0[i], tx.init(z0[i])
        for step in range(1, cfg.steps + 1):
            updates, state = tx.update(grad(z), state, z)
            z = optax.apply_updates(z, updates)
            if step % cfg.every == 0:
                np.testing.assert_allclose(np.asarray(traj.z[step // cfg.every, i]), np.asarray(z), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of every"):
        OptimizeConfig(steps=100, every=30)


def test_success_rates_on_a_hand_made_set():
    # 4 starts; crystal rows: (start, value, valid).
    start = np.array([0, 0, 1, 1, 2, 2, 3])
    value = np.array([5.0, 1.0, 2.5, 0.5, 9.0, 3.0, 0.2])
    valid = np.array([True, True, True, False, False, True, False])
    best, rows = best_per_start(start, value, valid, 4)
    np.testing.assert_array_equal(best[:3], [1.0, 2.5, 3.0])
    assert np.isnan(best[3]) and list(rows) == [1, 2, 5, -1]
    # Thresholds 1.0 / 2.5 / 2.9: start 0 passes all, start 1 the last two, start 2 none, start 3 has no valid crystal.
    assert success_rates(best, (1.0, 2.5, 2.9)) == [0.25, 0.5, 0.5]
    assert percentile_thresholds(np.array([np.nan, *range(101)])) == (5.0, 10.0, 15.0)


def test_the_property_head_learns_a_function_of_the_latents():
    rng = np.random.default_rng(0)
    w = rng.normal(size=12)
    z = rng.normal(size=(600, 12)).astype(np.float32)
    y = z @ w + 0.5 * np.tanh(z[:, 0]) + 3.0
    y[5] = np.nan  # a crystal without a property is left out
    head, record = fit_head(z[:500], y[:500], z[500:], y[500:], HeadConfig(hidden=64, layers=2, epochs=150),
                            progress=False)
    assert record["num_train"] == 499 and record["val_mae"] < 0.15 * record["val_mae_of_the_mean"]
    pred = np.asarray(head.predict(jnp.asarray(z[500:])))
    np.testing.assert_allclose(np.mean(np.abs(pred - y[500:])), record["val_mae"], rtol=1e-4)


@pytest.fixture(scope="module")
def optimizable(full_run, tiny_data, tmp_path_factory):
    """Return ``(run with a property head, property model)``: copies of the tiny run and a quick Carbon-24 judge."""
    root = tmp_path_factory.mktemp("optimizable")
    run = root / "run"
    shutil.copytree(full_run[0], run)
    fit_run_head(run, config=HeadConfig(epochs=30), datasets=tiny_data, progress=False, preset="paper")
    judge = root / "judge"
    assert cli.main(["train-property", "--workdir", str(judge), "--preset", "quick", "--data-root", str(ROOT)]) == 0
    return run, judge


def test_decoding_a_latent_gives_what_the_sampler_gives_for_it(optimizable):
    run_dir, _ = optimizable
    preset = get_sampler_preset("carbon_24", "paper")
    preset = preset.replace_stage(dataclasses.replace(preset.chain, num_levels=2, steps_per_level=2))
    preset = dataclasses.replace(preset, prior=StandardPrior())
    run = sampling.load_sampling_run(run_dir, preset)
    ours = sampling.sample(run, preset, 6, seed=4, batch_size=4, progress=False)
    z = sampling.draw_latents(jax.random.PRNGKey(4), 6, model=run.model, prior_cfg=preset.prior, batch_size=4)
    again = sampling.sample_from_latents(run, preset, z, seed=4, batch_size=3, progress=False)
    for name, arrays in ours.npz_files().items():
        other = again.npz_files()[name]
        assert all(np.array_equal(arrays[k], other[k]) for k in arrays), name
    head, report = load_head(run_dir)
    assert report["dim"] == z.z_comp.shape[1] + z.z_pos.shape[1] + z.z_lat.shape[1]
    assert np.isfinite(np.asarray(head.predict(jnp.concatenate([jnp.asarray(x) for x in z], axis=1)))).all()


def _optimize_args(run, judge, out, *extra):
    return ["optimize", "--workdir", str(run), "--property-model", str(judge), "--num", "3", "--out", str(out),
            "--steps", "20", "--every", "10", "--preset", "paper", "--data-root", str(ROOT),
            "--workers", "1", *CHAIN, *extra]


def test_symat_optimize_resumes_after_a_kill_to_the_same_report(optimizable, tmp_path):
    run, judge = optimizable
    out, reference = tmp_path / "out", tmp_path / "reference"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    helper = [sys.executable, str(pathlib.Path(__file__).with_name("sample_kill_helper.py")), "decode:2", "--"]
    killed = subprocess.run(helper + _optimize_args(run, judge, out), capture_output=True, env=env)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    partial = tmp_path / ".out.partial" / "decodes"
    assert sorted(p.name for p in partial.glob("step_*[0-9].npz")) == ["step_000000.npz"]  # one decode finished
    assert cli.main(["evaluate", "--samples", str(out), "--dataset", "carbon_24"]) == 2  # incomplete: refused
    # Another request into the same folder is refused while the killed one's work is there.
    assert cli.main(_optimize_args(run, judge, out, "--seed", "1")) == 2
    assert cli.main(_optimize_args(run, judge, out)) == 0  # resumes
    assert cli.main(_optimize_args(run, judge, reference)) == 0  # uninterrupted
    assert (out / "optimize.json").read_text() == (reference / "optimize.json").read_text()
    for name in ("optimized.npz", "optimized_raw.npz", "trajectory.npz"):
        with np.load(out / name) as a, np.load(reference / name) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files), name
    report = json.loads((out / "optimize.json").read_text())
    assert report["num_starts"] == 3 and report["steps"] == [0, 10, 20]
    for label in ("raw", "final"):
        assert len(report[label]["sr_ours"]) == 3 and 0 <= report[label]["validity"] <= 1
        assert "tersoff" in report[label]
    with np.load(out / "optimized.npz") as final:
        assert sorted(set(final["step"].tolist())) == [0, 10, 20] and set(final["start"].tolist()) <= {0, 1, 2}
    assert (out / "optimize.png").stat().st_size > 1000 and any((out / "cif").iterdir())


def test_symat_optimize_refuses_bad_input_and_writes_nothing(optimizable, full_run, tmp_path, capsys):
    run, judge = optimizable
    out = tmp_path / "o"
    assert cli.main(_optimize_args(full_run[0], judge, out)) == 2  # a run without a head
    assert "has no property head" in capsys.readouterr().err
    assert cli.main(_optimize_args(run, judge, out, "--num", "50")) == 2  # more starts than the test split
    assert "the test split of carbon_24 holds 4 crystals" in capsys.readouterr().err
    other = tmp_path / "perov_judge"
    shutil.copytree(judge, other)
    config = json.loads((other / "property_config.json").read_text())
    (other / "property_config.json").write_text(json.dumps({**config, "dataset": "perov_5"}))
    assert cli.main(_optimize_args(run, other, out)) == 2
    assert "judges perov_5, but" in capsys.readouterr().err
    assert cli.main(_optimize_args(run, judge, out, "--steps", "25")) == 2
    assert "multiple of every" in capsys.readouterr().err
    assert cli.main(_optimize_args(run, judge, out, "--preset", "default")) == 2  # other latents than the head's
    assert "refit it with `symat fit-head" in capsys.readouterr().err
    assert not out.exists() and not any(p.name.startswith(".o.") for p in tmp_path.iterdir())
