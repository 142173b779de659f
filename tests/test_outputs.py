"""Output folders: never an input, never a folder symat did not write, one writer at a time, whole or not at all;
readers never change a run; bad crystals in a samples file become rejects with their reason."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from symat_jax import cli
from symat_jax.crystals import CrystalSet
from symat_jax.outputs import MANIFEST, OutputFolder, check_readable

from test_train import _folder_digest

CHAIN = ["--chain-num-levels", "2", "--chain-steps-per-level", "2", "--chain-band", "none", "--batch-size", "4"]
FAST = CHAIN + ["--relax-steps", "30", "--hop-rounds", "1"]


def _sample(workdir, out, *extra, flags=FAST) -> int:
    return cli.main(["sample", "--workdir", str(workdir), "--num", "4", "--out", str(out), *flags, *extra])


def test_overwrite_never_deletes_an_input_or_a_folder_symat_did_not_write(full_run, tmp_path, capsys):
    workdir, _ = full_run
    before = _folder_digest(workdir)
    assert _sample(workdir, workdir, "--overwrite") == 2  # the run itself
    assert "is, holds or lies inside the input" in capsys.readouterr().err
    assert _sample(workdir, workdir / "checkpoints", "--overwrite") == 2  # inside the run
    assert _sample(workdir, workdir.parent, "--overwrite") == 2  # around the run
    assert _folder_digest(workdir) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    assert _sample(workdir, mine, "--overwrite") == 2
    assert "no symat command wrote" in capsys.readouterr().err and (mine / "notes.txt").exists()
    out = tmp_path / "samples"
    assert _sample(workdir, out) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["command"] == "symat sample" and "samples.npz" in manifest["files"]
    assert _sample(workdir, out, "--overwrite", "--seed", "1") == 0  # a folder symat wrote may be replaced
    assert not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())  # no lock or partial left
    # relax: its own source, or a folder holding it, is refused with every file intact.
    inner = tmp_path / "A" / "inner"
    shutil.copytree(out, inner)
    (tmp_path / "A" / "keep.txt").write_text("unrelated")
    held = _folder_digest(tmp_path / "A")
    assert cli.main(["relax", "--samples", str(inner / "samples.npz"), "--out", str(tmp_path / "A"), "--overwrite"]) == 2
    assert _folder_digest(tmp_path / "A") == held
    # evaluate: the report never replaces an input.
    samples_bytes = (out / "samples.npz").read_bytes()
    assert cli.main(["evaluate", "--samples", str(out / "samples.npz"), "--out", str(out / "samples.npz")]) == 2
    assert "is an input" in capsys.readouterr().err and (out / "samples.npz").read_bytes() == samples_bytes


def test_a_second_writer_is_refused_and_a_dead_writer_s_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".out.lock").write_text(json.dumps({"pid": sleeper.pid, "command": "symat sample"}))
        with pytest.raises(ValueError, match=f"being written by another command \\(process {sleeper.pid}\\)"):
            OutputFolder(out, command="test")
        with pytest.raises(ValueError, match="being written"):
            check_readable(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    # The writer is gone: its lock no longer holds, and the next writer takes it.
    with OutputFolder(out, command="test") as tmp:
        assert tmp != out and not out.exists()
        with pytest.raises(ValueError, match=f"being written by another command \\(process {os.getpid()}\\)"):
            OutputFolder(out, command="test")  # a second claim, even from this process, finds it held
        (tmp / "a.txt").write_text("x")
    assert (out / "a.txt").read_text() == "x" and json.loads((out / MANIFEST).read_text())["complete"]
    # An error inside the block changes nothing that existed.
    with pytest.raises(RuntimeError):
        with OutputFolder(out, command="test", overwrite=True) as tmp:
            (tmp / "b.txt").write_text("y")
            raise RuntimeError("stage failed")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a.txt"]
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / ".out.lock").exists()


def test_two_symat_sample_into_one_folder_the_second_is_refused_and_the_first_completes(full_run, tmp_path, capsys):
    import time

    workdir, _ = full_run
    out, go = tmp_path / "out", tmp_path / "go"
    args = ["sample", "--workdir", str(workdir), "--num", "4", "--out", str(out), *FAST]
    helper = [sys.executable, str(pathlib.Path(__file__).with_name("sample_kill_helper.py")), f"wait:{go}", "--"]
    first = subprocess.Popen(helper + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (tmp_path / ".out.lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / ".out.lock").exists(), first.stderr.read().decode()[-2000:] if first.poll() is not None else ""
        # The first writer holds the folder, mid-work: a second one is refused with one line and touches nothing.
        assert cli.main(args[:-len(FAST)] + ["--seed", "5", *FAST]) == 2
        err = capsys.readouterr().err
        assert f"being written by another command (process {first.pid})" in err and len(err.strip().splitlines()) == 1
        assert cli.main(args + ["--overwrite"]) == 2  # --overwrite does not take a folder being written either
        with pytest.raises(ValueError, match="being written"):
            check_readable(out)
        go.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert json.loads((out / MANIFEST).read_text())["complete"]
    check_readable(out)  # whole: a reader takes it
    with np.load(out / "samples.npz") as samples:
        assert len(samples["num_atoms"]) + len(json.loads((out / "rejects.json").read_text())) == 4
    assert not (tmp_path / ".out.lock").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("point", ["chain", "relax", "write:2"])
def test_kill_9_inside_symat_sample_leaves_a_folder_readers_refuse_and_a_rerun_completes(full_run, tmp_path, point):
    workdir, _ = full_run
    out = tmp_path / "out"
    args = ["sample", "--workdir", str(workdir), "--num", "4", "--out", str(out), *FAST]
    helper = [sys.executable, str(pathlib.Path(__file__).with_name("sample_kill_helper.py")), point, "--"]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    killed = subprocess.run(helper + args, capture_output=True, env=env)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not out.exists() or not (out / "samples.npz").exists()
    with pytest.raises(ValueError, match="incomplete"):
        check_readable(out)
    assert cli.main(["evaluate", "--samples", str(out), "--dataset", "carbon_24"]) == 2
    assert cli.main(args) == 0  # the same command again, no --overwrite needed
    reference = tmp_path / "reference"
    assert cli.main(args[:6] + [str(reference)] + args[7:]) == 0
    for name in ("samples.npz", "unrelaxed.npz", "relax.npz"):
        with np.load(out / name) as a, np.load(reference / name) as b:
            assert all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a.files), name
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_reading_a_run_changes_no_byte_of_it(full_run, tmp_path, capsys):
    workdir, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    # A save in progress, as orbax names it: sampling must leave it alone.
    partial = run / "checkpoints" / "3.orbax-checkpoint-tmp-123"
    partial.mkdir()
    (partial / "data").write_text("being written")
    before = _folder_digest(run)
    assert _sample(run, tmp_path / "s1", "--no-relax", flags=CHAIN) == 0
    assert _folder_digest(run) == before and partial.exists()
    shutil.rmtree(run / "best")
    assert _sample(run, tmp_path / "s2", "--preset", "paper", flags=CHAIN) == 2
    err = capsys.readouterr().err
    assert "best" in err and "latest" in err  # names what exists instead
    assert not (run / "best").exists() and not (tmp_path / "s2").exists()


def test_bad_crystals_in_a_samples_file_become_rejects_with_their_reason(tmp_path):
    frac = np.random.default_rng(0).random((9, 3))
    arrays = dict(num_atoms=np.array([2, 0, 2, 2, 3]), atom_types=np.array([6, 6, 6, 6, 6, 200, 6, 6, 6]),
                  frac_coords=frac, lengths=np.array([[3.0] * 3, [3.0] * 3, [-3.0, 3, 3], [3.0, np.nan, 3], [3.0] * 3]),
                  angles=np.full((5, 3), 90.0))
    arrays["frac_coords"][6] = np.inf
    folder = tmp_path / "s"
    folder.mkdir()
    np.savez(folder / "samples.npz", **arrays)
    (folder / "rejects.json").write_text(json.dumps([{"index": 9, "reason": "too many atoms"}]))
    crystals = CrystalSet.from_samples(folder)
    assert len(crystals) == 1 and crystals.num_rejected == 5
    reasons = [r["reason"] for r in crystals.rejects]
    assert any("no atoms" in r for r in reasons) and any("non-positive lattice length" in r for r in reasons)
    assert any("NaN" in r for r in reasons) and any("atomic number" in r for r in reasons)
    (folder / "rejects.json").write_text(json.dumps({"a": 1, "b": 2}))
    with pytest.raises(ValueError, match="rejects.json"):
        CrystalSet.from_samples(folder)


@pytest.mark.parametrize("seed, ok", [("0", True), (str(2**32 - 1), True), (str(2**32), False), ("-1", False),
                                      ("1180591620717411303424", False)])
def test_seeds_are_bounded_by_the_generators(tmp_path, capsys, seed, ok):
    from symat_jax.cli import seed_int

    if ok:
        assert seed_int(seed) == int(seed)
    else:
        with pytest.raises(SystemExit):
            cli.main(["sample", "--workdir", str(tmp_path), "--num", "1", "--out", str(tmp_path / "o"), "--seed", seed])
        assert "seed" in capsys.readouterr().err.lower()


def test_a_truncated_cache_is_named_set_aside_and_rebuilt(data_root, tmp_path, caplog):
    from symat_jax.data import read_csv

    from conftest import csv_rows, write_csv

    csv_path = write_csv(tmp_path / "t.csv", csv_rows(data_root / "carbon_24" / "test.csv")[:3])
    first = read_csv(csv_path, "carbon_24", with_graph=False, cache_dir=tmp_path / "cache", progress=False)
    (cached,) = [p for p in (tmp_path / "cache").rglob("*.npz")]
    cached.write_bytes(cached.read_bytes()[:100])
    again = read_csv(csv_path, "carbon_24", with_graph=False, cache_dir=tmp_path / "cache", progress=False)
    assert "is unreadable" in caplog.text and str(cached) in caplog.text
    assert cached.with_name(cached.name + ".corrupt").exists() and cached.exists()  # set aside, then rebuilt
    np.testing.assert_array_equal(first.frac_coords, again.frac_coords)
