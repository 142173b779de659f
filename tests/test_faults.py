"""The fault suite: every bad input and misuse in ``tests/data/bad/cases.json`` gets its clear answer and harms nothing.

Each case runs the ``symat`` command line in-process and checks the exit
status, that the output names the problem (no traceback), that what still
loads is reported, and that no file which existed before the command changed
(a refused command also creates no file or folder).
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import pathlib
import re
import shutil

import pytest

from symat_jax import cli

BAD = pathlib.Path(__file__).resolve().parent / "data" / "bad"
CASES = json.loads((BAD / "cases.json").read_text())["cases"]


def _snapshot(*folders: pathlib.Path) -> dict[str, str]:
    """Return {path: digest of its bytes, or 'dir'} of everything under ``folders``."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            out[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _setup(op: list, fill) -> None:
    """Apply one setup step of a case."""
    kind, *args = op
    if kind == "copy":
        src, dst = pathlib.Path(fill(args[0])), pathlib.Path(fill(args[1]))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    elif kind == "write":
        dst = pathlib.Path(fill(args[0]))
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(args[1])
    elif kind == "json-set":  # (path, key, value): one key of a JSON file changed
        dst = pathlib.Path(fill(args[0]))
        dst.write_text(json.dumps({**json.loads(dst.read_text()), args[1]: args[2]}))
    elif kind in ("truncate", "delete", "zero"):
        paths = [pathlib.Path(p) for p in glob.glob(fill(args[0]))]
        assert paths, f"setup matched nothing: {args[0]}"
        for path in paths:
            if path.is_file():
                if kind == "delete":
                    path.unlink()
                elif kind == "zero":  # the bytes of a disk that lost them: same length, all zeros
                    path.write_bytes(bytes(path.stat().st_size))
                else:
                    path.write_bytes(path.read_bytes()[: int(args[1])])
    else:
        raise ValueError(f"unknown setup step {kind}")


def test_the_corpus_is_large_and_covers_every_kind():
    kinds = {c["kind"] for c in CASES}
    assert len(CASES) >= 40 and len({c["name"] for c in CASES}) == len(CASES)
    assert {"data row", "data file", "samples file", "output path", "run folder", "argument range", "JSON file"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_a_bad_input_is_answered_clearly_and_harms_nothing(case, full_run, tmp_path, monkeypatch, capsys, caplog):
    # A damaged-checkpoint case leaves orbax's failed read task behind; asyncio logs its traceback when the task is
    # collected, which can fall into the next case's log. Collect it here, before this case's output counts.
    gc.collect()
    caplog.clear()
    scratch, run_copy = tmp_path / "scratch", tmp_path / "run"
    scratch.mkdir()
    if any("{run}" in a for a in case["argv"] + [x for op in case.get("setup", []) for x in op if isinstance(x, str)]):
        shutil.copytree(full_run[0], run_copy)
    monkeypatch.setenv("SYMAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SYMAT_DOWNLOAD_URL", "http://127.0.0.1:9/none")

    def fill(text: str) -> str:
        return text.replace("{bad}", str(BAD)).replace("{tmp}", str(scratch)).replace("{run}", str(run_copy))

    for op in case.get("setup", []):
        _setup(op, fill)
    watched = [f for f in (BAD, scratch, run_copy) if f.exists()]
    before = _snapshot(*watched)
    try:
        code = cli.main([fill(a) for a in case["argv"]])
    except SystemExit as exc:  # argparse refuses out-of-range arguments itself
        code = exc.code
    captured = capsys.readouterr()
    said = captured.out + captured.err + caplog.text
    assert code == case["exit"], said
    assert re.search(case["message"], said), said
    assert "Traceback" not in said and "Task exception" not in said and "absl" not in said
    if "kept" in case:
        assert re.search(case["kept"], captured.out), captured.out
    after = _snapshot(*watched)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"changed or removed: {changed}"
    if case["exit"] != 0:
        assert sorted(after) == sorted(before), f"a refused command created {sorted(set(after) - set(before))}"
