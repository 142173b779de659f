"""The coordinate score's targets and normaliser against the reference (SPEC 3 and 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from symat_jax import geometry, input_pipeline, score
from symat_jax.neighbors import required_image_range

CUTOFFS = {"carbon_24": 3.0, "perov_5": 4.0}
MAX_ATOMS = {"carbon_24": 24, "perov_5": 5}


def _golden_batch(golden, name):
    g = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(name + "/")}
    starts = np.concatenate([[0], np.cumsum(g["num_atoms"])])
    b, n_max = len(g["num_atoms"]), MAX_ATOMS[name]
    lat = np.asarray(geometry.lattice_matrix(g["lengths"], g["angles"]))
    noisy = np.zeros((b, n_max, 3), np.float32)
    clean = np.zeros((b, n_max, 3), np.float32)
    mask = np.zeros((b, n_max), bool)
    for c in range(b):
        n, sl = g["num_atoms"][c], slice(starts[c], starts[c + 1])
        noisy[c, :n] = g["noisy_cart"][sl]
        clean[c, :n] = g["frac_coords"][sl] @ lat[c]
        mask[c, :n] = True
    return g, starts, lat, clean, noisy, mask


@pytest.mark.parametrize("name", ["carbon_24", "perov_5"])
def test_per_atom_targets_match_reference(golden, data_root, name):
    g, starts, lat, clean, noisy, mask = _golden_batch(golden, name)
    cfg = score.ScoreGraphConfig(CUTOFFS[name], 5, required_image_range(lat, CUTOFFS[name]))

    @jax.jit
    @jax.vmap
    def target(c, x, L, m):
        return score.score_target(c, x, L, score.score_graph(x, L, m, cfg))

    t = np.asarray(target(clean, noisy, lat, mask))
    norms = np.loadtxt(data_root / name / "score_norm.txt")
    for c in range(len(g["num_atoms"])):
        n, sl = g["num_atoms"][c], slice(starts[c], starts[c + 1])
        np.testing.assert_allclose(t[c, :n], g["target"][sl], atol=2e-5, err_msg=f"crystal {c}")
        np.testing.assert_allclose(t[c, :n] / norms[g["level"][c]], g["target_normalised"][sl], atol=2e-3)
    assert not np.any(t[~mask])


def test_noise_levels_are_the_reference_ones(golden):
    sig = score.noise_levels()
    assert sig[0] == pytest.approx(0.01) and sig[-1] == pytest.approx(10.0) and len(sig) == 50
    g, starts, lat, clean, noisy, mask = _golden_batch(golden, "perov_5")
    c = 3
    n, sl = g["num_atoms"][c], slice(starts[c], starts[c + 1])
    out = score.perturb(jnp.asarray(clean[c]), jnp.asarray(lat[c]), jnp.asarray(mask[c]),
                        sig[g["level"][c]], jnp.pad(jnp.asarray(g["eps"][sl]), ((0, 5 - n), (0, 0))))
    np.testing.assert_allclose(out[:n], g["noisy_cart"][sl], atol=1e-4)


def test_training_level_probabilities_uniform_or_focused():
    sigmas = score.noise_levels(50, 0.01, 10.0)
    np.testing.assert_allclose(score.level_probabilities(sigmas, None), np.full(50, 0.02))
    p = score.level_probabilities(sigmas, 1.0)
    assert np.isclose(p.sum(), 1.0) and np.all(p > 0)
    below = sigmas <= 1.0
    assert np.allclose(p[below], p[0])  # uniform up to the focus
    np.testing.assert_allclose(p[~below] / p[0], 1.0 / sigmas[~below], rtol=1e-12)  # then 1 / sigma
    assert p[~below].sum() < 0.5 * (~below).mean()


def test_normaliser_is_close_to_the_published_one(test_splits, data_root):
    """Every level within 10% of ``score_norm.txt``, estimated on the Carbon-24 test split."""
    data = test_splits["carbon_24"]
    b = input_pipeline.dense_batch(data, np.arange(len(data)), 24)
    lat = np.asarray(geometry.lattice_matrix(b["lengths"], b["angles"]))
    cfg = score.ScoreGraphConfig(3.0, 5, required_image_range(lat, 3.0))
    est = score.estimate_score_norm(b["frac_coords"], lat, b["atom_mask"], cfg, score.noise_levels(),
                                    jax.random.PRNGKey(0), progress=False)
    ref = np.loadtxt(data_root / "carbon_24" / "score_norm.txt")
    assert np.all(np.abs(est / ref - 1) < 0.10), np.round(est / ref - 1, 3)
    # Small sigma: sqrt(2) sigma, as the SPEC says.
    assert est[0] == pytest.approx(np.sqrt(2) * 0.01, rel=0.03)
