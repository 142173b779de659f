"""A property regressor for the evaluation's property EMD (SPEC 5): SphereNet on a periodic radius graph + MLP head.

The graph is the K nearest periodic neighbours within a cut-off, built in
JAX from (lattice, fractional coordinates) - no host-side CrystalNN - so the
same jitted function scores dataset crystals and generated ones. The target
is standardised on the training set; the graph embedding is averaged over
atoms (the properties are per atom or per cell of fixed size).

Run folder: ``property_config.json``, ``property_stats.json`` (target mean/std,
image range), ``checkpoints/`` + ``best/`` (orbax), ``metrics.jsonl`` and
``test_metrics.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from symat_jax import geometry, graphs, loop
from symat_jax.checkpoints import RunCheckpoints, start_run
from symat_jax.configs import PropertyConfig
from symat_jax.crystals import CrystalSet
from symat_jax.data import load_split, registry
from symat_jax.neighbors import image_cells, nearest_with_ties, periodic_neighbors, required_image_range
from symat_jax.networks import NUM_ELEMENTS, SphereNet, swish
from symat_jax.files import check_folder_path, read_json, write_text_atomic
from symat_jax.run import TrainState, check_training_folder, holds_run, stream_key

log = logging.getLogger(__name__)
Array = jax.Array
MAX_IMAGE_CELLS = 11**3  # images a prediction may search: a 6 A cut-off in cells of about 1.2 A and up


class PropertyNet(nn.Module):
    """SphereNet encoder, mean over atoms, MLP head: one scalar (standardised property) per crystal."""

    config: PropertyConfig

    @nn.compact
    def __call__(self, g: graphs.EdgeGraph, num_graphs: int) -> Array:
        """Return ``[num_graphs]`` standardised predictions."""
        c = self.config
        embed = nn.Embed(NUM_ELEMENTS + 1, c.encoder.hidden, name="atom_embed")
        u, _ = SphereNet(c.encoder, embed=embed, name="encoder")(g, num_graphs)
        atoms = jax.ops.segment_sum(g.node_mask.astype(u.dtype), g.node_graph, num_segments=num_graphs)
        h = u / jnp.maximum(atoms, 1.0)[:, None]
        # swish, not ReLU: the encoder's output starts at exactly zero (zero-initialised
        # output layers) and ReLU'(0) = 0 would leave every weight without gradient.
        for i in range(2):
            h = swish(nn.Dense(c.head_hidden, name=f"head_{i}")(h))
        return nn.Dense(1, name="head_out")(h)[:, 0]


def property_graph(
    batch: dict[str, Array], config: PropertyConfig, max_images: tuple[int, int, int]
) -> tuple[graphs.EdgeGraph, Array]:
    """Return the periodic graph of a dense batch and ``[b]`` overflow flags.

    The batch holds ``atomic_numbers``, ``frac_coords``, ``atom_mask`` [b, n...],
    ``lengths``, ``angles`` [b, 3]. Each atom receives its K nearest neighbours
    within the cut-off plus all neighbours tied with the K-th, so the graph
    (and the prediction) does not depend on atom order or origin.
    """
    lattice = geometry.lattice_matrix(batch["lengths"], batch["angles"])
    pos = geometry.frac_to_cart(batch["frac_coords"], lattice)
    nl = jax.vmap(functools.partial(
        periodic_neighbors, cutoff=config.encoder.cutoff, max_neighbors=config.neighbor_capacity + 1,
        max_images=max_images, keep_nearest=True,
    ))(pos, lattice, batch["atom_mask"])
    nl = nearest_with_ties(nl, config.max_neighbors)
    g, _ = graphs.score_edge_graph(nl, batch["atomic_numbers"], batch["atom_mask"])
    return g, nl.overflow


@functools.lru_cache(maxsize=None)
def _forward(config: PropertyConfig, max_images: tuple[int, int, int]):
    """Return jitted ``(params, dense batch) -> ([b] standardised predictions, [b] graph overflow)``."""
    model = PropertyNet(config)

    def forward(params, batch):
        g, overflow = property_graph(batch, config, max_images)
        return model.apply(params, g, batch["atom_mask"].shape[0]), overflow

    return jax.jit(forward)


@functools.lru_cache(maxsize=None)
def _training(config: PropertyConfig, max_images: tuple[int, int, int], total_steps: int):
    """Return jitted ``(init, train_step)`` (Adam, cosine-decayed learning rate, MSE on the standardised target)."""
    model = PropertyNet(config)
    tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1), alpha=0.05))

    def init(key, batch):
        params = model.init(key, property_graph(batch, config, max_images)[0], batch["atom_mask"].shape[0])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=key)

    def loss_fn(params, batch):
        err = model.apply(params, property_graph(batch, config, max_images)[0], batch["atom_mask"].shape[0]) - batch["target"]
        w = batch["crystal_mask"].astype(err.dtype)
        return jnp.sum(w * err**2) / jnp.maximum(w.sum(), 1.0)

    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), loss

    return jax.jit(init), jax.jit(train_step)


def _dense_batches(dense: dict[str, np.ndarray], order: np.ndarray, batch_size: int, extra: dict[str, np.ndarray] | None = None):
    """Yield ``(batch, crystal indices)`` of fixed size over a dense crystal set in ``order``; the last is padded with masked crystals."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        pad = batch_size - len(idx)
        full = np.concatenate([idx, np.full(pad, idx[0])])
        batch = {k: v[full] for k, v in dense.items()}
        batch["atom_mask"] = batch["atom_mask"] & (np.arange(batch_size) < len(idx))[:, None]
        batch["crystal_mask"] = np.arange(batch_size) < len(idx)
        for k, v in (extra or {}).items():
            batch[k] = v[full].astype(np.float32)
        yield batch, idx


