"""Generation-quality pieces: the fitted prior, the step and noise schedules, the denoising step, local structure."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from symat_jax import configs, geometry, graphs, latents, losses, sampling, score
from symat_jax.model import SyMat
from symat_jax.coordination import coordination_by_density, local_structure, neighbor_distances
from symat_jax.crystals import CrystalSet
from symat_jax.prior import MixturePrior, mixture_log_density, sample_mixture
from symat_jax.sampling.schedule import spread_levels

from test_model import CONFIG, crystals, params  # noqa: F401  (fixtures)
from test_sampling import NORM, _inputs, python_loop_chain


def _mixture_data(rng, n):
    """Return ``[n, 12]`` points of one fixed two-component Gaussian mixture with correlated components."""
    shape = np.random.default_rng(42)
    a = shape.normal(size=(12, 12)) * 0.3
    b = shape.normal(size=(12, 12)) * 0.2
    first = rng.normal(size=(n // 3, 12)) @ a + 2.0
    second = rng.normal(size=(n - n // 3, 12)) @ b - 1.0
    return np.concatenate([first, second])


def test_fitted_prior_reproduces_the_training_latents_mean_and_covariance():
    rng = np.random.default_rng(0)
    train, val = _mixture_data(rng, 3000), _mixture_data(rng, 600)
    prior, table = latents.fit_mixture(train, val, components=(1, 2, 5), covariance_types=("full", "diag"))
    chosen = max(table, key=lambda r: r["val_loglik"])
    assert chosen["components"] >= 2 and chosen["covariance"] == "full"  # held-out likelihood picks the true family
    z = np.asarray(sample_mixture(prior, jax.random.PRNGKey(0), 40000))
    # Tolerances: Monte-Carlo error of 40,000 draws and the fit's error on 3,000 points (~3 sigma).
    np.testing.assert_allclose(z.mean(0), train.mean(0), atol=0.05)
    cov_z, cov_t = np.cov(z.T), np.cov(train.T)
    assert np.linalg.norm(cov_z - cov_t) / np.linalg.norm(cov_t) < 0.05


def test_mixture_log_density_matches_scikit_learn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(1)
    x = _mixture_data(rng, 500)
    gmm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x)
    prior = latents._as_prior(gmm)
    ours = np.asarray(mixture_log_density(prior, jnp.asarray(x[:50], jnp.float32)))
    np.testing.assert_allclose(ours, gmm.score_samples(x[:50]), rtol=2e-3, atol=2e-2)


def test_kernel_density_keeps_the_latents_mean_and_covariance_and_wins_on_clustered_latents():
    rng = np.random.default_rng(3)
    # 60 tight clusters in 12 dimensions: no mixture of at most 5 components describes them; a kernel density does.
    centres = rng.normal(size=(60, 12)) * 2.0
    draw = lambda n: centres[rng.integers(0, 60, n)] + 0.1 * rng.normal(size=(n, 12))  # noqa: E731
    train, val = draw(1500), draw(300)
    prior, table = latents.fit_mixture(train, val, components=(1, 2, 5), covariance_types=("full",))
    chosen = max(table, key=lambda r: r["val_loglik"])
    assert chosen["covariance"] == "kde" and chosen["components"] == 1500 and prior.scale_tril.shape == (1, 12, 12)
    assert chosen["bandwidth"] < 1.0  # narrow kernels for tight clusters
    # The shrunk kernels keep the first two moments, also at a bandwidth where plain kernels would double the
    # covariance (tolerances: Monte-Carlo error of 40,000 draws).
    for p in (prior, latents.kernel_density(train, 1.0)):
        z = np.asarray(jax.jit(lambda k: sample_mixture(p, k, 40000))(jax.random.PRNGKey(0)))
        np.testing.assert_allclose(z.mean(0), train.mean(0), atol=0.05)
        cov_z, cov_t = np.cov(z.T), np.cov(train.T)
        assert np.linalg.norm(cov_z - cov_t) / np.linalg.norm(cov_t) < 0.03


def test_shared_factor_log_density_matches_a_slow_reference():
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(4)
    train, points = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)), rng.normal(size=(7, 5))
    prior = latents.kernel_density(train, 0.4)
    cov = np.asarray(prior.scale_tril[0], float) @ np.asarray(prior.scale_tril[0], float).T
    slow = [logsumexp([multivariate_normal(m, cov).logpdf(x) for m in np.asarray(prior.means, float)]) - np.log(40)
            for x in points]
    ours = np.asarray(mixture_log_density(prior, jnp.asarray(points, jnp.float32)))
    np.testing.assert_allclose(ours, slow, rtol=1e-4, atol=1e-3)


def test_fit_prior_refuses_an_unknown_family_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="prior families"):
        latents.fit_prior(tmp_path / "no_run", families=("gmm", "flow"))


def test_prior_round_trips_through_its_file(tmp_path):
    prior = MixturePrior(jnp.array([0.25, 0.75]), jnp.ones((2, 3)), jnp.stack([jnp.eye(3), 2 * jnp.eye(3)]))
    prior.save(tmp_path / "prior.npz")
    back = MixturePrior.load(tmp_path / "prior.npz")
    for a, b in zip(prior, back):
        np.testing.assert_array_equal(a, b)
    kde = latents.kernel_density(np.random.default_rng(0).normal(size=(30, 3)), 0.5)
    kde.save(tmp_path / "kde.npz")
    for a, b in zip(kde, MixturePrior.load(tmp_path / "kde.npz")):
        np.testing.assert_array_equal(a, b)


def test_fitted_prior_draws_from_the_run_s_density_and_needs_one():
    preset = configs.get_sampler_preset("carbon_24", "default")
    assert isinstance(preset.prior, configs.FittedPrior)
    D = CONFIG.latent_comp + CONFIG.latent_pos + CONFIG.latent_lat
    prior = MixturePrior(jnp.ones((1,)), jnp.full((1, D), 3.0), 1e-3 * jnp.eye(D)[None])
    z = sampling.sample_latents(jax.random.PRNGKey(0), 4, CONFIG, preset.prior, prior)
    np.testing.assert_allclose(np.concatenate(z, -1), 3.0, atol=0.01)  # drawn from the fitted prior, not N(0, I)
    with pytest.raises(ValueError, match="none was given"):
        sampling.sample_latents(jax.random.PRNGKey(0), 4, CONFIG, preset.prior)


def test_paper_preset_is_spec_4_exactly():
    for dataset, (tc, tp, tl, tx) in configs.PAPER_TEMPERATURES.items():
        preset = configs.get_sampler_preset(dataset, "paper")
        assert preset.prior == configs.StandardPrior(tc, tp, tl) and preset.decode == configs.DecodeConfig()
        assert preset.stages == (configs.ChainConfig(num_levels=50, steps_per_level=100, step_schedule="paper",
                                                     step_scale=1e-4, noise_schedule="constant", temp_coord=tx),)
        assert (preset.checkpoint, preset.weights) == ("best", "raw")
    model = configs.get_config("carbon_24").model
    norm = np.linspace(0.01, 2.0, 50)
    plan = sampling.build_schedule(configs.get_sampler_preset("carbon_24", "paper").chain, model, norm)
    sig = score.noise_levels()
    np.testing.assert_array_equal(plan.levels, np.arange(49, -1, -1))
    np.testing.assert_allclose(plan.alphas, 1e-4 * (sig[list(plan.levels)] / 0.01) ** 2)
    assert plan.constant_temp == 0.01 and plan.constant_steps == 100 and plan.final_denoise is None


def test_norm_schedule_moves_every_level_by_the_same_fraction_of_its_target():
    model = configs.get_config("carbon_24").model
    norm = np.linspace(0.02, 2.0, 50)
    chain = configs.ChainConfig(step_schedule="norm", step_scale=0.3, noise_schedule="sigma", temp_coord=1.0)
    plan = sampling.build_schedule(chain, model, norm)
    idx = list(plan.levels)
    np.testing.assert_allclose(np.asarray(plan.alphas) / norm[idx] ** 2, 0.3)  # a step is alpha * s / norm = 0.3 * target
    np.testing.assert_allclose(plan.temps, score.noise_levels()[idx] / norm[idx], rtol=1e-6)
    assert plan.constant_temp is None
    own = sampling.build_schedule(chain, model, norm, levels=range(20, -1, -1))  # a study's own levels
    np.testing.assert_array_equal(own.levels, np.arange(20, -1, -1))
    assert own.tail(5).levels == own.levels[5:] and own.tail(5).alphas == own.alphas[5:]
    for bad in ([3, 5], [50], []):
        with pytest.raises(ValueError, match="levels must be"):
            sampling.build_schedule(chain, model, norm, levels=bad)
    with pytest.raises(ValueError, match="num_levels"):
        sampling.build_schedule(dataclasses.replace(chain, num_levels=51), model, norm)


OPTIONS = configs.ChainConfig(num_levels=3, steps_per_level=4, step_schedule="norm", step_scale=1e-4,
                              noise_schedule="sigma", temp_coord=1.0, band=(0.05, 0.1, 7), final_denoise=0.5)


def test_compiled_chain_with_every_option_equals_the_python_loop(params, crystals):  # noqa: F811
    types, mask, lat, z_pos, images = _inputs(crystals, [0, 3])
    # Levels 30, 15, 0 (sigma 0.69, 0.083, 0.01 A): the band gives the middle one 7 steps instead of 4.
    plan = sampling.build_schedule(OPTIONS, CONFIG, NORM, levels=[30, 15, 0])
    assert plan.steps == (4, 7, 4) and plan.total_steps == 15
    kw = dict(model=CONFIG, max_images=images)
    key = jax.random.PRNGKey(3)
    fast = jax.jit(lambda p, k: sampling.run_chain(p, k, types, mask, lat, z_pos, schedule=plan, **kw))(params, key)
    slow = python_loop_chain(params, key, types, mask, lat, z_pos, schedule=plan, **kw)
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-5)
    unbanded = sampling.build_schedule(dataclasses.replace(OPTIONS, band=None), CONFIG, NORM, levels=[30, 15, 0])
    other = sampling.run_chain(params, key, types, mask, lat, z_pos, schedule=unbanded, **kw)
    assert not np.allclose(fast[0], other[0], atol=1e-5)  # the extra steps ran


def test_chain_trace_holds_each_level_s_state_and_ends_at_the_output(params, crystals):  # noqa: F811
    types, mask, lat, z_pos, images = _inputs(crystals, [0, 3])
    chain = dataclasses.replace(OPTIONS, step_scale=1e-3, final_denoise=None)
    plan = sampling.build_schedule(chain, CONFIG, NORM, levels=[30, 15, 0])
    kw = dict(model=CONFIG, max_images=images)
    key = jax.random.PRNGKey(5)
    frac, _, states = jax.jit(lambda p, k: sampling.trace_chain(p, k, types, mask, lat, z_pos, schedule=plan, **kw))(
        params, key)
    assert states.shape == (3,) + frac.shape  # levels 30, 15, 0
    np.testing.assert_allclose(states[-1], frac, atol=1e-6)  # no final step: the last level's state is the output
    slow = python_loop_chain(params, key, types, mask, lat, z_pos, schedule=plan, keep_levels=True, **kw)[2]
    np.testing.assert_allclose(states, slow, atol=1e-5)
    assert not np.allclose(states[0], states[1], atol=1e-4)  # each entry is its own level's state
    assert np.all(states[:, ~np.asarray(mask)] == 0)
    denoised = sampling.trace_chain(params, key, types, mask, lat, z_pos,
                                    schedule=dataclasses.replace(plan, final_denoise=0.5), **kw)
    np.testing.assert_allclose(denoised[2], states, atol=1e-6)  # the final step comes after the trace
    assert not np.allclose(denoised[0], states[-1], atol=1e-5)


def test_band_gives_its_levels_their_own_step_count_and_refuses_a_bad_band():
    model = configs.get_config("carbon_24").model
    chain = configs.ChainConfig(num_levels=25, steps_per_level=10, band=(0.1, 1.0, 100))
    plan = sampling.build_schedule(chain, model, np.ones(50))
    sig = np.asarray(plan.sigmas)
    np.testing.assert_array_equal(plan.steps, np.where((sig >= 0.1) & (sig <= 1.0), 100, 10))
    assert plan.steps.count(100) == 7  # sigma 0.79 ... 0.126 A of the 25 levels
    # The default preset: 25 x 10, the 5 levels in 0.03-0.1 A at 1,000 steps: about the paper's 50 x 100 in cost.
    default = sampling.build_schedule(configs.get_sampler_preset("carbon_24", "default").chain, model, np.ones(50))
    np.testing.assert_allclose(np.asarray(default.sigmas)[np.asarray(default.steps) == 1000],
                               [0.095, 0.072, 0.054, 0.041, 0.031], atol=1e-3)
    assert default.total_steps == 20 * 10 + 5 * 1000 and default.final_denoise == 0.35
    for bad in [(1.0, 0.1, 10), (0.0, 1.0, 10), (0.1, 1.0, 0), (0.1, 1.0)]:
        with pytest.raises(ValueError, match="band"):
            configs.ChainConfig(band=bad)


def _noisy_carbon(crystals, sigma, seed):  # noqa: F811
    """Return (clean, noisy, lattice, mask, types) of the Carbon-24 crystals of the fixture at noise ``sigma``."""
    idx = list(range(8))
    types, mask, lat, _, _ = _inputs(crystals, idx)
    frac = np.zeros(mask.shape + (3,), np.float32)
    for r, i in enumerate(idx):
        frac[r, : crystals.num_atoms[i]] = crystals.crystal(i).frac_coords
    clean = geometry.frac_to_cart(jnp.asarray(frac), lat)
    eps = jax.random.normal(jax.random.PRNGKey(seed), clean.shape)
    noisy = jax.vmap(score.perturb)(clean, lat, mask, jnp.full(mask.shape[:1], sigma), eps)
    return clean, noisy, lat, mask, types


def _distance_error(x, clean, lattice, mask, graph_config):
    """Return the mean |d(x) - d(clean)| over the clean crystals' K-nearest edges (translation-free)."""
    nl = jax.vmap(functools.partial(score.score_graph, config=graph_config))(clean, lattice, mask)
    aligned = jax.vmap(geometry.nearest_image)(x, clean, lattice)  # each atom of x next to its clean position
    senders = jnp.where(nl.mask, nl.senders, 0)
    vec = aligned[:, :, None, :] - jnp.take_along_axis(aligned[:, :, None, :], senders[..., None], axis=1)
    vec = vec - jnp.einsum("bnki,bij->bnkj", nl.offsets.astype(x.dtype), lattice)
    err = jnp.abs(jnp.linalg.norm(vec, axis=-1) - nl.distances)
    return float(jnp.sum(jnp.where(nl.mask, err, 0)) / jnp.sum(nl.mask))


