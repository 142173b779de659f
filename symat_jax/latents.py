"""Encoding datasets into latents and fitting the generation prior on them (host-side driver, jitted encoder).

``symat fit-prior --workdir W`` (and the end of ``symat train``) encodes the
training crystals, fits Gaussian mixtures to their joint posterior means
``[z_comp, z_pos, z_lat]`` with several component counts and covariance
types, and kernel density estimates with several bandwidths, keeps the one
with the highest mean log-likelihood of the *validation* crystals' latents,
and saves it as ``prior.npz`` in the run folder with the selection table in
``prior.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from symat_jax import graphs, run
from symat_jax.configs import TrainConfig, get_sampler_preset
from symat_jax.data import CrystalDataset, load_split
from symat_jax.files import write_text_atomic
from symat_jax.input_pipeline import epoch_batches, pad_budgets
from symat_jax.model import SyMat
from symat_jax.prior import MixturePrior, mixture_log_density

log = logging.getLogger(__name__)

COMPONENTS = (1, 2, 5, 10, 20)
COVARIANCE_TYPES = ("full", "diag")
# Kernel bandwidths relative to the latents' covariance (Silverman's rule for 384 dimensions gives ~1.0).
KDE_BANDWIDTHS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
PRIOR_FAMILIES = ("gmm", "kde")


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


class EncodedSplits(NamedTuple):
    """A run's training and validation splits (as it was trained: ``max_train`` applied) and their posterior means."""

    run: run.LoadedRun
    train: CrystalDataset
    val: CrystalDataset
    train_z: np.ndarray
    val_z: np.ndarray


def encode_splits(workdir: str | pathlib.Path, checkpoint: str, weights: str, data_root: str | None = None,
                  datasets: tuple[CrystalDataset, CrystalDataset] | None = None, progress: bool = True) -> EncodedSplits:
    """Return the run's training and validation crystals encoded by the checkpoint's encoder (``datasets`` given or read)."""
    loaded = run.load_run(workdir, checkpoint, weights)
    config = loaded.config
    if datasets is None:
        train = load_split(config.dataset, "train", data_root, progress=progress)
        val = load_split(config.dataset, "val", data_root, progress=progress)
    else:
        train, val = datasets
    if config.max_train is not None:
        train = train.subset(np.arange(min(config.max_train, len(train))))
    return EncodedSplits(loaded, train, val, encode_means(loaded.params, config, loaded.statics, train),
                         encode_means(loaded.params, config, loaded.statics, val))


def _as_prior(gmm: Any) -> MixturePrior:
    """Return a fitted scikit-learn ``GaussianMixture`` as a :class:`MixturePrior` (Cholesky factors of full covariances)."""
    cov = gmm.covariances_
    if gmm.covariance_type == "diag":
        cov = np.stack([np.diag(c) for c in cov])
    return MixturePrior(jnp.asarray(gmm.weights_, jnp.float32), jnp.asarray(gmm.means_, jnp.float32),
                        jnp.asarray(np.linalg.cholesky(cov), jnp.float32))


def kernel_density(train_z: np.ndarray, bandwidth: float, reg: float = 1e-4) -> MixturePrior:
    """Return the variance-corrected Gaussian kernel density estimate of ``train_z`` as a mixture (one shared factor).

    Kernels of covariance ``h^2 S`` (``S`` the latents' covariance) around the
    points would widen the density's covariance to ``(1 + h^2) S``; the points
    are shrunk towards their mean by ``1 / sqrt(1 + h^2)`` and the kernels to
    ``h^2 / (1 + h^2) S``, so draws keep the latents' mean and covariance
    (the shrunk smoothed bootstrap, Silverman 1986, section 6.4.1).
    """
    mean = train_z.mean(0)
    cov = np.cov(train_z.T, bias=True) + reg * np.eye(train_z.shape[1])
    shrink = 1.0 / np.sqrt(1.0 + bandwidth**2)
    tril = np.linalg.cholesky(cov) * bandwidth * shrink
    return MixturePrior(jnp.full(len(train_z), 1.0 / len(train_z), jnp.float32),
                        jnp.asarray(mean + (train_z - mean) * shrink, jnp.float32), jnp.asarray(tril[None], jnp.float32))