@dataclasses.dataclass(frozen=True)
class PropertyStats:
    """Target standardiser and neighbour image range of a property run (``property_stats.json``)."""

    mean: float
    std: float
    max_images: tuple[int, int, int]
    property_column: str

    def to_json(self) -> str:
        """Return the stats as JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PropertyStats":
        """Return the stats stored by :meth:`to_json`."""
        d = json.loads(text)
        return cls(float(d["mean"]), float(d["std"]), tuple(d["max_images"]), d["property_column"])


def _image_range(lengths: np.ndarray, angles: np.ndarray, cutoff: float) -> tuple[int, int, int]:
    """Return the image range that finds every neighbour within ``cutoff`` for these cells."""
    return required_image_range(np.asarray(geometry.lattice_matrix(lengths, angles)), cutoff)


class PropertyPredictor:
    """A trained property model: ``predictor(crystal_set) -> [c]`` predictions in the property's units."""

    def __init__(self, config: PropertyConfig, stats: PropertyStats, params: Any, batch_size: int = 64) -> None:
        """Keep the config, stats and parameters of a run."""
        self.config, self.stats, self.params, self.batch_size = config, stats, params, batch_size

    def __call__(self, crystals: CrystalSet, progress: bool = False) -> np.ndarray:
        """Return the predicted property of every crystal (padded to the larger of max_atoms and the set's largest)."""
        if len(crystals) == 0:
            return np.zeros(0)
        # A collapsed cell would need thousands of periodic images (and the whole set's graph with it): NaN instead.
        lattices = np.asarray(geometry.lattice_matrix(np.asarray(crystals.lengths, float), np.asarray(crystals.angles, float)))
        searchable = np.array([image_cells(lat, self.config.encoder.cutoff) <= MAX_IMAGE_CELLS for lat in lattices])
        if not searchable.all():
            log.warning("%d crystals have cells too thin for the property model's neighbour search (over %d "
                        "periodic images): their prediction is NaN", int((~searchable).sum()), MAX_IMAGE_CELLS)
            out = np.full(len(crystals), np.nan)
            keep = np.flatnonzero(searchable)
            out[keep] = self(crystals.subset(keep), progress) if len(keep) else []
            return out
        n = max(self.config.max_atoms, int(crystals.num_atoms.max()))
        dense = crystals.dense(n)
        images = tuple(max(a, b) for a, b in zip(self.stats.max_images, _image_range(
            dense["lengths"], dense["angles"], self.config.encoder.cutoff)))
        forward = _forward(self.config, images)
        out = np.zeros(len(crystals))
        overflow = np.zeros(len(crystals), bool)
        bar = tqdm(total=len(crystals), desc="property model", disable=not progress, leave=False)
        for batch, idx in _dense_batches(dense, np.arange(len(crystals)), self.batch_size):
            pred, over = forward(self.params, batch)
            out[idx] = np.asarray(pred)[: len(idx)] * self.stats.std + self.stats.mean
            overflow[idx] = np.asarray(over)[: len(idx)]
            bar.update(len(idx))
        bar.close()
        if overflow.any():
            log.warning("%d crystals have more neighbours tied with the K-th than the graph holds "
                        "(neighbor_capacity=%d); their predictions use a truncated shell",
                        int(overflow.sum()), self.config.neighbor_capacity)
        return out


def load_property_model(workdir: str | pathlib.Path) -> PropertyPredictor:
    """Return the best checkpoint of a property-model run."""
    workdir = pathlib.Path(workdir)
    path = workdir / "property_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} holds no property model ({path.name} is missing): train one with "
                                f"`symat train-property --workdir {workdir}`")
    config = PropertyConfig.from_dict(read_json(path, ("dataset", "encoder")))
    stats = PropertyStats.from_json(json.dumps(read_json(workdir / "property_stats.json")))
    ckpt = RunCheckpoints(workdir, read_only=True)
    state, _ = ckpt.restore_raw(best=True)
    ckpt.close()
    return PropertyPredictor(config, stats, state["params"])