@pytest.mark.parametrize("level", [0, 5, 10])
def test_denoising_step_with_an_exact_score_brings_noisy_crystals_closer(crystals, monkeypatch, level):  # noqa: F811
    sigma = float(score.noise_levels()[level])
    clean, noisy, lat, mask, types = _noisy_carbon(crystals, sigma, level)
    graph_config = score.ScoreGraphConfig(3.0, 5, (3, 3, 3))
    norm = jnp.float32(np.sqrt(2) * sigma)

    def exact(net_params, model, x, lattice, atom_types, atom_mask, z_pos, *, graph_config, num_nodes=None):
        nl = jax.vmap(functools.partial(score.score_graph, config=graph_config))(x, lattice, atom_mask)
        return jax.vmap(score.score_target)(clean, x, lattice, nl) / norm, nl

    monkeypatch.setattr(sampling.chain, "coordinate_scores", exact)
    before = _distance_error(noisy, clean, lat, mask, graph_config)
    kw = dict(lattice=lat, atom_types=types, atom_mask=mask, z_pos=jnp.zeros((8, 1)), norm=norm, model=CONFIG,
              graph=graph_config)
    after = {s: _distance_error(sampling.denoise(None, noisy, scale=s, **kw), clean, lat, mask, graph_config)
             for s in (0.25, 0.35, 0.5)}
    assert min(after.values()) < 0.75 * before, (before, after)


