"""A property head on the latents: an MLP on ``z = [z_comp, z_pos, z_lat]`` predicting the dataset's property.

Fitted after training on the frozen encoder's posterior means of the
training split (``symat fit-head --workdir W``; no retraining of the VAE),
the epoch with the lowest validation MAE kept. The head is the objective
``symat optimize`` lowers; the independent judge of its crystals is the
property model of ``symat train-property``.

Run folder: ``property_head.msgpack`` (parameters) and ``property_head.json``
(config, target mean/std, the checkpoint whose encoder it was fitted on, MAEs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from symat_jax.configs import HeadConfig
from symat_jax.files import read_json, write_text_atomic
from symat_jax.networks import swish

log = logging.getLogger(__name__)
Array = jax.Array
HEAD_PARAMS_FILE = "property_head.msgpack"
HEAD_REPORT_FILE = "property_head.json"


class LatentHead(nn.Module):
    """MLP ``[..., dim] -> [...]``: the standardised property of a latent."""

    hidden: int
    layers: int

    @nn.compact
    def __call__(self, z: Array) -> Array:
        """Return the standardised prediction of each latent."""
        h = z
        for i in range(self.layers):
            h = swish(nn.Dense(self.hidden, name=f"dense_{i}")(h))
        return nn.Dense(1, name="out")(h)[..., 0]


@dataclasses.dataclass(frozen=True)
class PropertyHead:
    """A fitted head: its config, parameters and the target's mean and std (the property in the dataset's units)."""

    config: HeadConfig
    params: Any
    mean: float
    std: float
    dataset: str
    property_column: str

    def predict(self, z: Array) -> Array:
        """Return the predicted property of latents ``z [..., dim]`` (jittable and differentiable in ``z``)."""
        out = LatentHead(self.config.hidden, self.config.layers).apply(self.params, z)
        return out * self.std + self.mean


def fit_head(train_z: np.ndarray, train_y: np.ndarray, val_z: np.ndarray, val_y: np.ndarray,
             config: HeadConfig = HeadConfig(), *, dataset: str = "", property_column: str = "",
             progress: bool = True) -> tuple[PropertyHead, dict[str, Any]]:
    """Return the head fitted to ``(train_z, train_y)`` at its best validation epoch, and the fit's record (MAEs).

    Rows whose target is NaN (no property in the CSV) are left out.
    """
    keep_t, keep_v = np.isfinite(train_y), np.isfinite(val_y)
    tz, ty = np.asarray(train_z[keep_t], np.float32), np.asarray(train_y[keep_t], np.float64)
    vz, vy = np.asarray(val_z[keep_v], np.float32), np.asarray(val_y[keep_v], np.float64)
    if len(ty) < 2 or len(vy) < 1:
        raise ValueError(f"a head needs 2 training and 1 validation crystals with a property, got {len(ty)} and {len(vy)}")
    mean, std = float(ty.mean()), float(ty.std() or 1.0)
    target = jnp.asarray((ty - mean) / std, jnp.float32)
    module = LatentHead(config.hidden, config.layers)
    key = jax.random.PRNGKey(config.seed)
    params = module.init(key, jnp.zeros((1, tz.shape[1])))
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, z, y, mask):
        def loss_fn(p):
            err = jnp.abs(module.apply(p, z) - y)
            return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, z: module.apply(p, z) * std + mean)
    b = min(config.batch_size, len(ty))
    num_batches = -(-len(ty) // b)
    best = (np.inf, params, 0)
    rng = np.random.default_rng(config.seed)
    tz_dev = jnp.asarray(tz)
    for epoch in tqdm(range(config.epochs), desc="property head", unit="epoch", disable=not progress):
        order = rng.permutation(len(ty))
        order = np.concatenate([order, np.zeros(num_batches * b - len(ty), np.int64)])  # padding rows, masked
        mask = np.arange(num_batches * b) < len(ty)
        for k in range(num_batches):
            idx, m = order[k * b : (k + 1) * b], mask[k * b : (k + 1) * b]
            params, opt_state, _ = train_step(params, opt_state, tz_dev[idx], target[idx], jnp.asarray(m, jnp.float32))
        val_mae = float(np.mean(np.abs(np.asarray(predict(params, vz)) - vy)))
        if val_mae < best[0]:
            best = (val_mae, params, epoch + 1)
    val_mae, params, best_epoch = best
    train_mae = float(np.mean(np.abs(np.asarray(predict(params, tz)) - ty)))
    record = {"val_mae": val_mae, "train_mae": train_mae, "best_epoch": best_epoch,
              "val_mae_of_the_mean": float(np.mean(np.abs(vy - mean))), "num_train": int(len(ty)),
              "num_val": int(len(vy))}
    return PropertyHead(config, params, mean, std, dataset, property_column), record


def save_head(workdir: str | pathlib.Path, head: PropertyHead, report: dict[str, Any]) -> None:
    """Write the head's parameters and report into ``workdir`` (each file atomically; the report, which names it, last)."""
    workdir = pathlib.Path(workdir)
    tmp = workdir / f".{HEAD_PARAMS_FILE}.tmp"
    tmp.write_bytes(flax.serialization.to_bytes(head.params))
    tmp.replace(workdir / HEAD_PARAMS_FILE)
    full = {"config": dataclasses.asdict(head.config), "mean": head.mean, "std": head.std, "dataset": head.dataset,
            "property_column": head.property_column, **report}
    write_text_atomic(workdir / HEAD_REPORT_FILE, json.dumps(full, indent=1))


