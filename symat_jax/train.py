"""Training SyMat: the jitted train/eval steps and a resumable, checkpointed loop."""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from symat_jax import geometry, graphs, losses, score
from symat_jax.checkpoints import start_run
from symat_jax.configs import TrainConfig
from symat_jax.data import CrystalDataset, load_split
from symat_jax.input_pipeline import LatticeStandardizer, epoch_batches, max_elements
from symat_jax.model import SyMat, per_atom_scores
from symat_jax.neighbors import required_image_range

log = logging.getLogger(__name__)
Array = jax.Array
Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: step, parameters, optimiser state and the base PRNG key."""

    step: Array
    params: Any
    opt_state: Any
    key: Array  # raw key data; the step's key is fold_in(key, step)


@dataclasses.dataclass(frozen=True)
class RunStatics:
    """Values fixed for a run and stored beside its checkpoints (``normalizers.json``)."""

    score_norm: tuple[float, ...]
    max_images: tuple[int, int, int]
    element_slots: int
    lattice: LatticeStandardizer

    def to_json(self) -> str:
        """Return the statics as JSON."""
        return json.dumps(
            {
                "score_norm": list(self.score_norm),
                "max_images": list(self.max_images),
                "element_slots": self.element_slots,
                "lattice": json.loads(self.lattice.to_json()),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> "RunStatics":
        """Return the statics stored by :meth:`to_json`."""
        d = json.loads(text)
        return cls(
            tuple(d["score_norm"]),
            tuple(d["max_images"]),
            int(d["element_slots"]),
            LatticeStandardizer.from_json(json.dumps(d["lattice"])),
        )


class Trainer:
    """The model, optimiser and jitted steps of one configuration."""

    def __init__(self, config: TrainConfig, statics: RunStatics) -> None:
        """Build the model and optimiser (Adam with gradient clipping by value)."""
        self.config = config
        self.statics = statics
        self.model = SyMat(config.model)
        self.tx = optax.chain(optax.clip(config.clip_value), optax.adam(config.learning_rate))
        m = config.model
        self.sigmas = jnp.asarray(score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max), jnp.float32)
        self.score_norm = jnp.asarray(statics.score_norm, jnp.float32)
        self.graph_config = score.ScoreGraphConfig(m.score_cutoff, m.score_neighbors, tuple(statics.max_images))
        # Python-side trace counts (chex.assert_max_traces style): padding
        # budgets must keep these at one per budget.
        self.traces: collections.Counter[str] = collections.Counter()
        self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
        self.eval_step = jax.jit(self._eval_step)

    # -- state ---------------------------------------------------------------

    def init_state(self, batch: Batch, seed: int) -> TrainState:
        """Return a fresh train state; ``batch`` only provides shapes."""
        key = jax.random.PRNGKey(seed)
        enc = graphs.encoder_edge_graph(batch["enc"])
        b = batch["crystal_mask"].shape[0]
        *_, nl = self._noisy_graph(batch, key)
        sg, _ = self._score_graph(batch, nl)
        params = self.model.init(jax.random.fold_in(key, 1), enc, jnp.asarray(batch["lattice_std"]), b + 1, sg, b)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), key=key)

    # -- forward -------------------------------------------------------------

    def _noisy_graph(self, batch: Batch, key: Array) -> tuple[Array, Array, Array, Array, Any]:
        """Return ``(clean, noisy, lattice, levels, neighbour list)`` of the batch at random noise levels."""
        k_lvl, k_eps = jax.random.split(key)
        lattice = geometry.lattice_matrix(batch["lengths"], batch["angles"])
        clean = geometry.frac_to_cart(batch["frac_coords"], lattice)
        mask = batch["atom_mask"]
        levels = jax.random.randint(k_lvl, (clean.shape[0],), 0, self.sigmas.shape[0])
        eps = jax.random.normal(k_eps, clean.shape)
        noisy = jax.vmap(score.perturb)(clean, lattice, mask, self.sigmas[levels], eps)
        nl = jax.vmap(functools.partial(score.score_graph, config=self.graph_config))(noisy, lattice, mask)
        return clean, noisy, lattice, levels, nl

    def _score_graph(self, batch: Batch, nl: Any) -> tuple[graphs.EdgeGraph, Array]:
        """Return the packed score graph of a batch (as many nodes as its encoder graph: no padding atoms)."""
        num_nodes = batch["enc"].nodes["atomic_numbers"].shape[0]
        return graphs.score_edge_graph(nl, jnp.asarray(batch["atomic_numbers"]), jnp.asarray(batch["atom_mask"]), num_nodes)

    def _losses(self, params: Any, batch: Batch, key: Array, sample: bool) -> tuple[Array, dict[str, Array]]:
        """Return ``(total loss, per-term metrics)`` of a batch."""
        c = self.config
        b = batch["crystal_mask"].shape[0]
        crystal = batch["crystal_mask"]
        apply = functools.partial(self.model.apply, params)
        post = apply(graphs.encoder_edge_graph(batch["enc"]), batch["lattice_std"], b + 1, method=SyMat.encode)
        post = jax.tree_util.tree_map(lambda x: x[:b], post)
        k_z, k_noise = jax.random.split(key)
        kc, kp, kl_ = jax.random.split(k_z, 3)

        def draw(k, mean, logvar):
            return mean + jnp.exp(0.5 * logvar) * jax.random.normal(k, mean.shape) if sample else mean

        z_comp = draw(kc, post.comp_mean, post.comp_logvar)
        z_pos = draw(kp, post.pos_mean, post.pos_logvar)
        z_lat = draw(kl_, post.lat_mean, post.lat_logvar)
        kl = (
            losses.gaussian_kl(post.comp_mean, post.comp_logvar)
            + losses.gaussian_kl(post.pos_mean, post.pos_logvar)
            + losses.gaussian_kl(post.lat_mean, post.lat_logvar)
        )
        k_logits, e_logits = apply(z_comp, method=SyMat.decode_composition)
        cnt_logits = apply(z_comp, batch["elements"], method=SyMat.count_logits)
        lat_pred = apply(z_lat, method=SyMat.decode_lattice)

        clean, noisy, lattice, levels, nl = self._noisy_graph(batch, k_noise)
        sg, slots = self._score_graph(batch, nl)
        pred = per_atom_scores(apply(sg, z_pos, method=SyMat.edge_scores), slots, nl)
        target = jax.vmap(score.score_target)(clean, noisy, lattice, nl)
        target = target / self.score_norm[levels][:, None, None]

        terms = {
            "kl": kl,
            "num_types": losses.class_ce(k_logits, batch["num_types"]),
            "elements": losses.element_set_bce(e_logits, batch["element_multi_hot"]),
            "counts": losses.count_ce(cnt_logits, batch["counts"], batch["element_mask"]),
            "lattice": jnp.mean((lat_pred - batch["lattice_std"][:b]) ** 2, axis=-1),
            "coords": losses.coordinate_score_loss(pred, target, batch["atom_mask"]),
        }
        metrics = {name: losses.masked_mean(v, crystal) for name, v in terms.items()}
        w = c.loss
        total = (
            w.kl * metrics["kl"]
            + w.num_types * metrics["num_types"]
            + w.elements * metrics["elements"]
            + w.counts * metrics["counts"]
            + w.lattice * metrics["lattice"]
            + w.coords * metrics["coords"]
        )
        metrics["loss"] = total
        metrics["graph_overflow"] = jnp.sum(nl.overflow & crystal)
        if not sample:
            metrics.update(self._composition_accuracy(apply, z_comp, k_logits, e_logits, cnt_logits, batch))
        return total, metrics

    def _composition_accuracy(self, apply, z_comp, k_logits, e_logits, cnt_logits, batch) -> dict[str, Array]:
        """Return accuracies of k, the element set, the counts (given true elements) and the whole composition."""
        crystal = batch["crystal_mask"]
        b = z_comp.shape[0]
        k_pred = jnp.argmax(k_logits, axis=-1) + 1
        order = jnp.argsort(-e_logits, axis=-1)
        rank = jnp.argsort(order, axis=-1)
        pred_set = rank < k_pred[:, None]
        true_set = batch["element_multi_hot"] > 0
        m = min(self.config.model.max_atoms, e_logits.shape[-1])
        top = order[:, :m] + 1
        top_counts = jnp.argmax(apply(z_comp, top, method=SyMat.count_logits), axis=-1) + 1
        top_counts = jnp.where(jnp.arange(m)[None] < k_pred[:, None], top_counts, 0)
        rows = jnp.arange(b)[:, None]
        pred_counts = jnp.zeros(e_logits.shape, jnp.int32).at[rows, top - 1].set(top_counts)
        el = jnp.where(batch["element_mask"], batch["elements"] - 1, 0)
        true_counts = jnp.zeros(e_logits.shape, jnp.int32).at[rows, el].add(
            jnp.where(batch["element_mask"], batch["counts"], 0)
        )
        counts_ok = jnp.all(
            (jnp.argmax(cnt_logits, axis=-1) + 1 == batch["counts"]) | ~batch["element_mask"], axis=-1
        )
        acc = {
            "acc_num_types": k_pred == batch["num_types"],
            "acc_elements": jnp.all(pred_set == true_set, axis=-1),
            "acc_counts": counts_ok,
            "acc_composition": jnp.all(pred_counts == true_counts, axis=-1),
        }
        return {k: losses.masked_mean(v.astype(jnp.float32), crystal) for k, v in acc.items()}

    # -- steps ---------------------------------------------------------------

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        """Return the next state and metrics; a non-finite loss or gradient leaves parameters unchanged."""
        self.traces["train_step"] += 1
        key = jax.random.fold_in(state.key, state.step)
        (loss, metrics), grads = jax.value_and_grad(self._losses, has_aux=True)(state.params, batch, key, True)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
        )
        keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old))
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state)
        )
        metrics["skipped"] = (~finite).astype(jnp.int32)
        return new_state, metrics

    def _eval_step(self, params: Any, batch: Batch, key: Array) -> dict[str, Array]:
        """Return metrics of a batch at the posterior means (random noise levels from ``key``)."""
        self.traces["eval_step"] += 1
        _, metrics = self._losses(params, batch, key, False)
        return metrics


def get_trainer(config: TrainConfig, statics: RunStatics) -> Trainer:
    """Return the (cached) trainer of a config, so a resumed run in this process reuses compiled steps."""
    # The schedule does not change the compiled steps: share them across it.
    return _cached_trainer(dataclasses.replace(config, epochs=0), statics)


@functools.lru_cache(maxsize=8)
def _cached_trainer(config: TrainConfig, statics: RunStatics) -> Trainer:
    """Return a new trainer (memoised by :func:`get_trainer`)."""
    return Trainer(config, statics)


# ----------------------------------------------------------------------------
# The loop.


def _subset(data: CrystalDataset, limit: int | None) -> CrystalDataset:
    """Return the first ``limit`` crystals (all when None)."""
    return data if limit is None or limit >= len(data) else data.subset(np.arange(limit))


def compute_statics(config: TrainConfig, train: CrystalDataset, progress: bool = True) -> RunStatics:
    """Return the run statics fit on the training set (score normaliser, image range, standardiser)."""
    m = config.model
    lengths, angles = train.lengths, train.angles
    lattices = np.asarray(geometry.lattice_matrix(lengths, angles))
    images = required_image_range(lattices, m.score_cutoff)
    dense = graphs.dense_batch(train, np.arange(len(train)), m.max_atoms)
    norm = score.estimate_score_norm(
        dense["frac_coords"],
        lattices,
        dense["atom_mask"],
        score.ScoreGraphConfig(m.score_cutoff, m.score_neighbors, images),
        score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max),
        jax.random.PRNGKey(config.seed + 12345),
        progress=progress,
    )
    return RunStatics(tuple(float(x) for x in norm), images, max_elements(train), LatticeStandardizer.fit(train))


def _mean_metrics(rows: list[dict[str, Array]], weights: list[int]) -> dict[str, float]:
    """Return the crystal-weighted mean of per-batch metrics (sums for counters)."""
    out: dict[str, float] = {}
    total = max(sum(weights), 1)
    for name in rows[0]:
        vals = np.array([float(r[name]) for r in rows])
        if name in ("skipped", "graph_overflow"):
            out[name] = float(vals.sum())
        else:
            out[name] = float(np.sum(vals * np.asarray(weights)) / total)
    return out


def evaluate(
    trainer: Trainer, params: Any, data: CrystalDataset, budgets: list[graphs.PadBudget], seed: int
) -> dict[str, float]:
    """Return the metrics of ``data`` at the posterior means (fixed noise draws from ``seed``)."""
    c = trainer.config
    rows, weights = [], []
    order = np.arange(len(data))
    for i, batch in enumerate(
        epoch_batches(data, order, budgets, c.batch_size, c.model.max_atoms, trainer.statics.element_slots,
                      trainer.statics.lattice)
    ):
        rows.append(trainer.eval_step(params, batch, jax.random.fold_in(jax.random.PRNGKey(seed), i)))
        weights.append(int(batch["crystal_mask"].sum()))
    return _mean_metrics(rows, weights)


def train(
    config: TrainConfig,
    workdir: str | pathlib.Path,
    data_root: str | None = None,
    resume: bool = False,
    progress: bool = True,
    datasets: tuple[CrystalDataset, CrystalDataset] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run in ``workdir``; return the last epoch's metrics.

    ``workdir`` gets ``config.json``, ``normalizers.json`` (lattice
    standardiser, score normaliser), ``checkpoints/`` (latest N), ``best/``
    and ``metrics.jsonl``. ``datasets`` (train, val) skips loading from disk.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.json"
    if resume and config_path.exists():
        stored = TrainConfig.from_dict(json.loads(config_path.read_text()))
        if stored != config:
            # Only the schedule may change on resume (e.g. more epochs).
            if dataclasses.replace(stored, epochs=config.epochs) != config:
                raise ValueError(f"{config_path} differs from the requested config; resume with the same settings")
    config_path.write_text(config.to_json())

    if datasets is None:
        train_data = load_split(config.dataset, "train", data_root, progress=progress)
        val_data = load_split(config.dataset, "val", data_root, progress=progress)
    else:
        train_data, val_data = datasets
    train_data = _subset(train_data, config.max_train)
    val_data = _subset(val_data, config.max_val)

    statics_path = workdir / "normalizers.json"
    if statics_path.exists() and resume:
        statics = RunStatics.from_json(statics_path.read_text())
    else:
        statics = compute_statics(config, train_data, progress)
        statics_path.write_text(statics.to_json())
        np.savetxt(workdir / "score_norm.txt", np.asarray(statics.score_norm))

    trainer = get_trainer(config, statics)
    budgets = graphs.pad_budgets(train_data, config.batch_size, config.num_buckets, seed=config.seed)
    val_budgets = graphs.pad_budgets(val_data, config.batch_size, 1)
    first = next(
        epoch_batches(train_data, np.arange(len(train_data)), budgets, config.batch_size, config.model.max_atoms,
                      statics.element_slots, statics.lattice)
    )
    state = trainer.init_state(first, config.seed)
    run = start_run(workdir, config.keep_checkpoints, state, resume, "best_val_loss")
    ckpt, state, start_epoch, best, metrics_path = run.ckpt, run.state, run.start_epoch, run.best, run.metrics_path

    last: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_data))
        rows, weights = [], []
        n_batches = -(-len(train_data) // config.batch_size)
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for batch in epoch_batches(train_data, order, budgets, config.batch_size, config.model.max_atoms,
                                   statics.element_slots, statics.lattice):
            state, m = trainer.train_step(state, batch)
            if int(m["skipped"]):
                log.warning("step %d: non-finite loss or gradient; update skipped, state kept", int(state.step) - 1)
            rows.append(m)
            weights.append(int(batch["crystal_mask"].sum()))
            bar.update(1)
            bar.set_postfix(loss=f"{float(m['loss']):.3f}")
        bar.close()
        train_metrics = _mean_metrics(rows, weights)
        train_time = time.perf_counter() - t0
        val_metrics = evaluate(trainer, state.params, val_data, val_budgets, config.seed + 999)
        is_best = val_metrics["loss"] < best
        best = min(best, val_metrics["loss"])
        record = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_seconds": round(train_time, 3),
            "epoch_seconds": round(time.perf_counter() - t0, 3),
            "train": train_metrics,
            "val": val_metrics,
            # Programs traced so far in this process (one per pad budget at most).
            "compilations": dict(trainer.traces),
        }
        # Checkpoint first, then log: a kill in between repeats a log line at worst.
        ckpt.save(epoch, state, {"epoch": epoch, "best_val_loss": best, "val": val_metrics}, is_best)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val composition match %.3f, val coords %.4f (%.1f s)",
            epoch + 1, train_metrics["loss"], val_metrics["loss"], val_metrics["acc_composition"],
            val_metrics["coords"], record["epoch_seconds"],
        )
        last = record
    ckpt.close()
    return last

