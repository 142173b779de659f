"""Train the tiny test run in a child process, for the kill -9 test of ``test_train.py``.

``python tests/kill_helper.py WORKDIR DATA_CACHE [--resume] [--die-in-save EPOCH --seed S]``:
with ``--die-in-save`` the process sends itself SIGKILL a random few
milliseconds into writing the checkpoint of that (0-based) epoch.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import signal
import sys
import threading

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
    args = p.parse_args()
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
