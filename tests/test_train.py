"""Training: the loss goes down, kill-and-resume reproduces the run, bad steps are skipped, few compilations."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
import pytest

from symat_jax import cli, configs, input_pipeline, run, train
from symat_jax.checkpoints import RunCheckpoints
from symat_jax.input_pipeline import epoch_batches

from conftest import first_tiny_batch


def _params(workdir, config, data):
    statics = run.RunStatics.from_json((workdir / "normalizers.json").read_text())
    trainer = train.get_trainer(config, statics)
    budgets = input_pipeline.pad_budgets(data, config.batch_size, config.num_buckets, seed=config.seed)
    batch = next(epoch_batches(data, np.arange(len(data)), budgets, config.batch_size, 24, statics.element_slots,
                               statics.lattice))
    ckpt = RunCheckpoints(workdir)
    state, meta = ckpt.restore(trainer.init_state(batch, 0))
    ckpt.close()
    return state, meta


def test_short_training_lowers_the_loss(full_run):
    workdir, record = full_run
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert lines[-1]["train"]["loss"] < 0.7 * lines[0]["train"]["loss"]
    assert lines[-1]["val"]["loss"] < lines[0]["val"]["loss"]
    assert all(r["train"]["skipped"] == 0 and r["train"]["graph_overflow"] == 0 for r in lines)
    norm = np.loadtxt(workdir / "score_norm.txt")
    assert norm.shape == (50,) and norm[0] == pytest.approx(np.sqrt(2) * 0.01, rel=0.1)
    assert (workdir / "best").exists() and record["epoch"] == 4


def test_kill_and_resume_reproduces_the_uninterrupted_run(full_run, tiny_config, tiny_data, tmp_path):
    workdir, _ = full_run
    # "Killed" after epoch 2: only its checkpoints exist; then resumed to the end.
    train.train(dataclasses.replace(tiny_config, epochs=2), tmp_path, datasets=tiny_data, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train.train(tiny_config, tmp_path, datasets=tiny_data, progress=False)
    train.train(tiny_config, tmp_path, datasets=tiny_data, progress=False, resume=True)
    a, meta_a = _params(workdir, tiny_config, tiny_data[0])
    b, meta_b = _params(tmp_path, tiny_config, tiny_data[0])
    assert meta_a["epoch"] == meta_b["epoch"] == 3 and int(a.step) == int(b.step)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]


def test_a_kill_between_log_and_checkpoint_loses_no_metrics_line(full_run, tiny_config, tiny_data, tmp_path,
                                                                  monkeypatch):
    workdir, _ = full_run
    real_save = RunCheckpoints.save

    def killed_at_epoch_3(self, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt("killed after the log line of epoch 3, before its checkpoint")
        return real_save(self, epoch, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_config, tmp_path, datasets=tiny_data, progress=False)
    monkeypatch.setattr(RunCheckpoints, "save", real_save)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "tra')  # and a line cut off mid-write
    train.train(tiny_config, tmp_path, datasets=tiny_data, progress=False, resume=True)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    full = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val"]["loss"] for r in lines] == pytest.approx([r["val"]["loss"] for r in full], rel=1e-5)


def test_non_finite_step_is_skipped_and_compilations_are_bounded(full_run, tiny_config, tiny_data):
    workdir, _ = full_run
    statics, budgets, batch = first_tiny_batch(workdir, tiny_config, tiny_data[0])
    trainer = train.get_trainer(tiny_config, statics)
    # One trace per pad budget over three runs (one of them resumed), no more.
    assert 1 <= trainer.traces["train_step"] <= len(budgets)
    assert trainer.traces["eval_step"] == 1
    state = trainer.init_state(batch, 0)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    bad = dict(batch, lattice_std=np.full_like(batch["lattice_std"], np.nan))
    state, metrics = trainer.train_step(state, bad)
    assert int(metrics["skipped"]) == 1 and int(state.step) == 1
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(x, y)
    state, metrics = trainer.train_step(state, batch)
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))


def test_training_fits_the_prior_and_a_light_export_samples_like_the_run(full_run, tmp_path):
    workdir, _ = full_run
    report = json.loads((workdir / run.PRIOR_REPORT_FILE).read_text())
    assert report["num_train"] == 24 and report["checkpoint"] == "latest" and report["weights"] == "ema"
    prior = run.load_prior(workdir)
    assert prior.means.shape[1] == report["dim"] and np.isclose(float(prior.weights.sum()), 1.0, atol=1e-5)
    light = run.export_params(workdir, tmp_path / "light")
    for checkpoint in run.CHECKPOINT_CHOICES:
        a, b = run.load_run(workdir, checkpoint), run.load_run(light, checkpoint)
        assert a.meta["epoch"] == b.meta["epoch"] and a.config == b.config and a.statics == b.statics
        for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(FileExistsError):
        run.export_params(workdir, light)


def _folder_digest(folder):
    """Return a digest of every file's path and bytes under ``folder``."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_a_refused_training_command_changes_no_byte_of_the_run(full_run, tiny_config, tiny_data):
    workdir, _ = full_run
    before = _folder_digest(workdir)
    other = dataclasses.replace(tiny_config, learning_rate=1e-2)
    with pytest.raises(ValueError, match="already holds a run"):
        train.train(other, workdir, datasets=tiny_data, progress=False)
    with pytest.raises(ValueError, match="differs from the requested config"):
        train.train(other, workdir, datasets=tiny_data, progress=False, resume=True)
    assert _folder_digest(workdir) == before


