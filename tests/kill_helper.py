"""Train the tiny test run in a child process, for the kill -9 test of ``test_train.py``.

``python tests/kill_helper.py WORKDIR DATA_CACHE [--resume] [--die-in-save EPOCH --seed S] [--pause-in-save EPOCH --go FILE]``:
with ``--die-in-save`` the process sends itself SIGKILL a random few
milliseconds into writing the checkpoint of that (0-based) epoch; with
``--pause-in-save`` it stops once that checkpoint's files are written and
before orbax commits them (renames its temporary folder), writes
``WORKDIR/../saving``, and goes on when ``FILE`` exists.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import signal
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from conftest import DATA, make_tiny_config, make_tiny_data  # noqa: E402
from symat_jax import train  # noqa: E402
from symat_jax.checkpoints import RunCheckpoints  # noqa: E402


def main() -> int:
    """Train (or resume) the tiny run; return 0 unless killed."""
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("cache")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-in-save", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pause-in-save", type=int, default=None)
    p.add_argument("--go", default=None)
    args = p.parse_args()
    if args.pause_in_save is not None:
        real_rename, go = os.rename, pathlib.Path(args.go)

        def pausing_rename(src, dst, *a, **k):
            src, dst = pathlib.Path(src), pathlib.Path(dst)
            if dst.parent.name == "checkpoints" and dst.name == str(args.pause_in_save) and "tmp" in src.name:
                (pathlib.Path(args.workdir).parent / "saving").write_text(str(src))
                while not go.exists():
                    time.sleep(0.05)
            return real_rename(src, dst, *a, **k)

        os.rename = pausing_rename
    if args.die_in_save is not None:
        real_save = RunCheckpoints.save
        delay = random.Random(args.seed).uniform(0.0, 0.05)

        def dying_save(self, epoch, *a, **k):
            if epoch == args.die_in_save:
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            return real_save(self, epoch, *a, **k)

        RunCheckpoints.save = dying_save
    data = make_tiny_data(DATA, pathlib.Path(args.cache))
    train.train(make_tiny_config(), args.workdir, datasets=data, progress=False, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
