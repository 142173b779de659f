"""Classify every fault-suite case (``tests/data/bad/cases.json``) against one code tree: clear / vague / traceback / silent / damaged / hang.

``PYTHONPATH=TREE python tests/fault_census.py CASES_JSON RUN_DIR OUT_JSON``: ``TREE`` is a checkout of the code under
test (``git worktree add TREE COMMIT``), ``RUN_DIR`` a small trained run (what ``full_run`` trains).
The fault suite asserts "clear" for every case on the current code; this script measures an older commit.
"""
import contextlib, io, json, logging, pathlib, re, shutil, signal, sys, tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_faults import BAD, _setup, _snapshot  # noqa: E402
from symat_jax import cli  # noqa: E402

cases = json.loads(pathlib.Path(sys.argv[1]).read_text())["cases"]
run_src = pathlib.Path(sys.argv[2])
results = []


class Hang(Exception):
    pass


def alarm(*_):
    raise Hang()


signal.signal(signal.SIGALRM, alarm)
for case in cases:
    tmp = pathlib.Path(tempfile.mkdtemp())
    scratch, run_copy = tmp / "scratch", tmp / "run"
    scratch.mkdir()
    shutil.copytree(run_src, run_copy)
    fill = lambda t: t.replace("{bad}", str(BAD)).replace("{tmp}", str(scratch)).replace("{run}", str(run_copy))
    try:
        for op in case.get("setup", []):
            _setup(op, fill)
    except Exception as e:  # a setup op the old suite lacks still applies
        results.append(dict(name=case["name"], cls="setup-error", said=str(e)))
        continue
    watched = [f for f in (BAD, scratch, run_copy) if f.exists()]
    before = _snapshot(*watched)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logging.getLogger().addHandler(handler)
    signal.alarm(180)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                code = cli.main([fill(a) for a in case["argv"]])
            except SystemExit as exc:
                code = exc.code
            except Hang:
                code = "hang"
            except BaseException:  # noqa: BLE001
                import traceback
                traceback.print_exc(file=buf)
                code = "exception"
    finally:
        signal.alarm(0)
        logging.getLogger().removeHandler(handler)
    said = buf.getvalue()
    after = _snapshot(*watched)
    changed = [p for p, d in before.items() if after.get(p) != d]
    if code == "hang":
        cls = "hang"
    elif changed:
        cls = "damaged"
    elif "Traceback" in said or "unexpected" in said or code == "exception":
        cls = "traceback"
    elif code == case["exit"] and re.search(case["message"], said):
        cls = "clear"
    elif code == 0 and case["exit"] != 0:
        cls = "silent"
    else:
        cls = "vague"
    results.append(dict(name=case["name"], cls=cls, code=code, said=said[-300:], changed=changed[:3]))
    print(f"{cls:10s} {case['name']}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
pathlib.Path(sys.argv[3]).write_text(json.dumps(results, indent=1))
from collections import Counter
print(Counter(r["cls"] for r in results))
