"""Tersoff energy and FIRE relaxation: known values of carbon, a loop reference, invariances, recovery of a crystal."""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from symat_jax import fire, geometry, tersoff
from symat_jax.configs import CoordinationRule, HopConfig, RelaxConfig
from symat_jax.crystals import CrystalSet
from symat_jax.relax import Relaxed
from symat_jax.sampling import relax_crystals


def _relax(crystals: CrystalSet, cfg: RelaxConfig, hops: HopConfig | None = None, **kw) -> Relaxed:
    """Return the Relax (and Hop) stages' crystals and per-crystal record on ``crystals``."""
    out = relax_crystals(crystals, cfg, hops, progress=False, **kw)
    rec = out.arrays["relax"]
    return Relaxed(out.crystals, rec["energy_per_atom"], rec["fmax"], rec["steps"], rec["converged"], rec["kept"],
                   rec["reverted"], rec["hops"])


def diamond(a: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (frac [8, 3], lattice [3, 3]) of the conventional diamond cell."""
    base = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    return np.concatenate([base, base + 0.25]) % 1.0, a * np.eye(3)


def energy(frac: np.ndarray, lattice: np.ndarray, images: int = 2, **kw) -> float:
    """Return the project's Tersoff energy (eV) of an unpadded crystal."""
    e, overflow = tersoff.tersoff_energy(jnp.asarray(frac @ lattice, jnp.float32), jnp.asarray(lattice, jnp.float32),
                                       jnp.ones(len(frac), bool), max_images=(images,) * 3, **kw)
    assert not bool(overflow)
    return float(e)


def loop_energy(frac: np.ndarray, lattice: np.ndarray, p: tersoff.TersoffParams = tersoff.CARBON) -> float:
    """Return Tersoff's energy written as the paper's sums over atoms and images, in float64 (slow reference)."""
    cart = frac @ lattice
    cut = p.R + p.D
    neigh = []  # per atom: vectors to every neighbour image within the cut-off
    for i in range(len(cart)):
        vs = []
        for j in range(len(cart)):
            for o in itertools.product(range(-3, 4), repeat=3):
                v = cart[j] + np.asarray(o) @ lattice - cart[i]
                r = np.linalg.norm(v)
                if 1e-6 < r < cut:
                    vs.append(v)
        neigh.append(vs)

    def fc(r: float) -> float:
        if r < p.R - p.D:
            return 1.0
        return 0.5 - 0.5 * math.sin(math.pi / 2 * (r - p.R) / p.D) if r < p.R + p.D else 0.0

    total = 0.0
    for vs in neigh:
        for a, vij in enumerate(vs):
            rij = np.linalg.norm(vij)
            zeta = 0.0
            for b, vik in enumerate(vs):
                if b == a:
                    continue
                rik = np.linalg.norm(vik)
                cos = vij @ vik / (rij * rik)
                g = 1 + p.c**2 / p.d**2 - p.c**2 / (p.d**2 + (cos - p.h) ** 2)
                zeta += fc(rik) * g
            b_ij = (1 + (p.beta * zeta) ** p.n) ** (-1 / (2 * p.n))
            total += 0.5 * fc(rij) * (p.A * math.exp(-p.lam1 * rij) - b_ij * p.B * math.exp(-p.lam2 * rij))
    return total


def test_diamond_and_graphene_reproduce_tersoffs_published_values():
    """Diamond: minimum at 3.566 A, -7.37 eV/atom; graphene: bond 1.46 A, -7.40 eV/atom (Tersoff 1988)."""
    grid = np.linspace(3.50, 3.64, 15)
    e = [energy(*diamond(a)) / 8 for a in grid]
    assert abs(grid[int(np.argmin(e))] - 3.566) < 0.011
    assert abs(min(e) + 7.37) < 0.01
    bonds = np.linspace(1.40, 1.52, 13)
    eg = []
    for b in bonds:
        a = b * math.sqrt(3)
        lat = np.array([[a, 0, 0], [a / 2, a * math.sqrt(3) / 2, 0], [0, 0, 10.0]])
        eg.append(energy(np.array([[0, 0, 0], [1 / 3, 1 / 3, 0]]), lat) / 2)
    assert abs(bonds[int(np.argmin(eg))] - 1.46) < 0.011
    assert abs(min(eg) + 7.40) < 0.01


def test_energy_matches_the_loop_reference_on_a_distorted_triclinic_crystal():
    """The padded, vectorised energy equals the paper's sums, atom by atom and image by image."""
    rng = np.random.default_rng(0)
    frac, lat = diamond(3.56)
    lat = lat @ (np.eye(3) + rng.normal(0, 0.03, (3, 3)))
    frac = (frac + rng.normal(0, 0.02, frac.shape)) % 1.0
    ref = loop_energy(frac, lat)
    assert energy(frac, lat) == pytest.approx(ref, rel=2e-5)
    # Padding atoms change nothing.
    padded = np.concatenate([frac @ lat, np.zeros((3, 3))]).astype(np.float32)
    mask = np.arange(11) < 8
    e, _ = tersoff.tersoff_energy(jnp.asarray(padded), jnp.asarray(lat, jnp.float32), jnp.asarray(mask), max_images=(2, 2, 2))
    assert float(e) == pytest.approx(ref, rel=2e-5)


def test_energy_is_extensive_and_blind_to_atom_order():
    """A doubled cell has twice the energy; permuting the atoms changes nothing."""
    rng = np.random.default_rng(1)
    frac, lat = diamond(3.6)
    frac = (frac + rng.normal(0, 0.02, frac.shape)) % 1.0
    e = energy(frac, lat)
    double = np.concatenate([frac * [0.5, 1, 1], frac * [0.5, 1, 1] + [0.5, 0, 0]])
    assert energy(double, lat * [[2], [1], [1]]) == pytest.approx(2 * e, rel=1e-5)
    assert energy(frac[rng.permutation(8)], lat) == pytest.approx(e, rel=1e-6)


def test_fixed_cell_relaxation_rebuilds_a_perturbed_diamond():
    """Every atom moved 0.1 A comes back: four bonds of 1.544 A each, residual force below fmax."""
    frac, lat = diamond(3.566)
    rng = np.random.default_rng(2)
    cart = frac @ lat + rng.normal(0, 0.1, (8, 3))
    trace = fire.relax_batch(jnp.asarray(cart[None], jnp.float32), jnp.asarray(lat[None], jnp.float32),
                              jnp.ones((1, 8), bool), cfg=RelaxConfig(steps=500), max_images=(1, 1, 1))
    assert float(trace.fmax[0]) < 0.01 and int(trace.steps[0]) < 500
    out = np.asarray(trace.positions[0]) @ np.linalg.inv(lat)
    dists = geometry.neighbor_distances(out, lat, 1.8)
    assert [len(d) for d in dists] == [4] * 8
    assert np.allclose(np.concatenate(dists), 3.566 * math.sqrt(3) / 4, atol=2e-3)
    assert float(trace.energy[0]) / 8 == pytest.approx(-7.37, abs=0.01)


def test_free_cell_relaxation_finds_diamonds_lattice_constant_and_pressure_compresses_it():
    """From a = 3.45 A the free cell relaxes to 3.566 A at zero pressure; at 100 GPa to the cell where -dE/dV is 100 GPa."""
    frac, lat = diamond(3.45)
    cs = CrystalSet(np.array([8, 8]), np.full(16, 6), np.concatenate([frac, frac]),
                    np.full((2, 3), 3.45), np.full((2, 3), 90.0))
    at0 = _relax(cs.subset([0]), RelaxConfig(cell="free", steps=2000))
    at100 = _relax(cs.subset([1]), RelaxConfig(cell="free", pressure=100.0, steps=2000))
    assert at0.converged.all() and at100.converged.all()
    assert np.allclose(at0.crystals.lengths, 3.566, atol=5e-3)
    assert np.allclose(at0.crystals.angles, 90.0, atol=0.1)
    a = float(at100.crystals.lengths[0, 0])
    assert np.allclose(at100.crystals.lengths, a, atol=5e-3) and a < 3.5
    h = 2e-3
    pressure = -(energy(frac, (a + h) * np.eye(3)) - energy(frac, (a - h) * np.eye(3))) / ((a + h) ** 3 - (a - h) ** 3)
    assert pressure / fire.GPA_IN_EV_PER_A3 == pytest.approx(100.0, rel=0.03)


def test_relax_crystals_returns_untrusted_and_non_carbon_rows_unchanged(caplog):
    """A crystal whose neighbours overflow the list, or that holds another element, is kept as it came; no carbon at all is refused."""
    frac, lat = diamond(3.566)
    silicon = np.array([6] * 7 + [14])
    with pytest.raises(ValueError, match="carbon only"):
        _relax(CrystalSet(np.array([8]), silicon, frac, np.full((1, 3), 3.566), np.full((1, 3), 90.0)), RelaxConfig())
    rng = np.random.default_rng(3)
    crowded = rng.random((8, 3))
    noisy = (frac + rng.normal(0, 0.02, frac.shape)) % 1.0
    cs = CrystalSet(np.array([8, 8, 8]), np.concatenate([np.full(16, 6), silicon]), np.concatenate([frac, crowded, noisy]),
                    np.array([[3.566] * 3, [2.2] * 3, [3.566] * 3]), np.full((3, 3), 90.0))
    out = _relax(cs, RelaxConfig(steps=50, max_neighbors=4))
    assert out.kept.tolist() == [True, False, False]
    assert np.array_equal(out.crystals.frac_coords[8:], cs.frac_coords[8:])
    assert np.isnan(out.energy_per_atom[1:]).all()
    assert "1 of 3 crystals hold elements other than carbon" in caplog.text
    assert np.allclose(out.crystals.lengths[0], 3.566, atol=1e-4)


def test_a_set_of_mixed_sizes_relaxes_as_each_crystal_alone():
    """Batching by size (and padding to each batch's largest crystal) changes no crystal's result, nor the order."""
    rng = np.random.default_rng(7)
    frac, _ = diamond(3.566)
    double = np.concatenate([frac * [0.5, 1, 1], frac * [0.5, 1, 1] + [0.5, 0, 0]])
    a = 1.46 * math.sqrt(3)
    parts = [(double, [7.132, 3.566, 3.566], [90.0] * 3), (np.array([[0, 0, 0], [1 / 3, 1 / 3, 0]]), [a, a, 8.0],
             [90.0, 90.0, 60.0]), (frac, [3.566] * 3, [90.0] * 3)]
    noisy = [(f + rng.normal(0, 0.01, f.shape)) % 1.0 for f, _, _ in parts]
    cs = CrystalSet(np.array([16, 2, 8]), np.full(26, 6), np.concatenate(noisy), np.array([p[1] for p in parts]),
                    np.array([p[2] for p in parts]))
    cfg = RelaxConfig(steps=200)
    together = _relax(cs, cfg, batch_size=2)
    for i in range(3):
        alone = _relax(cs.subset([i]), cfg)
        np.testing.assert_allclose(together.crystals.crystal(i)[3], alone.crystals.crystal(0)[3], atol=1e-5)
        assert together.energy_per_atom[i] == pytest.approx(alone.energy_per_atom[0], abs=1e-5)


def test_the_guard_reverts_exactly_the_relaxations_that_lose_atoms_in_range():
    """A relaxation is undone where fewer atoms end with a neighbour count in range than began with it, kept elsewhere."""
    frac, lat = diamond(3.566)
    rng = np.random.default_rng(6)
    starts = [(frac + rng.normal(0, 0.03, frac.shape)) % 1.0 for _ in range(3)]
    cs = CrystalSet(np.full(3, 8), np.full(24, 6), np.concatenate(starts), np.full((3, 3), 3.566), np.full((3, 3), 90.0))
    plain = _relax(cs, RelaxConfig(steps=300))
    # "At most 3 neighbours within 1.6 A": the relaxed diamond has 4 at 1.544 A on every atom, so a start with any
    # atom at most 3-fold loses it; "exactly 4" is what relaxed diamond has, so nothing is undone.
    for rule, expect_revert in (((0, 3), True), ((4, 4), False)):
        before = np.array([geometry.coordination_in_range(s, [3.566] * 3, [90.0] * 3, 1.6, *rule) for s in starts])
        out = _relax(cs, RelaxConfig(steps=300, guard=CoordinationRule(*rule, 1.6)))
        assert out.reverted.tolist() == ((before > 0) if expect_revert else np.zeros(3, bool)).tolist()
        assert (out.kept == ~out.reverted).all()
        for i in range(3):
            expected = starts[i] if out.reverted[i] else plain.crystals.crystal(i)[3]
            np.testing.assert_allclose(out.crystals.crystal(i)[3], expected, atol=1e-6)
        if expect_revert:
            assert out.reverted.any()  # the check above would pass vacuously without a start to undo


def _rough_carbon(seed: int = 8) -> CrystalSet:
    """Return 8-atom carbon cells of three sizes with atoms far from diamond's sites (relaxations end in local minima)."""
    frac, _ = diamond(3.566)
    rng = np.random.default_rng(seed)
    a = np.array([3.45, 3.566, 3.7, 3.566])
    starts = [(frac + rng.normal(0, 0.09, frac.shape)) % 1.0 for _ in a]
    return CrystalSet(np.full(len(a), 8), np.full(8 * len(a), 6), np.concatenate(starts), np.repeat(a[:, None], 3, 1),
                      np.full((len(a), 3), 90.0))


def test_basin_hopping_only_lowers_the_energy_and_keeps_its_records_right():
    """Hops never raise a crystal's energy, leave crystals below the threshold as relaxed, and report each crystal's own energy."""
    cs = _rough_carbon()
    cfg = RelaxConfig(steps=300)
    plain = _relax(cs, cfg)
    # The threshold between the plain relaxations' energies: the lowest crystal must not hop.
    above = float(np.sort(plain.energy_per_atom)[0]) + 1e-3
    hopped = _relax(cs, cfg, HopConfig(rounds=3, above=above))
    assert (hopped.energy_per_atom <= plain.energy_per_atom + 1e-6).all()
    assert hopped.hops.sum() > 0  # else the checks below would pass vacuously
    low = int(np.argmin(plain.energy_per_atom))
    assert hopped.hops[low] == 0
    np.testing.assert_array_equal(hopped.crystals.crystal(low)[3], plain.crystals.crystal(low)[3])
    for i in range(len(cs)):
        frac = hopped.crystals.crystal(i)[3]
        lat = geometry.lattice_matrix_np(hopped.crystals.lengths[i], hopped.crystals.angles[i])
        assert energy(frac, lat) / 8 == pytest.approx(hopped.energy_per_atom[i], abs=2e-4)
        if hopped.hops[i]:
            assert hopped.energy_per_atom[i] < plain.energy_per_atom[i]
    again = _relax(cs, cfg, HopConfig(rounds=3, above=above))
    np.testing.assert_array_equal(again.crystals.frac_coords, hopped.crystals.frac_coords)  # the seed decides


def test_guarded_hops_never_lose_atoms_in_range():
    """With a guard, a hop is kept only where no fewer atoms end in range than the crystal had."""
    cs = _rough_carbon()
    # "At most 3 neighbours within 1.8 A": the hops find diamond, whose atoms are all 4-fold, so the guard refuses them.
    rule = (0, 3)
    guard = CoordinationRule(*rule, 1.8)
    free = _relax(cs, RelaxConfig(steps=300), HopConfig(rounds=3, above=-100.0))
    plain = _relax(cs, RelaxConfig(steps=300, guard=guard))
    guarded = _relax(cs, RelaxConfig(steps=300, guard=guard), HopConfig(rounds=3, above=-100.0, guard=guard))
    assert (guarded.hops < free.hops).any()  # the guard refused hops the energy alone accepts
    for i in range(len(cs)):
        share = [geometry.coordination_in_range(r.crystals.crystal(i)[3], r.crystals.lengths[i], r.crystals.angles[i],
                                                1.8, *rule) for r in (plain, guarded)]
        assert share[1] >= share[0]
        assert guarded.energy_per_atom[i] <= plain.energy_per_atom[i] + 1e-6 or np.isnan(plain.energy_per_atom[i])


@pytest.mark.parametrize("cls, bad", [(RelaxConfig, {"cell": "npt"}), (RelaxConfig, {"steps": 0}),
                                      (RelaxConfig, {"fmax": 0.0}), (RelaxConfig, {"cell": "free", "pressure": float("nan")}),
                                      (RelaxConfig, {"pressure": 10.0}), (HopConfig, {"rounds": 0}),
                                      (HopConfig, {"sigma": 0.0}), (HopConfig, {"above": float("nan")})])
def test_relax_and_hop_configs_refuse_settings_that_describe_no_relaxation(cls, bad):
    """Unknown cell modes, no steps, a zero force threshold, a NaN pressure, a pressure on a fixed cell or hops that cannot move are refused."""
    with pytest.raises(ValueError):
        cls(**bad)


def test_forces_are_the_gradient_of_the_loop_reference():
    """jax's gradient of the energy equals a central difference of the float64 loop reference."""
    rng = np.random.default_rng(4)
    frac, lat = diamond(3.56)
    cart = frac @ lat + rng.normal(0, 0.05, (8, 3))

    def e(x):
        return tersoff.tersoff_energy(x, jnp.asarray(lat, jnp.float32), jnp.ones(8, bool), max_images=(1, 1, 1))[0]

    g = np.asarray(jax.grad(e)(jnp.asarray(cart, jnp.float32)))
    inv = np.linalg.inv(lat)
    h = 1e-4
    for axis in range(3):
        up, down = cart.copy(), cart.copy()
        up[2, axis] += h
        down[2, axis] -= h
        fd = (loop_energy(up @ inv, lat) - loop_energy(down @ inv, lat)) / (2 * h)
        assert g[2, axis] == pytest.approx(fd, rel=2e-3, abs=2e-3)


def _write_samples(folder, crystals: CrystalSet) -> None:
    """Write ``crystals`` as a ``symat sample`` folder (samples.npz with sample_index, one reject)."""
    folder.mkdir(parents=True)
    np.savez(folder / "samples.npz", num_atoms=crystals.num_atoms, atom_types=crystals.atom_types,
             frac_coords=crystals.frac_coords, lengths=crystals.lengths, angles=crystals.angles,
             sample_index=np.array([0, 2]))
    (folder / "rejects.json").write_text('[{"index": 1, "reason": "too many atoms"}]')


def test_symat_relax_writes_a_new_folder_and_leaves_the_samples_alone(tmp_path):
    """`symat relax` relaxes into --out (unrelaxed copy, per-crystal record, rejects kept) and refuses the source folder."""
    from symat_jax import cli

    frac, _ = diamond(3.566)
    rng = np.random.default_rng(5)
    noisy = (frac + rng.normal(0, 0.02, frac.shape)) % 1.0
    cs = CrystalSet(np.array([8, 8]), np.full(16, 6), np.concatenate([noisy, frac]), np.full((2, 3), 3.566),
                    np.full((2, 3), 90.0))
    src = tmp_path / "samples"
    _write_samples(src, cs)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert cli.main(["relax", "--samples", str(src), "--out", str(src), "--relax-steps", "300"]) != 0
    out = tmp_path / "relaxed"
    assert cli.main(["relax", "--samples", str(src), "--out", str(out), "--relax-steps", "300"]) == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    relaxed = CrystalSet.from_samples(out)
    assert relaxed.num_rejected == 1
    with np.load(out / "unrelaxed.npz") as z, np.load(src / "samples.npz") as s:
        assert all(np.array_equal(z[k], s[k]) for k in s.files)
    with np.load(out / "samples.npz") as z:
        assert z["sample_index"].tolist() == [0, 2]
    with np.load(out / "relax.npz") as z:
        assert z["converged"].all() and (z["energy_per_atom"] < -7.36).all()
    dists = geometry.neighbor_distances(relaxed.crystal(0)[3], 3.566 * np.eye(3), 1.8)
    assert np.allclose(np.concatenate(dists), 1.544, atol=2e-3)
    assert sorted(p.name for p in (out / "cif").iterdir()) == ["0.cif", "2.cif"]
    guarded = tmp_path / "guarded"
    assert cli.main(["relax", "--samples", str(src), "--out", str(guarded), "--relax-steps", "300",
                     "--relax-guard", "4", "4", "1.8"]) == 0  # relaxed diamond is 4-fold: nothing undone
    summary = json.loads((guarded / "summary.json").read_text())
    assert summary["relax"]["guard"] == {"low": 4, "high": 4, "cutoff": 1.8} and summary["num_reverted"] == 0
    hopped = tmp_path / "hopped"  # every crystal hops once; the record counts the hops each kept
    assert cli.main(["relax", "--samples", str(src), "--out", str(hopped), "--relax-steps", "300", "--hop-rounds", "1",
                     "--hop-above", "-100", "--seed", "3"]) == 0
    summary = json.loads((hopped / "summary.json").read_text())
    assert summary["hops"]["rounds"] == 1 and summary["hops"]["above"] == -100 and summary["hop_seed"] == 3
    with np.load(hopped / "relax.npz") as z, np.load(out / "relax.npz") as plain:
        assert summary["num_hopped"] == int((z["hops"] > 0).sum())
        assert (z["energy_per_atom"] <= plain["energy_per_atom"] + 1e-6).all()
    # A second run into the same folder is refused without --overwrite, and changes nothing there.
    kept = (out / "samples.npz").read_bytes()
    assert cli.main(["relax", "--samples", str(src), "--out", str(out)]) != 0
    assert (out / "samples.npz").read_bytes() == kept


def test_the_default_preset_relaxes_unguarded_and_hops_six_rounds_after_its_retry():
    """The Carbon-24 preset's stages in order, each with its own config; other datasets and the paper preset have none."""
    from symat_jax import configs

    preset = configs.get_sampler_preset("carbon_24", "default")
    kinds = [type(s) for s in preset.stages]
    assert kinds == [configs.ChainConfig, configs.RetryConfig, RelaxConfig, HopConfig]
    assert preset.stage(RelaxConfig) == RelaxConfig(cell="fixed") and preset.stage(HopConfig).rounds == 6
    assert preset.stage(configs.RetryConfig).checkpoint == "40"
    assert [type(s) for s in configs.get_sampler_preset("perov_5", "default").stages] == [configs.ChainConfig]
    assert configs.get_sampler_preset("carbon_24", "paper").stage(RelaxConfig) is None
    assert preset.without(RelaxConfig).stage(HopConfig) is None  # the hops go with their relaxation
    with pytest.raises(ValueError, match="needs a relaxation"):
        configs.SamplerPreset("x", "latest", "raw", preset.prior, preset.decode, (preset.chain, HopConfig()))