def test_symat_sample_writes_a_run_s_crystals_and_never_mixes_two_runs(full_run, tmp_path, capsys):
    workdir, _ = full_run
    out = tmp_path / "samples"
    args = ["sample", "--workdir", str(workdir), "--num", "4", "--out", str(out), "--chain-num-levels", "2",
            "--chain-steps-per-level", "2", "--batch-size", "4"]
    # The default preset: the prior fitted at the end of training.
    assert cli.main(args + ["--chain-band", "0.01", "0.05", "3", "--decode-fit-counts", "no",
                           "--relax-guard", "3", "4", "1.8", "--hop-rounds", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sampler = summary["sampler"]
    assert summary["preset"] == "default" and sampler["prior"]["kind"] == "fitted"
    chain, retry, relaxation, hops = sampler["stages"]
    assert chain["stage"] == "ChainConfig" and chain["band"] == [0.01, 0.05, 3] and chain["num_levels"] == 2
    assert sampler["decode"]["fit_counts"] is False  # the preset's True, overridden
    assert summary["num_written"] + summary["num_rejected"] == 4
    # Carbon-24's default relaxes after sampling; the relaxed crystals replace the sampled ones, which stay in
    # unrelaxed.npz beside samples.npz.
    assert relaxation["cell"] == "fixed" and summary["stages"]["relax"]["num_crystals"] == summary["num_written"]
    # --relax-guard: the rule guards the relaxation; the hops (2 rounds) are guarded only by --hop-guard.
    assert relaxation["guard"] == {"low": 3, "high": 4, "cutoff": 1.8} and hops["rounds"] == 2 and hops["guard"] is None
    if summary["num_written"]:
        with np.load(out / "unrelaxed.npz") as z, np.load(out / "samples.npz") as final, np.load(out / "relax.npz") as rec:
            assert np.array_equal(z["frac_coords"], final["frac_coords"]) == (not rec["kept"].any())
    before = _folder_digest(out)
    assert cli.main(args + ["--seed", "1"]) == 2
    assert "not empty" in capsys.readouterr().err and _folder_digest(out) == before
    assert cli.main(args + ["--seed", "1", "--overwrite", "--preset", "paper"]) == 0
    assert json.loads((out / "summary.json").read_text())["preset"] == "paper"
    assert not (out / "unrelaxed.npz").exists()  # the paper setting does not relax
    assert cli.main(args + ["--overwrite", "--no-relax"]) == 0
    stages = json.loads((out / "summary.json").read_text())["sampler"]["stages"]
    assert [s["stage"] for s in stages] == ["ChainConfig", "RetryConfig"]  # the hops went with the relaxation


def test_the_score_network_can_come_from_another_kept_checkpoint(full_run, tmp_path):
    from symat_jax.model import SCORE_MODULES

    workdir, _ = full_run
    latest = run.load_run(workdir, "latest", "ema")
    early = run.load_run(workdir, "2", "ema")
    mixed = run.load_run(workdir, "latest", "ema", score_checkpoint="2")
    assert (mixed.meta["epoch"], mixed.meta["score_epoch"], latest.meta["score_epoch"]) == (3, 2, 4)
    for name, subtree in mixed.params["params"].items():
        source = early if name in SCORE_MODULES else latest
        for a, b in zip(jax.tree_util.tree_leaves(subtree), jax.tree_util.tree_leaves(source.params["params"][name])):
            np.testing.assert_array_equal(a, b)
    assert set(mixed.params["params"]) == set(latest.params["params"]) and SCORE_MODULES[1] in mixed.params["params"]
    assert not np.array_equal(jax.tree_util.tree_leaves(latest.params["params"]["score_net"])[0],
                              jax.tree_util.tree_leaves(early.params["params"]["score_net"])[0])
    with pytest.raises(FileNotFoundError, match="kept epochs: 2, 3, 4"):
        run.load_run(workdir, "latest", "ema", score_checkpoint="1")
    out = tmp_path / "mixed"
    assert cli.main(["sample", "--workdir", str(workdir), "--num", "2", "--out", str(out), "--chain-num-levels", "2",
                     "--chain-steps-per-level", "2", "--chain-band", "none", "--score-checkpoint", "2",
                     "--retry-checkpoint", "3", "--no-relax"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["checkpoint_epoch"], summary["score_epoch"]) == (4, 2)
    # Carbon-24's default retries crystals with atoms not 3-4-fold; the tiny run's are: epoch 3's network reran them.
    assert summary["retry_epoch"] == 3 and summary["stages"]["retry"]["retried"] >= 1
    with np.load(out / "first_pass.npz") as first, np.load(out / "samples.npz") as final:
        np.testing.assert_array_equal(first["atom_types"], final["atom_types"])
        assert first["frac_coords"].shape == final["frac_coords"].shape


def test_keep_epochs_survive_the_latest_n_and_reading_a_run_adds_no_folder(tmp_path):
    ckpt = RunCheckpoints(tmp_path / "run", keep=1, keep_epochs=(2,))
    for epoch in range(4):
        ckpt.save(epoch, {"w": np.full(3, epoch, np.float32)}, {"epoch": epoch}, is_best=False)
    ckpt.close()
    reader = RunCheckpoints(tmp_path / "run")
    assert reader.latest.all_steps() == [3] and reader.kept_steps() == [1, 3]
    restored, meta = reader.restore_raw(epoch=1)
    assert meta["epoch"] == 1 and np.all(restored["w"] == 1)
    with pytest.raises(FileNotFoundError, match="kept epochs: 2, 4"):
        reader.restore_raw(epoch=0)
    reader.close()
    RunCheckpoints(tmp_path / "other", keep=1).close()
    assert not (tmp_path / "other" / "kept").exists()
    config = dataclasses.replace(configs.get_config("carbon_24"), keep_epochs=(40,))
    assert configs.TrainConfig.from_dict(json.loads(config.to_json())) == config


def test_the_weight_average_follows_the_parameters_and_older_checkpoints_gain_one(full_run, tiny_config, tiny_data,
                                                                                  tmp_path):
    workdir, _ = full_run
    statics, _, batch = first_tiny_batch(workdir, tiny_config, tiny_data[0])
    trainer = train.get_trainer(tiny_config, statics)
    d = tiny_config.ema_decay
    assert 0 < d < 1
    state = trainer.init_state(batch, 0)
    seen = [jax.tree_util.tree_map(np.array, state.params)]
    for _ in range(2):
        state, _ = trainer.train_step(state, batch)
        seen.append(jax.tree_util.tree_map(np.array, state.params))
    expected = jax.tree_util.tree_map(lambda a, b, c: d * d * a + d * (1 - d) * b + (1 - d) * c, *seen)
    for x, y in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(state.ema_params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.tree_util.tree_leaves(seen[2])[0], jax.tree_util.tree_leaves(state.ema_params)[0])

    # A checkpoint written before the average existed restores with it started at its parameters.
    old = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "key": state.key}
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(0, old, {"epoch": 0}, is_best=False)
    restored, _ = ckpt.restore(trainer.init_state(batch, 1))
    ckpt.close()
    for x, y in zip(jax.tree_util.tree_leaves(restored.params), jax.tree_util.tree_leaves(restored.ema_params)):
        np.testing.assert_array_equal(x, y)
    assert int(restored.step) == 2

    # Sampling code picks either set; the raw and averaged parameters differ after training.
    raw, ema = run.load_run(workdir, "latest", "raw"), run.load_run(workdir, "latest", "ema")
    assert raw.meta["weights"] == "raw" and ema.meta["weights"] == "ema"
    assert not np.allclose(jax.tree_util.tree_leaves(raw.params)[0], jax.tree_util.tree_leaves(ema.params)[0])
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["val_ema"]["loss"]) for r in lines)