def _mean_log_density(prior: MixturePrior, z: np.ndarray, chunk: int = 1024) -> float:
    """Return the mean log density of ``z`` under ``prior``, in chunks (a kernel density's ``[n, K]`` table can be GBs)."""
    parts = [np.asarray(mixture_log_density(prior, jnp.asarray(z[i : i + chunk], jnp.float32)))
             for i in range(0, len(z), chunk)]
    return float(np.mean(np.concatenate(parts)))


def fit_mixture(
    train_z: np.ndarray,
    val_z: np.ndarray,
    components: Sequence[int] = COMPONENTS,
    covariance_types: Sequence[str] = COVARIANCE_TYPES,
    seed: int = 0,
    bandwidths: Sequence[float] = KDE_BANDWIDTHS,
) -> tuple[MixturePrior, list[dict[str, Any]]]:
    """Return the candidate with the best held-out log-likelihood on ``val_z`` and the table of every candidate.

    Candidates: a scikit-learn ``GaussianMixture`` per component count and
    covariance type, and a :func:`kernel_density` per bandwidth (empty
    ``components`` or ``bandwidths`` leaves a family out).
    """
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
                best, best_ll = _as_prior(gmm), row["val_loglik"]
    for h in bandwidths:
        if len(train_z) < 2:
            continue
        kde = kernel_density(train_z, h)
        loglik = [_mean_log_density(kde, z) for z in (train_z, val_z)]
        row = {"components": len(train_z), "covariance": "kde", "bandwidth": h, "train_loglik": loglik[0],
               "val_loglik": loglik[1]}
        table.append(row)
        if row["val_loglik"] > best_ll:
            best, best_ll = kde, row["val_loglik"]
    if best is None:
        raise ValueError(f"no prior could be fitted to {len(train_z)} training latents")
    return best, table


def fit_prior(
    workdir: str | pathlib.Path,
    data_root: str | None = None,
    checkpoint: str = "best",
    datasets: tuple[CrystalDataset, CrystalDataset] | None = None,
    progress: bool = True,
    weights: str | None = None,
    families: Sequence[str] = PRIOR_FAMILIES,
) -> dict[str, Any]:
    """Fit the prior of a trained run and write ``prior.npz`` and ``prior.json`` into it; return the report.

    The latents come from the encoder of ``weights`` (default: those of the
    ``default`` sampler, the prior's user), so prior and decoders match.
    ``families`` (``gmm``, ``kde``) are the candidates the validation likelihood chooses among.
    """
    unknown = sorted(set(families) - set(PRIOR_FAMILIES))
    if unknown or not families:
        raise ValueError(f"prior families must be a non-empty subset of {PRIOR_FAMILIES}, got {list(families)}")
    workdir = pathlib.Path(workdir)
    weights = weights or get_sampler_preset(run.read_config(workdir).dataset, "default").weights
    encoded = encode_splits(workdir, checkpoint, weights, data_root, datasets, progress)
    config, meta, train_z, val_z = encoded.run.config, encoded.run.meta, encoded.train_z, encoded.val_z
    prior, table = fit_mixture(train_z, val_z, seed=config.seed,
                               components=COMPONENTS if "gmm" in families else (),
                               bandwidths=KDE_BANDWIDTHS if "kde" in families else ())
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
    log.info("prior: %d-component %s mixture%s (val log-likelihood %.1f) on %d training latents",
             chosen["components"], chosen["covariance"],
             f", bandwidth {chosen['bandwidth']}" if "bandwidth" in chosen else "", chosen["val_loglik"], len(train_z))
    return report
