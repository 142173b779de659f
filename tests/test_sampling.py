"""The sampler: the compiled chain equals a Python loop of jitted steps; decoding; buckets; CIF output; rejects; the retry."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Structure

from symat_jax import sampling, score
from symat_jax.configs import (ChainConfig, CoordinationRule, DecodeConfig, RetryConfig, SamplerPreset,
                               StandardPrior)
from symat_jax.model import SyMat
from symat_jax.neighbors import required_image_range
from symat_jax.statics import LatticeStandardizer, RunStatics

from test_model import CONFIG, params  # noqa: F401  (fixture)
from test_model import crystals  # noqa: F401  (fixture)

NORM = jnp.asarray(np.sqrt(2) * score.noise_levels(), jnp.float32)


def _statics(mean=(0.0,) * 6, std=(1.0,) * 6, images=(3, 3, 3)) -> RunStatics:
    """Return run statics with the test's normaliser and a given lattice standardiser."""
    return RunStatics(tuple(float(x) for x in NORM), tuple(images), 1,
                      LatticeStandardizer(tuple(float(x) for x in mean), tuple(float(x) for x in std)))


FEW_CHAIN = ChainConfig(num_levels=3, steps_per_level=4, step_scale=1e-4, temp_coord=0.01)
FEW = SamplerPreset("few", "latest", "raw", StandardPrior(), DecodeConfig(), (FEW_CHAIN,))


def _run(net_params, statics: RunStatics) -> sampling.SamplingRun:
    """Return a sampling run of the test model (no run folder)."""
    return sampling.SamplingRun("carbon_24", CONFIG, statics, net_params)


def python_loop_chain(net_params, key, types, mask, lat, z_pos, x0=None, *, schedule, model, max_images,
                      keep_levels=False):
    """Return the chain's outputs stepped from Python, one jitted step at a time (the slow reference)."""
    graph = sampling.chain.graph_config(model, max_images)
    step = jax.jit(sampling.langevin_step, static_argnames=("model", "graph"))
    k0, keys = sampling.chain.level_keys(key, len(schedule))
    x = sampling.initial_positions(k0, lat, mask) if x0 is None else x0
    overflow = jnp.zeros(mask.shape[0], bool)
    inputs = dict(lattice=lat, atom_types=types, atom_mask=mask, z_pos=z_pos)
    states = []
    for level in range(len(schedule)):
        for i in range(schedule.steps[level]):
            x, ovf = step(net_params, x, jax.random.fold_in(keys[level], i), alpha=jnp.float32(schedule.alphas[level]),
                          norm=jnp.float32(schedule.norms[level]), temp=jnp.float32(schedule.temps[level]),
                          model=model, graph=graph, **inputs)
            overflow = overflow | ovf
        states.append(sampling.chain.to_frac(x, lat, mask))
    if schedule.final_denoise is not None:
        x = sampling.denoise(net_params, x, norm=jnp.float32(schedule.norms[-1]), scale=schedule.final_denoise, model=model,
                             graph=graph, **inputs)
    out = (sampling.chain.to_frac(x, lat, mask), overflow)
    return out + (jnp.stack(states),) if keep_levels else out


def _inputs(crystals, idx):  # noqa: F811
    lat = np.stack([crystals.crystal(i).lattice() for i in idx]).astype(np.float32)
    types = np.zeros((len(idx), 16), np.int32)
    for r, i in enumerate(idx):
        types[r, : crystals.num_atoms[i]] = crystals.crystal(i).atomic_numbers
    z_pos = jax.random.normal(jax.random.PRNGKey(5), (len(idx), CONFIG.latent_pos))
    return jnp.asarray(types), jnp.asarray(types > 0), jnp.asarray(lat), z_pos, required_image_range(lat, 3.0)