def test_a_nan_in_one_batch_is_skipped_logged_and_the_run_finishes(tiny_config, tiny_data, tmp_path, monkeypatch,
                                                                    caplog):
    real = train.Trainer.batches

    def poisoned(self, data, order, budgets):
        for k, (batch, weight) in enumerate(real(self, data, order, budgets)):
            if k == 1 and data is tiny_data[0] and not poisoned.done:
                poisoned.done = True
                lattice = np.array(batch["lattice_std"])
                lattice[0, 0] = np.nan  # one crystal's standardised lattice length
                batch = dict(batch, lattice_std=lattice)
            yield batch, weight

    poisoned.done = False
    monkeypatch.setattr(train.Trainer, "batches", poisoned)
    config = dataclasses.replace(tiny_config, epochs=2)
    with caplog.at_level("WARNING"):
        record = train.train(config, tmp_path, datasets=tiny_data, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert poisoned.done and [r["train"]["skipped"] for r in lines] == [1, 0] and record["epoch"] == 2
    assert "1 steps had a non-finite loss or gradient" in caplog.text
    state = run.load_run(tmp_path, "latest")
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
    assert np.isfinite(lines[-1]["val"]["loss"])
    # The epoch's loss is that of the steps that were applied: finite, so the divergence guard keeps the epoch.
    assert np.isfinite(lines[0]["train"]["loss"]) and "retries" not in lines[0]


def test_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(full_run, tiny_config, tiny_data, tmp_path):
    import os
    import random
    import subprocess
    import sys
    import time

    workdir, _ = full_run
    helper = [sys.executable, str(pathlib.Path(__file__).with_name("kill_helper.py")), str(tmp_path / "run"),
              str(tmp_path / "cache")]
    rng = random.Random(1126)
    # The children share compiled programs through JAX's persistent cache: only the first one compiles.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    # 1: killed a few milliseconds into writing epoch 2's checkpoint.
    first = subprocess.run(helper + ["--die-in-save", "1", "--seed", str(rng.randrange(1000))], capture_output=True, env=env)
    assert first.returncode == -9, first.stderr.decode()[-2000:]
    # 2: resumed, and killed from outside at a random moment once it trains again.
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines_before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    child = subprocess.Popen(helper + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while child.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > lines_before:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        time.sleep(0.01)
    child.kill()
    child.wait()
    # 3: resumed to the end.
    last = subprocess.run(helper + ["--resume"], capture_output=True, env=env)
    assert last.returncode == 0, last.stderr.decode()[-2000:]
    a, meta_a = _params(workdir, tiny_config, tiny_data[0])
    b, meta_b = _params(tmp_path / "run", tiny_config, tiny_data[0])
    assert meta_a["epoch"] == meta_b["epoch"] == 3 and int(a.step) == int(b.step)
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.ema_params)), jax.tree_util.tree_leaves((b.params, b.ema_params))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    ours = [json.loads(x) for x in metrics.read_text().splitlines()]
    full = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ours] == [1, 2, 3, 4]
    assert [r["val"]["loss"] for r in ours] == pytest.approx([r["val"]["loss"] for r in full], rel=1e-5)


