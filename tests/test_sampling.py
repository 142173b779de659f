"""The sampler: one compiled program equals a Python loop; decoding; buckets; CIF output; rejects."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Structure

from symat_jax import sampling, score
from symat_jax.configs import SamplerConfig
from symat_jax.model import SyMat
from symat_jax.neighbors import required_image_range
from symat_jax.run import LatticeStandardizer, RunStatics

from test_model import CONFIG, params  # noqa: F401  (fixture)
from test_model import crystals  # noqa: F401  (fixture)

NORM = jnp.asarray(np.sqrt(2) * score.noise_levels(), jnp.float32)


def _statics(mean=(0.0,) * 6, std=(1.0,) * 6, images=(3, 3, 3)) -> RunStatics:
    """Return run statics with the test's normaliser and a given lattice standardiser."""
    return RunStatics(tuple(float(x) for x in NORM), tuple(images), 1,
                      LatticeStandardizer(tuple(float(x) for x in mean), tuple(float(x) for x in std)))


FEW = SamplerConfig(num_levels=3, steps_per_level=4, step_size=1e-4, temp_coord=0.01)


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
    kw = dict(statics=_statics(), model=CONFIG, cfg=dataclasses.replace(FEW, step_size=1e-6), max_images=images)
    key = jax.random.PRNGKey(11)
    fast = jax.jit(lambda p, k: sampling.langevin(p, k, types, mask, lat, z_pos, **kw))(params, key)
    slow = sampling.langevin(params, key, types, mask, lat, z_pos, **kw, python_loop=True)
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-5)
    np.testing.assert_array_equal(fast[1], slow[1])
    frac = np.asarray(fast[0])
    m = np.asarray(mask)
    assert np.all(np.abs(frac[m]) <= 0.5 + 1e-5) and not np.any(frac[~m])
    start = sampling.initial_positions(jax.random.split(key)[0], lat, mask)
    assert not np.allclose(fast[0], jnp.einsum("bni,bij->bnj", start, jnp.linalg.inv(lat)), atol=1e-3)  # it moved


def test_generate_is_jittable_and_reproducible(params):  # noqa: F811
    fn = jax.jit(sampling.generate, static_argnums=(2,), static_argnames=("statics", "model", "cfg", "max_images"))
    kw = dict(statics=_statics((1.6, 1.8, 2.1, 80.0, 85.0, 95.0), (0.2,) * 6), model=CONFIG, cfg=FEW)
    a = fn(params, jax.random.PRNGKey(0), 6, **kw)
    b = fn(params, jax.random.PRNGKey(0), 6, **kw)
    c = fn(params, jax.random.PRNGKey(1), 6, **kw)
    np.testing.assert_array_equal(a.frac_coords, b.frac_coords)
    assert not np.array_equal(a.frac_coords, c.frac_coords)
    np.testing.assert_array_equal(np.sum(a.atom_types > 0, axis=1), np.minimum(a.num_atoms, CONFIG.max_atoms))


def test_decoding_builds_compositions_from_the_decoders(params):  # noqa: F811
    z = sampling.sample_latents(jax.random.PRNGKey(2), 16, CONFIG, FEW)
    dec = sampling.decode_crystals(params, z, jax.random.PRNGKey(3), model=CONFIG, cfg=FEW, statics=_statics())
    net = SyMat(CONFIG)
    k_logits, e_logits = net.apply(params, z.z_comp, method=SyMat.decode_composition)
    k = np.argmax(k_logits, axis=-1) + 1
    for b in range(16):
        present = set(np.asarray(dec.atom_types[b])[np.asarray(dec.atom_types[b]) > 0])
        top = set(np.argsort(-np.asarray(e_logits[b]))[: k[b]] + 1)
        if dec.num_atoms[b] <= CONFIG.max_atoms:
            assert present == top  # exactly the top-k elements, each at least once
    sampled = sampling.decode_crystals(params, z, jax.random.PRNGKey(3), model=CONFIG,
                                       cfg=dataclasses.replace(FEW, decode="sample"), statics=_statics())
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
    p = _biased(params, 1, 3)  # 3-atom crystals: padded to the 4-atom bucket, not to 24
    run = functools.partial(sampling.sample, p, jax.random.PRNGKey(4), 10, statics=_statics(mean, std), model=CONFIG,
                            cfg=FEW, batch_size=4, progress=False)
    res = run()
    assert len(res.atom_types) == 10 and not res.rejects
    assert all(len(t) == 3 for t in res.atom_types)
    assert res.padded_atom_share == pytest.approx(1 - 30 / (12 * 4))  # 3 chunks of 4 rows x 4 slots
    assert res.compile_seconds > 0 and res.run_seconds > 0
    again = run()
    assert again.compile_seconds == 0.0  # compiled once per bucket shape
    for a, b in zip(res.frac_coords, again.frac_coords):
        np.testing.assert_array_equal(a, b)
    out = res.to_cdvae()
    assert out["num_atoms"].sum() == len(out["atom_types"]) == len(out["frac_coords"])