def load_head(workdir: str | pathlib.Path) -> tuple[PropertyHead, dict[str, Any]]:
    """Return the run's head and its report (FileNotFoundError saying how to fit one)."""
    workdir = pathlib.Path(workdir)
    report_path, params_path = workdir / HEAD_REPORT_FILE, workdir / HEAD_PARAMS_FILE
    if not report_path.exists() or not params_path.exists():
        raise FileNotFoundError(f"{workdir} has no property head ({HEAD_REPORT_FILE}); fit one with "
                                f"`symat fit-head --workdir {workdir}`")
    report = read_json(report_path, ("config", "mean", "std", "dataset"))
    try:
        config = HeadConfig(**report["config"])
        template = LatentHead(config.hidden, config.layers).init(jax.random.PRNGKey(0),
                                                                  jnp.zeros((1, int(report["dim"]))))
        params = flax.serialization.from_bytes(template, params_path.read_bytes())
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{params_path} does not hold the head {report_path} describes ({err}); refit it with "
                         f"`symat fit-head --workdir {workdir}`") from None
    return PropertyHead(config, params, float(report["mean"]), float(report["std"]), str(report["dataset"]),
                        str(report.get("property_column", ""))), report


def fit_run_head(workdir: str | pathlib.Path, data_root: str | None = None, checkpoint: str | None = None,
                 weights: str | None = None, config: HeadConfig = HeadConfig(), datasets: tuple | None = None,
                 progress: bool = True, preset: str = "default") -> dict[str, Any]:
    """Fit the head of a trained run on its encoded training split, write it into the run, and return the report.

    The latents come from the encoder of the sampler ``preset``'s checkpoint
    and weights (unless given): those ``symat optimize`` with that preset
    starts from and decodes (it refuses a head of other latents).
    """
    from symat_jax import run
    from symat_jax.configs import get_sampler_preset
    from symat_jax.latents import encode_splits

    workdir = pathlib.Path(workdir)
    chosen = get_sampler_preset(run.read_config(workdir).dataset, preset)
    checkpoint, weights = checkpoint or chosen.checkpoint, weights or chosen.weights
    encoded = encode_splits(workdir, checkpoint, weights, data_root, datasets, progress)
    train, val, train_z, val_z, meta = encoded.train, encoded.val, encoded.train_z, encoded.val_z, encoded.run.meta
    head, record = fit_head(train_z, train.properties, val_z, val.properties, config, dataset=encoded.run.config.dataset,
                            property_column=train.property_column, progress=progress)
    report = {"checkpoint": checkpoint, "checkpoint_epoch": int(meta["epoch"]) + 1, "weights": meta["weights"],
              "dim": int(train_z.shape[1]), **record}
    save_head(workdir, head, report)
    log.info("property head: validation MAE %.4g %s (predicting the mean: %.4g), epoch %d of %d",
             record["val_mae"], train.property_column, record["val_mae_of_the_mean"], record["best_epoch"], config.epochs)
    return {**report, "config": dataclasses.asdict(config), "dataset": head.dataset}
