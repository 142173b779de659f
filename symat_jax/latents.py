"""Encoding datasets into latents and fitting the generation prior on them (host-side driver, jitted encoder).

``symat fit-prior --workdir W`` (and the end of ``symat train``) encodes the
training crystals, fits Gaussian mixtures to their joint posterior means
``[z_comp, z_pos, z_lat]`` with several component counts and covariance
types, keeps the one with the highest mean log-likelihood of the
*validation* crystals' latents, and saves it as ``prior.npz`` in the run
folder with the selection table in ``prior.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from symat_jax import graphs, run
from symat_jax.configs import TrainConfig, sampler_weights
from symat_jax.data import CrystalDataset, load_split
from symat_jax.files import write_text_atomic
from symat_jax.input_pipeline import epoch_batches, pad_budgets
from symat_jax.model import SyMat
from symat_jax.prior import MixturePrior

log = logging.getLogger(__name__)

COMPONENTS = (1, 2, 5, 10, 20)
COVARIANCE_TYPES = ("full", "diag")


@functools.lru_cache(maxsize=4)
def _encoder(config: TrainConfig):
    """Return a jitted ``(params, batch) -> joint posterior means [b, D]`` (rows of padding crystals included)."""
    model = SyMat(config.model)

    @jax.jit
    def encode(params, enc, lattice_std):
        b = lattice_std.shape[0] - 1
        post = model.apply(params, graphs.encoder_edge_graph(enc), lattice_std, b + 1, method=SyMat.encode)
        return jnp.concatenate([post.comp_mean, post.pos_mean, post.lat_mean], axis=-1)[:b]

    return encode


def encode_means(params: Any, config: TrainConfig, statics: run.RunStatics, data: CrystalDataset) -> np.ndarray:
    """Return ``[c, D]`` posterior means ``[z_comp, z_pos, z_lat]`` of every crystal of ``data`` (in order)."""
    encode = _encoder(config)
    budgets = pad_budgets(data, config.batch_size, 1)
    out = []
    for batch in epoch_batches(data, np.arange(len(data)), budgets, config.batch_size, config.model.max_atoms,
                               statics.element_slots, statics.lattice):
        z = np.asarray(encode(params, batch["enc"], jnp.asarray(batch["lattice_std"])))
        out.append(z[np.asarray(batch["crystal_mask"])])
    return np.concatenate(out)


def _as_prior(gmm: Any) -> MixturePrior:
    """Return a fitted scikit-learn ``GaussianMixture`` as a :class:`MixturePrior` (Cholesky factors of full covariances)."""
    cov = gmm.covariances_
    if gmm.covariance_type == "diag":
        cov = np.stack([np.diag(c) for c in cov])
    return MixturePrior(jnp.asarray(gmm.weights_, jnp.float32), jnp.asarray(gmm.means_, jnp.float32),
                        jnp.asarray(np.linalg.cholesky(cov), jnp.float32))


def fit_mixture(
    train_z: np.ndarray,
    val_z: np.ndarray,
    components: Sequence[int] = COMPONENTS,
    covariance_types: Sequence[str] = COVARIANCE_TYPES,
    seed: int = 0,
) -> tuple[MixturePrior, list[dict[str, Any]]]:
    """Return the mixture with the best held-out log-likelihood on ``val_z`` and the table of every candidate."""
    from sklearn.mixture import GaussianMixture  # host-side, only here

    table, best, best_ll = [], None, -np.inf
    for cov in covariance_types:
        for k in components:
            if k > len(train_z):
                continue
            gmm = GaussianMixture(k, covariance_type=cov, reg_covar=1e-4, max_iter=300, n_init=1, random_state=seed)
            gmm.fit(train_z)
            row = {"components": k, "covariance": cov, "train_loglik": float(gmm.score(train_z)),
                   "val_loglik": float(gmm.score(val_z))}
            table.append(row)
            if row["val_loglik"] > best_ll:
                best, best_ll = gmm, row["val_loglik"]
    if best is None:
        raise ValueError(f"no mixture could be fitted to {len(train_z)} training latents")
    return _as_prior(best), table


def fit_prior(
    workdir: str | pathlib.Path,
    data_root: str | None = None,
    checkpoint: str = "best",
    datasets: tuple[CrystalDataset, CrystalDataset] | None = None,
    progress: bool = True,
    weights: str | None = None,
) -> dict[str, Any]:
    """Fit the mixture prior of a trained run and write ``prior.npz`` and ``prior.json`` into it; return the report.

    The latents come from the encoder of ``weights`` (default: those of the
    ``default`` sampler, the prior's user), so prior and decoders match.
    """
    workdir = pathlib.Path(workdir)
    weights = weights or sampler_weights("default")
    config, statics, params, meta = run.load_run(workdir, checkpoint, weights)
    if datasets is None:
        train = load_split(config.dataset, "train", data_root, progress=progress)
        val = load_split(config.dataset, "val", data_root, progress=progress)
    else:
        train, val = datasets
    if config.max_train is not None:
        train = train.subset(np.arange(min(config.max_train, len(train))))
    train_z = encode_means(params, config, statics, train)
    val_z = encode_means(params, config, statics, val)
    prior, table = fit_mixture(train_z, val_z, seed=config.seed)
    chosen = max(table, key=lambda r: r["val_loglik"])
    report = {
        "checkpoint": checkpoint,
        "checkpoint_epoch": int(meta["epoch"]) + 1,
        "weights": meta["weights"],
        "num_train": len(train_z),
        "num_val": len(val_z),
        "dim": int(train_z.shape[1]),
        "chosen": chosen,
        "candidates": table,
        "train_latent_mean_norm": float(np.linalg.norm(train_z.mean(0))),
        "train_latent_rms": float(np.sqrt(np.mean(train_z**2))),
    }
    prior.save(workdir / run.PRIOR_FILE)
    write_text_atomic(workdir / run.PRIOR_REPORT_FILE, json.dumps(report, indent=1))
    log.info("prior: %d-component %s mixture (val log-likelihood %.1f) on %d training latents",
             chosen["components"], chosen["covariance"], chosen["val_loglik"], len(train_z))
    return report