def test_compiled_sampler_equals_python_loop(params, crystals):  # noqa: F811
    types, mask, lat, z_pos, images = _inputs(crystals, [0, 3, 5])
    # A small step size keeps the dynamics from amplifying float32 rounding
    # (different op fusion in the two programs) beyond 1e-5 within 12 steps.
    schedule = sampling.build_schedule(dataclasses.replace(FEW_CHAIN, step_scale=1e-6), CONFIG, NORM)
    kw = dict(schedule=schedule, model=CONFIG, max_images=images)
    key = jax.random.PRNGKey(11)
    fast = jax.jit(lambda p, k: sampling.run_chain(p, k, types, mask, lat, z_pos, **kw))(params, key)
    slow = python_loop_chain(params, key, types, mask, lat, z_pos, **kw)
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-5)
    np.testing.assert_array_equal(fast[1], slow[1])
    frac = np.asarray(fast[0])
    m = np.asarray(mask)
    assert np.all(np.abs(frac[m]) <= 0.5 + 1e-5) and not np.any(frac[~m])
    start = sampling.initial_positions(jax.random.split(key)[0], lat, mask)
    assert not np.allclose(fast[0], jnp.einsum("bni,bij->bnj", start, jnp.linalg.inv(lat)), atol=1e-3)  # it moved


def test_generate_is_jittable_and_reproducible(params):  # noqa: F811
    fn = jax.jit(sampling.generate, static_argnums=(2,), static_argnames=("statics", "model", "preset", "max_images"))
    kw = dict(statics=_statics((1.6, 1.8, 2.1, 80.0, 85.0, 95.0), (0.2,) * 6), model=CONFIG, preset=FEW)
    a = fn(params, jax.random.PRNGKey(0), 6, **kw)
    b = fn(params, jax.random.PRNGKey(0), 6, **kw)
    c = fn(params, jax.random.PRNGKey(1), 6, **kw)
    np.testing.assert_array_equal(a.frac_coords, b.frac_coords)
    assert not np.array_equal(a.frac_coords, c.frac_coords)
    np.testing.assert_array_equal(np.sum(a.atom_types > 0, axis=1), np.minimum(a.num_atoms, CONFIG.max_atoms))


def test_decoding_builds_compositions_from_the_decoders(params):  # noqa: F811
    z = sampling.sample_latents(jax.random.PRNGKey(2), 16, CONFIG, FEW.prior)
    dec = sampling.decode_crystals(params, z, jax.random.PRNGKey(3), model=CONFIG, decode=FEW.decode,
                                   statics=_statics())
    net = SyMat(CONFIG)
    k_logits, e_logits = net.apply(params, z.z_comp, method=SyMat.decode_composition)
    k = np.argmax(k_logits, axis=-1) + 1
    for b in range(16):
        present = set(np.asarray(dec.atom_types[b])[np.asarray(dec.atom_types[b]) > 0])
        top = set(np.argsort(-np.asarray(e_logits[b]))[: k[b]] + 1)
        if dec.num_atoms[b] <= CONFIG.max_atoms:
            assert present == top  # exactly the top-k elements, each at least once
    sampled = sampling.decode_crystals(params, z, jax.random.PRNGKey(3), model=CONFIG,
                                       decode=DecodeConfig(sample_temperature=1.0), statics=_statics())
    assert not np.array_equal(sampled.atom_types, dec.atom_types)


def _biased(base, k, count):
    """Return params whose decoders pick ``k`` elements with ``count`` atoms each (almost surely)."""
    p = jax.tree_util.tree_map(lambda x: x, base)
    inner = p["params"]
    inner["num_types_decoder"]["Dense_1"]["bias"] = inner["num_types_decoder"]["Dense_1"]["bias"].at[k - 1].add(50.0)
    inner["count_decoder"]["Dense_1"]["bias"] = inner["count_decoder"]["Dense_1"]["bias"].at[count - 1].add(50.0)
    return p