def _coordination(x, lattice, mask):
    """Return per crystal the neighbours within 1.8 A of each real atom of cartesian positions ``x``."""
    frac = np.asarray(jax.vmap(geometry.cart_to_frac)(x, lattice))
    m = np.asarray(mask)
    return [np.array([len(r) for r in neighbor_distances(f[k], np.asarray(lat, float), 1.8)])
            for f, k, lat in zip(frac, m, np.asarray(lattice))]


def test_default_chain_with_an_exact_score_brings_level_25_crystals_back_to_their_coordination(
        crystals, monkeypatch):  # noqa: F811
    # The recovery check in small: Carbon-24 test crystals perturbed at level 25 (sigma 0.34 A, most bonds broken)
    # and run down the `default` chain with the exact score of their clean positions. It fails if the step schedule,
    # noise scale, band or final step of the preset cannot hold a crystal the score knows exactly.
    sigma = float(score.noise_levels()[25])
    clean, noisy, lat, mask, types = _noisy_carbon(crystals, sigma, 25)
    images = _inputs(crystals, list(range(8)))[-1]

    def exact(net_params, model, x, lattice, atom_types, atom_mask, z_pos, *, graph_config, num_nodes=None):
        nl = jax.vmap(functools.partial(score.score_graph, config=graph_config))(x, lattice, atom_mask)
        return jax.vmap(score.score_target)(clean, x, lattice, nl), nl

    monkeypatch.setattr(sampling.chain, "coordinate_scores", exact)
    unit = (1.0,) * 50  # s = target: a step moves f * target
    levels = spread_levels(25, 25)  # the preset's level spacing, from level 25 down

    def recovered(chain):
        plan = sampling.build_schedule(chain, CONFIG, unit, levels=levels)
        out, _ = jax.jit(lambda x0: sampling.run_chain(None, jax.random.PRNGKey(0), types, mask, lat, jnp.zeros((8, 1)),
                                                       x0, schedule=plan, model=CONFIG, max_images=images))(noisy)
        end = np.concatenate(_coordination(geometry.frac_to_cart(out, lat), lat, mask))
        return float(np.mean(end == real))

    real = np.concatenate(_coordination(clean, lat, mask))
    assert np.mean(np.concatenate(_coordination(noisy, lat, mask)) == real) < 0.5
    # The preset as it is, but 200 steps in the band instead of 1,000 (time).
    chain = dataclasses.replace(configs.get_sampler_preset("carbon_24", "default").chain, band=(0.03, 0.1, 200))
    assert recovered(chain) > 0.95
    # A step of the whole predicted target (it sums up to K bond corrections) overshoots: measured 28%.
    assert recovered(dataclasses.replace(chain, step_scale=1.0)) < 0.5


