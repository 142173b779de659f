"""Walls between layers: code that runs inside jit imports no host-side module, sampling never imports training, no import circle."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "symat_jax"
# Modules whose presence means host-side work (pymatgen, the CSV reader,
# batching, checkpoints) or the training loop has leaked into a jit-side import.
FORBIDDEN = ("pymatgen", "symat_jax.train", "symat_jax.data.dataset", "symat_jax.data.canonical",
             "symat_jax.input_pipeline", "symat_jax.run", "symat_jax.checkpoints", "orbax", "matminer", "smact")
JIT_SIDE = ["symat_jax.networks", "symat_jax.model", "symat_jax.sampling", "symat_jax.sampling.chain",
            "symat_jax.sampling.schedule", "symat_jax.graphs", "symat_jax.tersoff", "symat_jax.fire", "symat_jax.relax",
            "symat_jax.statics", "symat_jax.crystals", "symat_jax.configs", "symat_jax.optimize",
            "symat_jax.property_head"]


def _loaded_after(code: str) -> list[str]:
    """Return the modules loaded after running ``code`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _leaked(loaded: list[str], forbidden=FORBIDDEN) -> list[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("module", JIT_SIDE)
def test_jit_side_modules_import_no_host_side_code(module):
    leaked = _leaked(_loaded_after(f"import {module}"))
    assert not leaked, f"importing {module} loads {leaked[:5]}"


def test_the_model_loads_nothing_of_the_data_layer():
    leaked = _leaked(_loaded_after("import symat_jax.model"), ("symat_jax.data",))
    assert not leaked, leaked


def test_functions_that_import_lazily_stay_on_their_floor():
    """Building presets and schedules, sampling a run in memory and relaxing load no checkpoints, CSV reader or pymatgen."""
    code = """
import numpy as np, jax
from symat_jax import configs, sampling
from symat_jax.crystals import CrystalSet
preset = configs.get_sampler_preset("carbon_24", "default")
model = configs.get_config("carbon_24", "quick").model
sampling.build_schedule(preset.chain, model, np.ones(model.num_levels))
frac = np.array([[0, 0, 0], [0.25, 0.25, 0.25]])
cs = CrystalSet(np.array([2]), np.array([6, 6]), frac, np.full((1, 3), 2.52), np.full((1, 3), 60.0))
sampling.relax_crystals(cs, configs.RelaxConfig(steps=3), configs.HopConfig(rounds=1, above=-100.0), progress=False)
"""
    leaked = _leaked(_loaded_after(code))
    assert not leaked, leaked


def test_networks_load_only_jax_flax_and_their_own_basis():
    ours = [m for m in _loaded_after("import symat_jax.networks") if m.startswith("symat_jax")]
    assert set(ours) <= {"symat_jax", "symat_jax.networks", "symat_jax.basis", "symat_jax.graphs",
                         "symat_jax.neighbors", "symat_jax.geometry"}, ours


def _module_imports() -> dict[str, set[str]]:
    """Return each ``symat_jax`` module's imports of other ``symat_jax`` modules at import time (module level)."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        found: set[str] = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for n in node.body if isinstance(node, ast.Try) else [node]:
                if isinstance(n, ast.Import):
                    found |= {a.name for a in n.names}
                elif isinstance(n, ast.ImportFrom) and n.module:
                    found |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
        # A submodule importing its own package is how Python loads packages, not a circle.
        graph[name] = {m for m in found if m in files and m != name and not name.startswith(m + ".")}
    return graph


def test_no_import_circle_among_the_package_s_modules():
    graph = _module_imports()
    assert "symat_jax.sampling.stages" in graph and graph["symat_jax.sampling.stages"]  # the graph was built
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if not state.get(v) and (cycle := visit(v)):
                return cycle
        path.pop()
        state[u] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)