def test_sample_buckets_and_reproduces(params):  # noqa: F811
    # Lattice mean/std that decode to sensible cells: lengths ~1.6 A * N^(1/3), angles ~90.
    mean, std = np.array([1.6, 1.6, 1.6, 90.0, 90.0, 90.0]), np.array([0.05, 0.05, 0.05, 2.0, 2.0, 2.0])
    run = _run(_biased(params, 1, 3), _statics(mean, std))  # 3-atom crystals: padded to the 4-atom bucket, not to 24
    res = sampling.sample(run, FEW, 10, 4, batch_size=4, progress=False)
    chain = res.records["chain"]
    assert len(res) == 10 and not res.rejects
    assert np.all(res.crystals.num_atoms == 3)
    assert chain["padded_atom_share"] == pytest.approx(1 - 30 / (12 * 4))  # 3 chunks of 4 rows x 4 slots
    assert chain["compile_seconds"] > 0 and chain["run_seconds"] > 0
    again = sampling.sample(run, FEW, 10, 4, batch_size=4, progress=False)
    assert again.records["chain"]["compile_seconds"] == 0.0  # compiled once per bucket shape
    np.testing.assert_array_equal(res.crystals.frac_coords, again.crystals.frac_coords)
    out = res.cdvae()
    assert out["num_atoms"].sum() == len(out["atom_types"]) == len(out["frac_coords"])
    assert list(res.npz_files()) == ["samples.npz"]  # a chain alone writes no stage files


def test_too_many_atoms_are_rejected_not_cut(params):  # noqa: F811
    mean, std = np.array([1.6, 1.6, 1.6, 90.0, 90.0, 90.0]), np.array([0.05, 0.05, 0.05, 2.0, 2.0, 2.0])
    res = sampling.sample(_run(_biased(params, 5, 7), _statics(mean, std)), FEW, 3, 4, progress=False)  # 35 > 24 atoms
    assert not len(res) and len(res.rejects) == 3 and res.crystals.num_rejected == 3
    assert all(r["num_atoms"] == 35 and "max_atoms=24" in r["reason"] for r in res.rejects)


def test_fitted_counts_decode_cells_that_fit(params):  # noqa: F811
    mean, std = np.array([1.6, 1.6, 1.6, 90.0, 90.0, 90.0]), np.array([0.05, 0.05, 0.05, 2.0, 2.0, 2.0])
    preset = dataclasses.replace(FEW, decode=DecodeConfig(fit_counts=True))
    res = sampling.sample(_run(_biased(params, 5, 7), _statics(mean, std)), preset, 3, 4, progress=False)
    assert not res.rejects and len(res) == 3
    # Five elements whose counts' argmax is 7 (35 atoms, 24 fit): the best fit keeps all five elements, three of
    # them at 7 (four would be 28) and the other two at 1-2 atoms between them.
    for k in range(3):
        _, counts = np.unique(res.crystals.crystal(k)[0], return_counts=True)
        assert len(counts) == 5 and sorted(counts)[2:] == [7, 7, 7] and 23 <= counts.sum() <= CONFIG.max_atoms


def test_written_cifs_parse_back_to_the_same_crystals(params, tmp_path):  # noqa: F811
    from symat_jax.generate_cli import write_samples

    mean, std = np.array([1.7, 1.7, 1.7, 90.0, 90.0, 90.0]), np.array([0.1, 0.1, 0.1, 5.0, 5.0, 5.0])
    res = sampling.sample(_run(_biased(params, 1, 5), _statics(mean, std)), FEW, 4, 8, progress=False)
    write_samples(res, tmp_path)
    saved = np.load(tmp_path / "samples.npz")
    starts = np.concatenate([[0], np.cumsum(saved["num_atoms"])])
    for k, i in enumerate(res.index):
        types, lengths, angles, frac = res.crystals.crystal(k)
        s = Structure.from_file(tmp_path / "cif" / f"{i}.cif")
        np.testing.assert_allclose(s.lattice.abc, lengths, rtol=1e-5)
        np.testing.assert_allclose(s.lattice.angles, angles, atol=1e-4)
        assert [site.specie.Z for site in s] == list(types)
        d = s.frac_coords - frac
        np.testing.assert_allclose(d - np.round(d), 0, atol=1e-5)  # same sites up to lattice translations
        np.testing.assert_allclose(saved["frac_coords"][starts[k] : starts[k + 1]], frac)