def test_resume_with_nothing_to_resume_says_so_and_a_failed_start_leaves_no_folder(tiny_config, tiny_data, tmp_path,
                                                                                     caplog, monkeypatch):
    with caplog.at_level("WARNING"):
        train.train(dataclasses.replace(tiny_config, epochs=1), tmp_path / "new", datasets=tiny_data,
                    progress=False, resume=True)
    assert "holds no checkpoint to resume; starting a new run" in caplog.text
    assert [json.loads(x)["epoch"] for x in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()] == [1]
    monkeypatch.setenv("SYMAT_DOWNLOAD_URL", "http://127.0.0.1:9/none")
    with pytest.raises(FileNotFoundError, match="carbon_24/train.csv"):
        train.train(tiny_config, tmp_path / "w", data_root=tmp_path / "nowhere", progress=False)
    assert not (tmp_path / "w").exists() and not (tmp_path / "nowhere").exists()


def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_it_aside(full_run, tiny_config, tiny_data, tmp_path,
                                                                      caplog):
    import shutil

    workdir, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    for path in (copy / "checkpoints" / "3").rglob("*"):
        if path.is_file() and "state" in path.parts:
            path.write_bytes(path.read_bytes()[:10])
    with caplog.at_level("WARNING"):
        train.train(tiny_config, copy, datasets=tiny_data, progress=False, resume=True)
    assert "epoch 4" in caplog.text and "is damaged" in caplog.text
    assert (copy / "damaged_checkpoints" / "3").is_dir()
    a, meta_a = _params(workdir, tiny_config, tiny_data[0])
    b, meta_b = _params(copy, tiny_config, tiny_data[0])
    assert meta_a["epoch"] == meta_b["epoch"] == 3
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    lines = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]


