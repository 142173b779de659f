"""Run a ``symat`` command in a child process that kills itself at a chosen point, for the kill -9 tests.

``python tests/sample_kill_helper.py chain|relax|write:N|decode:N|wait:FILE -- SYMAT_ARGS...``: SIGKILL on entering
the chain, on entering the relaxation, right after the N-th ``.npz`` file of the output is written, or (``symat
optimize``) on entering its N-th decode of a saved step; or, with
``wait:FILE``, pause on entering the chain until ``FILE`` exists and then finish (a writer caught mid-work).
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

import numpy as np

from symat_jax import cli, relax
from symat_jax.sampling import stages


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    """Patch the chosen point to kill the process, then run the ``symat`` command line."""
    point, args = sys.argv[1], sys.argv[3:]
    if point == "chain":
        def dying_chains(*a, **k):
            _die()
        stages.run_chains = dying_chains
    elif point == "relax":
        def dying_relax(*a, **k):
            _die()
        relax.relax_once = dying_relax
    elif point.startswith("write:"):
        limit, written = int(point.split(":")[1]), []
        real = np.savez

        def dying_savez(*a, **k):
            real(*a, **k)
            written.append(a[0])
            if len(written) == limit:
                _die()
        np.savez = dying_savez
    elif point.startswith("decode:"):
        from symat_jax import optimize_cli

        limit, calls, real_decode = int(point.split(":")[1]), [], optimize_cli._decode_step

        def dying_decode(*a, **k):
            calls.append(1)
            if len(calls) == limit:
                _die()
            return real_decode(*a, **k)
        optimize_cli._decode_step = dying_decode
    elif point.startswith("wait:"):
        go, real_chains = pathlib.Path(point.split(":", 1)[1]), stages.run_chains

        def waiting_chains(*a, **k):
            while not go.exists():
                time.sleep(0.05)
            return real_chains(*a, **k)
        stages.run_chains = waiting_chains
    else:
        raise SystemExit(f"unknown point {point!r}")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
