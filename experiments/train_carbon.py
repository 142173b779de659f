"""Train SyMat on Carbon-24: ``python -m experiments.train_carbon [--workdir W] [--preset paper|quick] [--resume]``.

Defaults: the paper preset (SPEC 2: Adam 1e-3; with Carbon-24's measured departures, batch 32 for 80 epochs
and an EMA decay of 0.999, ``configs.TRAINING_DEPARTURES``) in
``workdirs/carbon_24``; data from ``--data-root``, ``$SYMAT_DATA_ROOT`` or
``./data``. Interrupt it at any time and rerun with ``--resume``.
"""

from __future__ import annotations

import sys
from typing import Sequence

from experiments import common


def main(argv: Sequence[str] | None = None) -> int:
    """Train on Carbon-24 and return the exit status."""
    return common.train_main("carbon_24", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