def test_cosine_learning_rate_reaches_its_floor_at_the_last_step(full_run, tiny_config):
    import jax.numpy as jnp

    workdir, _ = full_run
    statics = run.RunStatics.from_json((workdir / "normalizers.json").read_text())
    config = dataclasses.replace(tiny_config, lr_schedule="cosine", learning_rate=1e-3, lr_floor=0.01, epochs=4)
    trainer = train.get_trainer(config, statics, steps_per_epoch=5)  # 20 steps in all
    params = {"w": jnp.zeros(3)}
    opt_state = trainer.tx.init(params)
    moves = []
    for _ in range(21):
        # Adam's step on a constant gradient is the learning rate itself, so the moves read the schedule back.
        updates, opt_state = trainer.tx.update({"w": jnp.full(3, 0.1)}, opt_state, params)
        moves.append(-float(updates["w"][0]))
    assert moves[0] == pytest.approx(1e-3, rel=1e-3)
    assert moves[10] == pytest.approx(0.5 * (1e-3 + 1e-5), rel=1e-3)
    assert moves[20] == pytest.approx(1e-5, rel=1e-3)
    assert np.all(np.diff(moves) < 0)
    constant = train.get_trainer(dataclasses.replace(config, lr_schedule="constant"), statics, steps_per_epoch=5)
    updates, _ = constant.tx.update({"w": jnp.full(3, 0.1)}, constant.tx.init(params), params)
    assert -float(updates["w"][0]) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="lr_schedule"):
        train.learning_rate(dataclasses.replace(config, lr_schedule="step"), 20)


def _toy_loop(tmp_path, losses_of_epoch, epochs=6):
    """Run the shared epoch loop on a counter 'model' whose epoch losses come from ``losses_of_epoch(epoch, try)``."""
    from symat_jax import checkpoints, loop

    state = run.TrainState(step=np.zeros((), np.int32), params={"w": np.zeros(3, np.float32)}, opt_state={},
                           key=np.asarray(jax.random.PRNGKey(0)), lr_scale=np.ones((), np.float32))
    start = checkpoints.start_run(tmp_path, 10, jax.device_put(state), False, "best")
    tries = {}

    def step(state, batch):
        return state.replace(step=state.step + 1, params={"w": state.params["w"] + batch * state.lr_scale}), {}

    def end_epoch(state, rows, weights, t0):
        epoch = int(state.step) // 2 - 1
        tries[epoch] = tries.get(epoch, -1) + 1
        train_loss, val_loss = losses_of_epoch(epoch, tries[epoch])
        return val_loss, {"train": {"loss": train_loss}, "val": {"loss": val_loss},
                          "key": np.asarray(state.key).tolist()}, {}, ""

    final, _, _ = loop.run_epochs(start, epochs=epochs, seed=0, num_examples=2, steps_per_epoch=2,
                                  batches=lambda order: ((1.0, 1) for _ in order), train_step=step,
                                  end_epoch=end_epoch, best_key="best", progress=False, guard=loop.DivergenceGuard())
    return final, tries


