"""Walls between layers: code that runs inside jit imports no host-side module, and sampling never imports training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules whose presence means host-side work (pymatgen, the CSV reader,
# batching) or the training loop has leaked into a jit-side import.
FORBIDDEN = ("pymatgen", "symat_jax.train", "symat_jax.data.dataset", "symat_jax.data.canonical",
             "symat_jax.input_pipeline", "matminer", "smact")


def _loaded_after_import(module: str) -> list[str]:
    """Return the modules loaded by importing ``module`` in a fresh interpreter."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["symat_jax.networks", "symat_jax.model", "symat_jax.sampling", "symat_jax.graphs",
                                    "symat_jax.run"])
def test_jit_side_modules_import_no_host_side_code(module):
    loaded = _loaded_after_import(module)
    leaked = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not leaked, f"importing {module} loads {leaked[:5]}"


def test_networks_load_only_jax_flax_and_their_own_basis():
    ours = [m for m in _loaded_after_import("symat_jax.networks") if m.startswith("symat_jax")]
    assert set(ours) <= {"symat_jax", "symat_jax.networks", "symat_jax.basis", "symat_jax.graphs",
                         "symat_jax.neighbors", "symat_jax.geometry"}, ours