def _pymatgen_in_range(types, lengths, angles, frac, cutoff, low, high) -> float:
    """Return the share of atoms with low..high neighbours within cutoff, counted by pymatgen (the slow reference)."""
    from pymatgen.core import Lattice

    s = Structure(Lattice.from_parameters(*lengths, *angles), [int(t) for t in types], frac)
    counts = np.array([len(n) for n in s.get_all_neighbors(cutoff)])
    return float(np.mean((counts >= low) & (counts <= high)))


def test_retry_reruns_exactly_the_crystals_with_atoms_out_of_range_and_keeps_the_better_chain(params):  # noqa: F811
    mean, std = np.array([1.7, 1.7, 1.7, 90.0, 90.0, 90.0]), np.array([0.1, 0.1, 0.1, 5.0, 5.0, 5.0])
    p = _biased(params, 1, 4)
    other = jax.tree_util.tree_map(lambda x: x, p)  # another score network: its head's weights flipped
    other["params"]["score_head"] = jax.tree_util.tree_map(lambda x: -x, other["params"]["score_head"])
    statics = _statics(mean, std)
    plain = sampling.sample(_run(p, statics), FEW, 12, 8, batch_size=8, progress=False)
    cutoff, low, high = 2.6, 11, 16  # the 2.7 A cells of 4 atoms hold 8-18 neighbours within 2.6 A
    preset = FEW.replace_stage(RetryConfig(CoordinationRule(low, high, cutoff)))
    run = dataclasses.replace(_run(p, statics), stage_params={"retry": other})
    res = sampling.sample(run, preset, 12, 8, batch_size=8, progress=False)
    # The first chain is the plain sampler's, crystal for crystal; the retry ran for exactly the crystals pymatgen
    # finds an atom out of range in.
    first = [_pymatgen_in_range(*plain.crystals.crystal(i), cutoff, low, high) for i in range(12)]
    assert res.first_pass.digest() == plain.crystals.digest()
    retried, replaced = res.arrays["retry"]["retried"], res.arrays["retry"]["replaced"]
    np.testing.assert_array_equal(retried, np.array(first) < 1.0)
    assert 0 < retried.sum() < 12 and replaced.any(), first  # every branch below is taken
    final = [_pymatgen_in_range(*res.crystals.crystal(i), cutoff, low, high) for i in range(12)]
    for i in range(12):
        now, before = res.crystals.crystal(i)[3], plain.crystals.crystal(i)[3]
        if replaced[i]:
            assert retried[i] and final[i] > first[i] and not np.allclose(now, before)
        else:
            np.testing.assert_array_equal(now, before)
    record = res.records["retry"]
    assert (record["retried"], record["replaced"]) == (retried.sum(), replaced.sum())
    np.testing.assert_array_equal(res.npz_files()["first_pass.npz"]["frac_coords"], plain.cdvae()["frac_coords"])
    with pytest.raises(ValueError, match="no first_pass"):
        plain.cdvae("first_pass")


def test_stage_configs_refuse_settings_that_describe_nothing():
    with pytest.raises(ValueError, match="0 <= low <= high"):
        CoordinationRule(4, 3)
    with pytest.raises(ValueError, match="cutoff > 0"):
        CoordinationRule(3, 4, 0.0)
    with pytest.raises(ValueError, match="band"):
        ChainConfig(band=(0.1, 0.03, 10))
    with pytest.raises(ValueError, match="step_schedule"):
        ChainConfig(step_schedule="fast")
    with pytest.raises(ValueError, match="first stage is its chain"):
        SamplerPreset("x", "latest", "raw", StandardPrior(), DecodeConfig(), (RetryConfig(),))
    with pytest.raises(ValueError, match="each other stage at most once"):
        SamplerPreset("x", "latest", "raw", StandardPrior(), DecodeConfig(), (FEW_CHAIN, RetryConfig(), RetryConfig()))
    assert ChainConfig(band=[0.03, 0.1, 5]).band == (0.03, 0.1, 5)  # a JSON list becomes the hashable tuple