def test_the_divergence_guard_reruns_a_blown_up_epoch_from_its_start_and_logs_one_line(tmp_path, caplog):
    # Losses fall like a real run's first epochs (x50 from epoch 1 to 2 must not count as divergence); the first
    # try of epoch 5 (index 4) ends in a state whose validation loss is 7 x the recent median (9) while the epoch's mean
    # training loss has only doubled (a blow-up late in the epoch).
    falling = [500.0, 10.0, 8.0, 7.0, 6.5, 6.4]

    def losses(e, t):
        return (2 * falling[e], 10 * falling[e]) if (e, t) == (4, 0) else (falling[e], falling[e])

    with caplog.at_level("WARNING"):
        final, tries = _toy_loop(tmp_path, losses)
    assert tries == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0}
    assert "epoch 5 diverged (validation loss 65 against 9 over the last epochs)" in caplog.text
    # Rolled back: the rejected try's two steps are gone from the step count and the parameters; the retry and
    # everything after it step at half the rate (4 epochs x 2 steps at 1, then 2 x 2 at 0.5).
    assert int(final.step) == 12 and np.all(np.asarray(final.params["w"]) == 10.0)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[4]["retries"] == 1 and lines[4]["lr_scale"] == 0.5 and "retries" not in lines[3]
    assert lines[4]["rejected"] == [{"training loss": 13.0, "validation loss": 65.0}]
    # The retry draws a new random stream (kept from then on, so a resume repeats it).
    assert lines[4]["key"] != lines[3]["key"] and lines[5]["key"] == lines[4]["key"]


def test_an_epoch_that_diverges_on_every_try_stops_the_run_at_its_last_good_epoch(tmp_path):
    from symat_jax import loop

    with pytest.raises(loop.TrainingDiverged, match="epoch 4 diverged on 4 tries.*last good epoch \\(3\\).*--divergence-retries 6"):
        _toy_loop(tmp_path, lambda e, t: (float("nan"), 1.0) if e == 3 else (10.0 - e, 10.0 - e))
    ckpt = RunCheckpoints(tmp_path)
    assert ckpt.latest_epoch() == 2  # 0-based: epoch 3, the last good one
    ckpt.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]


def test_a_real_run_whose_epoch_blows_up_is_rolled_back_and_finishes(tiny_config, tiny_data, tmp_path, caplog):
    real = train.Trainer.batches
    calls = []

    def blown(self, data, order, budgets):
        train_pass = data is tiny_data[0]
        calls.append(train_pass)
        # The first try of the 4th epoch sees lattices 1e3 x too large: a finite loss thousands of times too high.
        poison = train_pass and sum(calls) == 5  # the first call only gives init_state its shapes
        for batch, weight in real(self, data, order, budgets):
            yield (dict(batch, lattice_std=np.asarray(batch["lattice_std"]) * 1e3) if poison else batch), weight

    with caplog.at_level("WARNING"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Trainer, "batches", blown)
        record = train.train(tiny_config, tmp_path, datasets=tiny_data, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4] and record["epoch"] == 4
    assert lines[3]["retries"] == 1 and lines[3]["rejected"][0]["training loss"] > 10 * lines[2]["train"]["loss"]
    assert lines[3]["train"]["loss"] < 2 * lines[2]["train"]["loss"] and "epoch 4 diverged" in caplog.text


def test_score_latent_mean_gives_the_score_network_the_posterior_mean(full_run, tiny_config, tiny_data):
    workdir, _ = full_run
    statics, _, batch = first_tiny_batch(workdir, tiny_config, tiny_data[0])
    key = jax.random.PRNGKey(3)
    coords = {}
    for latent in ("sample", "mean"):
        trainer = train.get_trainer(dataclasses.replace(tiny_config, score_latent=latent), statics)
        params = trainer.init_state(batch, 0).params
        # Same key: same noise levels and noise; only the z_pos the score network sees differs (a draw or the mean).
        drawn = float(trainer._losses(params, batch, key, True)[1]["coords"])
        mean = float(trainer._losses(params, batch, key, False)[1]["coords"])
        coords[latent] = (drawn, mean)
    assert coords["mean"][0] == pytest.approx(coords["mean"][1], rel=1e-6)
    assert coords["sample"][0] != pytest.approx(coords["sample"][1], rel=1e-3)