def test_local_structure_matches_pymatgen_neighbours_and_the_carbon_data(test_splits):
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(0)
    for _ in range(5):
        lengths, angles = rng.uniform(2.5, 6, 3), rng.uniform(70, 110, 3)
        frac = rng.uniform(size=(4, 3))
        s = Structure(Lattice.from_parameters(*lengths, *angles), ["C"] * 4, frac)
        ours = neighbor_distances(frac, geometry.lattice_matrix_np(lengths, angles), 3.0)
        for i, row in enumerate(ours):
            np.testing.assert_allclose(row, np.sort([n.nn_distance for n in s.get_neighbors(s[i], 3.0)]), atol=1e-8)
    stats = local_structure(test_splits["carbon_24"].crystal_set())
    assert stats["share_3_or_4"] > 0.99 and stats["share_isolated"] == 0.0  # real carbon is 3- or 4-fold
    assert 1.3 < stats["nn_distance_quantiles"][0] and stats["nn_distance_quantiles"][-1] < 1.6


def test_densities_match_pymatgen_and_stretched_cells_lose_their_bonds_in_the_low_density_bin(test_splits):
    from symat_jax.data.canonical import to_structure

    real = test_splits["carbon_24"].crystal_set()
    dens = real.densities()
    for i in range(0, len(real), max(len(real) // 7, 1)):
        np.testing.assert_allclose(dens[i], to_structure(*real.crystal(i)).density, rtol=1e-6)
    # The same crystals with every cell stretched by 1.3: density / 2.2, and bonds of 1.4-1.5 A become 1.8-2.0 A.
    stretched = dataclasses.replace(real, lengths=real.lengths * 1.3)
    np.testing.assert_allclose(stretched.densities(), dens / 1.3 ** 3, rtol=1e-6)
    both = CrystalSet(np.concatenate([real.num_atoms, stretched.num_atoms]),
                      np.concatenate([real.atom_types, stretched.atom_types]),
                      np.concatenate([real.frac_coords, stretched.frac_coords]),
                      np.concatenate([real.lengths, stretched.lengths]), np.concatenate([real.angles, real.angles]))
    low, high = coordination_by_density(both, [dens.min() - 1e-6])
    assert low["share_crystals"] == pytest.approx(0.5) and high["share_crystals"] == pytest.approx(0.5)
    assert high["share_3_or_4"] > 0.99 and low["share_3_or_4"] < 0.05 and low["share_isolated"] > 0.5
    assert (low["low"], high["high"]) == (-np.inf, np.inf)


def test_coordinate_loss_averages_over_the_three_components():
    pred = jnp.zeros((1, 2, 3))
    target = jnp.array([[[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]]])
    loss = losses.coordinate_score_loss(pred, target, jnp.array([[True, True]]))
    np.testing.assert_allclose(loss, [((1 + 4 + 4) / 3 + 9 / 3) / 2])


@pytest.mark.parametrize("init, variance", [("unit_uniform", 1.0), ("flax", 1.0 / 16)])
def test_atom_embedding_init_is_the_configured_one(crystals, init, variance):  # noqa: F811
    from test_model import dense_one, edge_graph, score_config

    c = crystals.crystal(0)
    g = edge_graph(c.atomic_numbers, c.frac_coords @ c.lattice(), c.lattice(), c.edge_index, c.edge_offsets)
    pos, lat, mask, z = dense_one(c, 24)
    nl = jax.vmap(functools.partial(score.score_graph, config=score_config(lat)))(pos, lat, mask)
    sg, _ = graphs.score_edge_graph(nl, z, mask)
    config = dataclasses.replace(CONFIG, embed_init=init)
    p = SyMat(config).init(jax.random.PRNGKey(0), g, jnp.zeros((1, 6)), 1, sg, 1)
    for table in ("atom_embed", "score_embed"):
        emb = p["params"][table]["embedding"]
        assert abs(float(jnp.var(emb)) / variance - 1.0) < 0.15, (table, float(jnp.var(emb)))
