"""The sampler's presets behave as before they became stages, ``sampling.sample`` returns what ``symat sample`` writes,
and the compiled chain's cache key is its config alone."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import pytest

from symat_jax import cli, configs, geometry, sampling
from symat_jax.crystals import CrystalSet
from symat_jax.data import read_csv
from symat_jax.stage_flags import apply_stage_args

from conftest import csv_rows, write_csv
from test_model import crystals, params  # noqa: F401  (fixtures)
from test_sampling import FEW, _biased, _run, _statics

# Array hashes of what `symat sample` and `symat relax` wrote on the tiny run before the sampler became stages
# (same run, same seed, same crystals). XLA's CPU kernels make these bits; a test machine of another kind may
# round differently, and then these hashes, not the sampler, need recording anew (on the code they pin).
SAMPLE_ARGS = {
    "paper": ["--preset", "paper", "--chain-num-levels", "5", "--chain-steps-per-level", "3"],
    "default": ["--preset", "default", "--chain-band", "0.03", "0.1", "20", "--retry-checkpoint", "2"],
}
SAMPLE_HASHES = {
    "paper": {"samples.npz": "4895f68711a80483"},
    "default": {"first_pass.npz": "8c34162847fadc67", "relax.npz": "aee1be4845449daa",
                "samples.npz": "2496f4a7c8edeb71", "unrelaxed.npz": "01618563fe861796"},
}
RELAX_ARGS = {
    "hops": ["--hop-rounds", "3", "--hop-above", "-7.2", "--relax-steps", "300"],
    "guarded": ["--hop-rounds", "2", "--hop-above", "-7.2", "--relax-steps", "300", "--relax-guard", "3", "4", "1.8",
                "--hop-guard", "3", "4", "1.8"],
}
RELAX_HASHES = {
    "hops": {"relax.npz": "b2576af649d0b276", "samples.npz": "fca769e7a60a0eb7", "unrelaxed.npz": "cb05e7e2c8312cb8"},
    "guarded": {"relax.npz": "aff0641c040de262", "samples.npz": "fe484e6192ac285c", "unrelaxed.npz": "cb05e7e2c8312cb8"},
}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """Return the hash of arrays by name: names, dtypes and bytes."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(str(arrays[k].dtype).encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


def _folder_hashes(folder: pathlib.Path) -> dict[str, str]:
    """Return the array hash of every ``.npz`` file in ``folder``."""
    out = {}
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as z:
            out[f.name] = _digest({k: z[k] for k in z.files})
    return out


@pytest.fixture(scope="module")
def sampled(full_run, tmp_path_factory):
    """Return ``{preset: folder}`` of ``symat sample`` on the tiny run (10 crystals, seed 3)."""
    workdir, _ = full_run
    root = tmp_path_factory.mktemp("presets")
    for name, args in SAMPLE_ARGS.items():
        assert cli.main(["sample", "--workdir", str(workdir), "--num", "10", "--out", str(root / name),
                         "--batch-size", "8", "--seed", "3", *args]) == 0
    return root


@pytest.mark.parametrize("name", list(SAMPLE_ARGS))
def test_symat_sample_writes_the_same_crystals_as_before_the_stages(sampled, name):
    assert _folder_hashes(sampled / name) == SAMPLE_HASHES[name]


def test_sampling_sample_returns_in_memory_what_symat_sample_writes(full_run, sampled):
    workdir, _ = full_run
    parser = cli.argparse.ArgumentParser()
    cli.add_stage_args(parser)
    preset = apply_stage_args(configs.get_sampler_preset("carbon_24", "default"),
                              parser.parse_args(SAMPLE_ARGS["default"][2:]))
    samples = sampling.sample(workdir, preset, 10, 3, batch_size=8, progress=False)
    files = samples.npz_files()
    assert sorted(files) == sorted(SAMPLE_HASHES["default"])
    for name, arrays in files.items():
        with np.load(sampled / "default" / name) as z:
            assert sorted(z.files) == sorted(arrays)
            for k in z.files:
                assert _digest({k: z[k]}) == _digest({k: arrays[k]}), (name, k)  # bytes: NaN records too
    assert json.loads((sampled / "default" / "rejects.json").read_text()) == samples.rejects
    assert sorted(p.stem for p in (sampled / "default" / "cif").iterdir()) == sorted(str(i) for i in samples.index)
    summary = json.loads((sampled / "default" / "summary.json").read_text())
    assert summary["retry_epoch"] == 2 and summary["stages"]["retry"]["retried"] == samples.records["retry"]["retried"]
    assert summary["sampler"] == json.loads(json.dumps(preset.to_dict()))