def _split(dataset: str, split: str, data_root: str | None, progress: bool) -> tuple[CrystalSet, np.ndarray]:
    """Return ``(crystals, property)`` of a split, leaving out crystals without a finite property."""
    data = load_split(dataset, split, data_root, with_graph=False, progress=progress)
    keep = np.flatnonzero(np.isfinite(data.properties))
    if len(keep) < len(data):
        log.warning("%s/%s: %d crystals have no %s; left out", dataset, split, len(data) - len(keep), data.property_column)
    return data.crystal_set().subset(keep), np.asarray(data.properties[keep], float)


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Return the mean absolute error."""
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(target))))


def train_property(config: PropertyConfig, workdir: str | pathlib.Path, data_root: str | None = None, *,
                   resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a property model in ``workdir``; return its test metrics (MAE beside the mean-predictor MAE)."""
    workdir = check_folder_path(workdir, "--workdir")
    config_path = workdir / "property_config.json"
    # Refusals and inputs first: a refused or failed command writes nothing.
    if (workdir / "config.json").exists():
        raise ValueError(f"{workdir} already holds a SyMat run; give the property model its own --workdir")
    if not resume and holds_run(workdir):
        raise ValueError(f"{workdir} already holds a run; pass --resume to continue it, or choose another workdir")
    check_training_folder(workdir, config_path.name)
    if resume and config_path.exists():
        stored = PropertyConfig.from_dict(read_json(config_path))
        if dataclasses.replace(stored, epochs=config.epochs) != config:
            raise ValueError(f"{config_path} differs from the requested config; resume with the same settings")

    train, y_train = _split(config.dataset, "train", data_root, progress)
    if config.max_train is not None and config.max_train < len(train):
        train, y_train = train.subset(np.arange(config.max_train)), y_train[: config.max_train]
    val, y_val = _split(config.dataset, "val", data_root, progress)
    test, y_test = _split(config.dataset, "test", data_root, progress)
    stats = PropertyStats(
        float(y_train.mean()), float(y_train.std() or 1.0),
        _image_range(train.lengths, train.angles, config.encoder.cutoff), registry.get_info(config.dataset).property_column,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path, config.to_json())
    write_text_atomic(workdir / "property_stats.json", stats.to_json())
    steps_per_epoch = -(-len(train) // config.batch_size)
    init, train_step = _training(config, stats.max_images, steps_per_epoch * config.epochs)
    dense = train.dense(config.max_atoms)
    target = (y_train - stats.mean) / stats.std
    first, _ = next(_dense_batches(dense, np.arange(len(train)), config.batch_size, {"target": target}))
    state = init(stream_key(config.seed, "params"), first)

    start = start_run(workdir, config.keep_checkpoints, state, resume, "best_val_mae")

    def end_epoch(state: TrainState, rows: list, weights: list[int], t0: float):
        losses = np.asarray([float(r["loss"]) for r in jax.device_get(rows)], np.float64)
        predictor = PropertyPredictor(config, stats, state.params, config.batch_size)
        val_mae = mae(predictor(val), y_val)
        seconds = round(time.perf_counter() - t0, 2)
        record = {"train_mse_std": float(np.mean(losses)), "val_mae": val_mae, "seconds": seconds}
        message = f"train MSE (std units) {record['train_mse_std']:.4f}, val MAE {val_mae:.4f} ({seconds:.1f} s)"
        return val_mae, record, {}, message

    def step(state: TrainState, batch: dict[str, np.ndarray]):
        state, loss = train_step(state, batch)
        return state, {"loss": loss}

    _, _, best = loop.run_epochs(
        start, epochs=config.epochs, seed=config.seed, num_examples=len(train), steps_per_epoch=steps_per_epoch,
        batches=lambda order: ((batch, len(idx)) for batch, idx in
                               _dense_batches(dense, order, config.batch_size, {"target": target})),
        train_step=step, end_epoch=end_epoch, best_key="best_val_mae", desc="property epoch", progress=progress,
    )

    model = load_property_model(workdir)
    pred = model(test)
    result = {
        "dataset": config.dataset,
        "property": stats.property_column,
        "num_train": len(train),
        "num_test": len(test),
        "test_mae": mae(pred, y_test),
        # What predicting the training mean scores: the bar the model must clear.
        "test_mae_mean_predictor": mae(np.full(len(y_test), stats.mean), y_test),
        "best_val_mae": best,
    }
    (workdir / "test_metrics.json").write_text(json.dumps(result, indent=1))
    return result