def test_the_retry_chain_takes_the_preset_s_kept_epoch_or_says_it_uses_the_sampling_network(full_run, caplog):
    from symat_jax import sampling
    from symat_jax.model import SCORE_MODULES

    workdir, _ = full_run
    preset = configs.get_sampler_preset("carbon_24", "default")
    assert preset.stage(configs.RetryConfig).checkpoint == "40"
    assert configs.get_config("carbon_24").keep_epochs == (40,)  # training keeps it because the preset names it
    # The tiny run keeps epochs 2-4, not the preset's 40: the sampling network, with a warning naming the epoch.
    with caplog.at_level(logging.WARNING):
        run40 = sampling.load_sampling_run(workdir, preset)
    assert "keeps no epoch 40" in caplog.text and "retry" not in run40.stage_params
    assert run40.epochs["retry_epoch"] == run40.epochs["score_epoch"] == 4
    early = preset.replace_stage(configs.RetryConfig(checkpoint="2"))
    loaded = sampling.load_sampling_run(workdir, early)
    assert loaded.epochs["retry_epoch"] == 2
    reference = run.load_run(workdir, "2", "ema")
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(loaded.stage_params["retry"]["params"][SCORE_MODULES[1]])[0],
                                  jax.tree_util.tree_leaves(reference.params["params"][SCORE_MODULES[1]])[0])
    with pytest.raises(FileNotFoundError, match="kept epochs"):  # asked for by the caller: no silent fallback
        sampling.load_sampling_run(workdir, preset.replace_stage(configs.RetryConfig(checkpoint="1")))
    plain = sampling.load_sampling_run(workdir, preset.without(configs.RetryConfig))
    assert "retry_epoch" not in plain.epochs and not plain.stage_params


def test_sampling_a_run_while_it_writes_a_checkpoint_leaves_the_save_whole_and_the_training_unchanged(
        full_run, tiny_config, tiny_data, tmp_path, capsys):
    import os
    import subprocess
    import sys
    import time

    from symat_jax import cli
    from test_outputs import CHAIN, _folder_digest

    workdir, _ = full_run
    run_dir, go = tmp_path / "run", tmp_path / "go"
    helper = [sys.executable, str(pathlib.Path(__file__).with_name("kill_helper.py")), str(run_dir), str(tmp_path / "cache"),
              "--pause-in-save", "1", "--go", str(go)]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    child = subprocess.Popen(helper, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 600
        while not (tmp_path / "saving").exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "saving").exists(), child.stderr.read().decode()[-2000:] if child.poll() is not None else ""
        # Epoch 2's checkpoint is written but not committed: orbax's temporary folder, as in any save in progress.
        saving = pathlib.Path((tmp_path / "saving").read_text())
        assert saving.is_dir() and "tmp" in saving.name
        before = _folder_digest(run_dir)
        out = tmp_path / "samples"
        assert cli.main(["sample", "--workdir", str(run_dir), "--num", "2", "--out", str(out), "--preset", "paper",
                         "--prior", "standard", "--checkpoint", "latest", *CHAIN]) == 0
        assert _folder_digest(run_dir) == before and saving.is_dir()  # the save in progress untouched
        assert json.loads((out / "summary.json").read_text())["checkpoint_epoch"] == 1  # the newest committed one
        go.touch()
        assert child.wait(timeout=600) == 0, child.stderr.read().decode()[-2000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The paused save committed whole, and the training ran on to the uninterrupted run's parameters.
    a, meta_a = _params(workdir, tiny_config, tiny_data[0])
    b, meta_b = _params(run_dir, tiny_config, tiny_data[0])
    assert meta_a["epoch"] == meta_b["epoch"] == 3
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1", "2", "3"]