def _noised_test_crystals(data_root: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Write the first 6 Carbon-24 test crystals, every atom moved by 0.15 A, as a samples folder; return it."""
    rows = csv_rows(data_root / "carbon_24" / "test.csv")[:6]
    cs = read_csv(write_csv(folder / "t.csv", rows), "carbon_24", with_graph=False, cache_dir=folder,
                  progress=False).crystal_set()
    rng = np.random.default_rng(0)
    frac = cs.frac_coords.copy()
    for i in range(len(cs)):
        a, b = cs.offsets[i], cs.offsets[i + 1]
        lat = geometry.lattice_matrix_np(cs.lengths[i], cs.angles[i])
        frac[a:b] = ((frac[a:b] @ lat + rng.normal(0, 0.15, (b - a, 3))) @ np.linalg.inv(lat)) % 1.0
    src = folder / "src"
    src.mkdir()
    np.savez(src / "samples.npz", num_atoms=cs.num_atoms, atom_types=cs.atom_types, frac_coords=frac,
             lengths=cs.lengths, angles=cs.angles, sample_index=np.arange(len(cs)))
    (src / "rejects.json").write_text("[]")
    return src


def test_symat_relax_writes_the_same_crystals_as_before_the_stages(data_root, tmp_path):
    src = _noised_test_crystals(data_root, tmp_path)
    for name, args in RELAX_ARGS.items():
        out = tmp_path / name
        assert cli.main(["relax", "--samples", str(src), "--out", str(out), "--seed", "4", *args]) == 0
        assert _folder_hashes(out) == RELAX_HASHES[name], name
    summary = json.loads((tmp_path / "guarded" / "summary.json").read_text())
    assert summary["num_kept"] == 6 and summary["num_hopped"] >= 1  # the hashes pin relaxations that ran
    relaxed = sampling.relax_crystals(CrystalSet.from_samples(src), configs.RelaxConfig(steps=300),
                                      configs.HopConfig(rounds=3, above=-7.2), seed=4, progress=False)
    with np.load(tmp_path / "hops" / "relax.npz") as z:
        assert _digest({k: z[k] for k in z.files}) == _digest(relaxed.arrays["relax"])


def test_presets_that_differ_only_in_host_stages_compile_the_chain_once(params):  # noqa: F811
    mean, std = np.array([1.6, 1.6, 1.6, 90.0, 90.0, 90.0]), np.array([0.05, 0.05, 0.05, 2.0, 2.0, 2.0])
    run = _run(_biased(params, 1, 3), _statics(mean, std))
    # A chain no other test compiles, so the count starts from nothing.
    chain = dataclasses.replace(FEW.chain, step_scale=1.234e-4)
    plain = FEW.replace_stage(chain)
    relaxed = plain.replace_stage(configs.RelaxConfig(steps=3)).replace_stage(configs.HopConfig(rounds=1))
    retried = plain.replace_stage(configs.RetryConfig(configs.CoordinationRule(30, 40, 1.8)))
    before = sampling.driver.TRACE_COUNT["chain"]
    a = sampling.sample(run, plain, 6, 1, batch_size=8, progress=False)
    once = sampling.driver.TRACE_COUNT["chain"]
    assert once == before + 1  # one bucket: 3-atom crystals
    b = sampling.sample(run, relaxed, 6, 1, batch_size=8, progress=False)
    c = sampling.sample(run, retried, 6, 1, batch_size=8, progress=False)  # the retry reruns the same program
    assert sampling.driver.TRACE_COUNT["chain"] == once
    np.testing.assert_array_equal(a.crystals.frac_coords, b.unrelaxed.frac_coords)
    np.testing.assert_array_equal(a.crystals.frac_coords, c.first_pass.frac_coords)
    sampling.sample(run, plain.replace_stage(dataclasses.replace(chain, steps_per_level=5)), 6, 1, batch_size=8,
                    progress=False)
    assert sampling.driver.TRACE_COUNT["chain"] == once + 1  # another chain is another program
