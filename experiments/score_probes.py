"""Probe what the trained score network says about two simple distortions of real crystals.

``python -m experiments.score_probes --workdir RUN --data-root D [--levels 7 12 14 18] [--num 96]``

* **strain**: every cell of the test crystals (their own posterior ``z_pos``,
  noised at a level) stretched by a factor; the symmetric strain that best
  explains the network's per-edge scalars (least squares of
  ``d_e u_e^T eps u_e`` against ``norm(sigma) s_e``) says whether the network
  would pull the bonds back (ideal isotropic strain ``1 / factor - 1``).
  Uniform strain is invisible to the per-atom score (the pulls cancel), so
  this reads the per-edge scalars themselves.
* **displace**: one atom of each noised crystal moved by a distance in a
  random direction; the cosine between the network's per-atom displacement
  estimate ``norm(sigma) s_i`` and the way back, and its length over the distance.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from symat_jax import geometry, score
from symat_jax.model import SyMat, per_atom_scores, score_graphs

Array = jax.Array


def fit_strain(nl, edge_scalars: Array) -> Array:
    """Return ``[b]`` the mean normal strain of the symmetric strain fitted to per-edge distance changes ``[b, n, k]`` (A)."""
    keep = jax.vmap(score.scored_edge_mask)(nl)
    d = nl.distances
    u = nl.vectors / jnp.maximum(d, 1e-9)[..., None]
    phi = d[..., None] * jnp.stack([u[..., 0] ** 2, u[..., 1] ** 2, u[..., 2] ** 2, 2 * u[..., 0] * u[..., 1],
                                    2 * u[..., 0] * u[..., 2], 2 * u[..., 1] * u[..., 2]], -1)
    w = keep[..., None]
    normal = jnp.einsum("bnkp,bnkq->bpq", phi * w, phi) + 1e-6 * jnp.eye(6)
    rhs = jnp.einsum("bnkp,bnk->bp", phi * w, jnp.where(keep, edge_scalars, 0.0))
    return jnp.linalg.solve(normal, rhs[..., None])[..., 0][:, :3].mean(-1)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the strain and displacement probes per level."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--levels", type=int, nargs="+", default=[7, 12, 14, 18])
    p.add_argument("--stretches", type=float, nargs="+", default=[0.9, 1.0, 1.1, 1.2, 1.3])
    p.add_argument("--distances", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.6])
    p.add_argument("--num", type=int, default=96)
    p.add_argument("--max-atoms", type=int, default=12)
    args = p.parse_args(argv)
    data = common.load_test_crystals(args.workdir, args.data_root, args.num, args.max_atoms)
    config, statics, params, _ = data.loaded
    m = config.model
    lattice, frac, mask, types, z_pos = data.lattice, data.frac, data.mask, data.types, data.z_pos
    sigmas = score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max)
    graph_config = score.ScoreGraphConfig(m.score_cutoff, m.score_neighbors, (3, 3, 3))

    def edges(x, lat):
        sg, slots, nl = score_graphs(x, lat, types, mask, graph_config=graph_config)
        e = SyMat(m).apply(params, sg, z_pos, method=SyMat.edge_scores)
        return e, slots, nl

    def noised(x, lat, level, key):
        return jax.vmap(score.perturb)(x, lat, mask, jnp.full(mask.shape[:1], sigmas[level], jnp.float32),
                                       jax.random.normal(key, x.shape))

    print("strain: median fitted isotropic strain (ideal 1/stretch - 1)")
    for level in args.levels:
        for stretch in args.stretches:
            lat = lattice * stretch
            x = noised(geometry.frac_to_cart(frac, lat), lat, level, jax.random.PRNGKey(level))
            e, slots, nl = edges(x, lat)
            s = jnp.take(e, slots, mode="fill", fill_value=0.0) * statics.score_norm[level]
            iso = np.asarray(fit_strain(nl, s))
            print(f"  sigma {sigmas[level]:.3f} A, stretch {stretch:.2f}: {np.median(iso):+.3f} (ideal {1 / stretch - 1:+.3f})")
    print("displace: one atom moved; cos(estimate, way back) and |estimate| / distance (medians)")
    clean = geometry.frac_to_cart(frac, lattice)
    for level in args.levels:
        for dist in args.distances:
            k1, k2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), level * 100 + int(dist * 100)))
            x = noised(clean, lattice, level, k1)
            move = jax.random.normal(k2, (x.shape[0], 3))
            move = move / jnp.linalg.norm(move, axis=-1, keepdims=True) * dist
            x = x.at[:, 0].add(move)
            e, slots, nl = edges(x, lattice)
            est = np.asarray(per_atom_scores(e, slots, nl)[:, 0] * statics.score_norm[level])
            back = -np.asarray(move)
            cos = (est * back).sum(-1) / np.linalg.norm(est, axis=-1) / dist
            print(f"  sigma {sigmas[level]:.3f} A, moved {dist:.1f} A: cos {np.median(cos):+.2f}, "
                  f"length / distance {np.median(np.linalg.norm(est, axis=-1) / dist):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
