"""Train SyMat on Perov-5: ``python -m experiments.train_perov [--workdir W] [--preset paper|quick] [--resume]``.

Defaults: the paper preset (SPEC 2: 700 epochs, batch 256, Adam 1e-3) in
``workdirs/perov_5``; data from ``--data-root``, ``$SYMAT_DATA_ROOT`` or
``./data``. Interrupt it at any time and rerun with ``--resume``.
"""

from __future__ import annotations

import sys
from typing import Sequence

from experiments import common


def main(argv: Sequence[str] | None = None) -> int:
    """Train on Perov-5 and return the exit status."""
    return common.train_main("perov_5", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