def test_too_many_atoms_are_rejected_not_cut(params):  # noqa: F811
    mean, std = np.array([1.6, 1.6, 1.6, 90.0, 90.0, 90.0]), np.array([0.05, 0.05, 0.05, 2.0, 2.0, 2.0])
    p = _biased(params, 5, 7)  # 35 atoms > max_atoms = 24
    res = sampling.sample(p, jax.random.PRNGKey(4), 3, statics=_statics(mean, std), model=CONFIG, cfg=FEW,
                          progress=False)
    assert not res.atom_types and len(res.rejects) == 3
    assert all(r["num_atoms"] == 35 and "max_atoms=24" in r["reason"] for r in res.rejects)


def test_fitted_counts_decode_cells_that_fit(params):  # noqa: F811
    mean, std = np.array([1.6, 1.6, 1.6, 90.0, 90.0, 90.0]), np.array([0.05, 0.05, 0.05, 2.0, 2.0, 2.0])
    res = sampling.sample(_biased(params, 5, 7), jax.random.PRNGKey(4), 3, statics=_statics(mean, std), model=CONFIG,
                          cfg=dataclasses.replace(FEW, fit_counts=True), progress=False)
    assert not res.rejects and len(res.atom_types) == 3
    # Five elements whose counts' argmax is 7 (35 atoms, 24 fit): the best fit keeps all five elements, three of
    # them at 7 (four would be 28) and the other two at 1-2 atoms between them.
    for t in res.atom_types:
        _, counts = np.unique(t, return_counts=True)
        assert len(counts) == 5 and sorted(counts)[2:] == [7, 7, 7] and 23 <= len(t) <= CONFIG.max_atoms


def test_written_cifs_parse_back_to_the_same_crystals(params, tmp_path):  # noqa: F811
    from symat_jax.generate_cli import write_samples

    mean, std = np.array([1.7, 1.7, 1.7, 90.0, 90.0, 90.0]), np.array([0.1, 0.1, 0.1, 5.0, 5.0, 5.0])
    res = sampling.sample(_biased(params, 1, 5), jax.random.PRNGKey(8), 4, statics=_statics(mean, std), model=CONFIG,
                          cfg=FEW, progress=False)
    write_samples(res, tmp_path)
    saved = np.load(tmp_path / "samples.npz")
    starts = np.concatenate([[0], np.cumsum(saved["num_atoms"])])
    for k, i in enumerate(res.index):
        s = Structure.from_file(tmp_path / "cif" / f"{i}.cif")
        np.testing.assert_allclose(s.lattice.abc, res.lengths[k], rtol=1e-5)
        np.testing.assert_allclose(s.lattice.angles, res.angles[k], atol=1e-4)
        assert [site.specie.Z for site in s] == list(res.atom_types[k])
        d = s.frac_coords - res.frac_coords[k]
        np.testing.assert_allclose(d - np.round(d), 0, atol=1e-5)  # same sites up to lattice translations
        np.testing.assert_allclose(saved["frac_coords"][starts[k] : starts[k + 1]], res.frac_coords[k])


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
    kw = dict(statics=_statics(mean, std), model=CONFIG, batch_size=8, progress=False)
    plain = sampling.sample(p, jax.random.PRNGKey(8), 12, cfg=FEW, **kw)
    cutoff, low, high = 2.6, 11, 16  # the 2.7 A cells of 4 atoms hold 8-18 neighbours within 2.6 A
    cfg = dataclasses.replace(FEW, retry_coordination=[low, high], retry_cutoff=cutoff)
    assert cfg.retry_coordination == (low, high)  # a list from JSON becomes the hashable tuple
    res = sampling.sample(p, jax.random.PRNGKey(8), 12, cfg=cfg, retry_params=other, **kw)
    # The first chain is the plain sampler's, crystal for crystal; the retry ran for exactly the crystals pymatgen
    # finds an atom out of range in.
    first = [_pymatgen_in_range(t, a, b, f, cutoff, low, high)
             for t, a, b, f in zip(plain.atom_types, plain.lengths, plain.angles, plain.frac_coords)]
    for a, b in zip(res.first_frac_coords, plain.frac_coords):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(res.retried, np.array(first) < 1.0)
    assert 0 < res.retried.sum() < 12 and res.replaced.any(), first  # every branch below is taken
    final = [_pymatgen_in_range(t, a, b, f, cutoff, low, high)
             for t, a, b, f in zip(res.atom_types, res.lengths, res.angles, res.frac_coords)]
    for i in range(12):
        if res.replaced[i]:
            assert res.retried[i] and final[i] > first[i] and not np.allclose(res.frac_coords[i], plain.frac_coords[i])
        else:
            np.testing.assert_array_equal(res.frac_coords[i], plain.frac_coords[i])
    summary = res.retry_summary(2)
    assert (summary["retried"], summary["replaced"], summary["score_epoch"]) == (res.retried.sum(), res.replaced.sum(), 2)
    np.testing.assert_array_equal(res.to_cdvae(first_pass=True)["frac_coords"], plain.to_cdvae()["frac_coords"])
    with pytest.raises(ValueError, match="no first pass"):
        plain.to_cdvae(first_pass=True)


def test_retry_settings_are_checked_and_no_retry_is_none():
    assert SamplerConfig(retry_coordination=()).retry_coordination is None
    with pytest.raises(ValueError, match="0 <= low <= high"):
        SamplerConfig(retry_coordination=(4, 3))
    with pytest.raises(ValueError, match="retry_cutoff"):
        SamplerConfig(retry_coordination=(3, 4), retry_cutoff=0.0)
