"""Training SyMat: the jitted train/eval steps (one loss, SPEC 2/3) and the resumable, checkpointed run.

Batches come from :mod:`symat_jax.input_pipeline`; the score of noisy
coordinates and the composition decoder are :mod:`symat_jax.model`'s, the
same functions the sampler calls; the run folder, statics and train state are
:mod:`symat_jax.run`'s; the epoch loop is :mod:`symat_jax.loop`'s.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from symat_jax import assignment, geometry, graphs, latents, losses, loop, run, score
from symat_jax.checkpoints import start_run
from symat_jax.configs import SCORE_LATENTS, TARGET_MATCHINGS, TrainConfig
from symat_jax.files import check_folder_path, write_text_atomic
from symat_jax.data import CrystalDataset, load_split
from symat_jax.input_pipeline import PadBudget, dense_batch, epoch_batches, lattice_features, max_elements, pad_budgets
from symat_jax.model import SyMat, coordinate_scores, decode_composition, score_graphs
from symat_jax.neighbors import required_image_range
from symat_jax.run import LatticeStandardizer, RunStatics, TrainState

log = logging.getLogger(__name__)
Array = jax.Array
Batch = dict[str, Any]

# Counters among the step metrics: summed over an epoch, not averaged.
COUNTERS = ("skipped", "graph_overflow")


class Trainer:
    """The model, optimiser and jitted steps of one configuration."""

    def __init__(self, config: TrainConfig, statics: RunStatics, total_steps: int = 1) -> None:
        """Build the model and optimiser (Adam with gradient clipping by value; ``total_steps`` for a decaying rate)."""
        if config.target_matching not in TARGET_MATCHINGS:
            raise ValueError(f"target_matching must be one of {TARGET_MATCHINGS}, got {config.target_matching!r}")
        if config.score_latent not in SCORE_LATENTS:
            raise ValueError(f"score_latent must be one of {SCORE_LATENTS}, got {config.score_latent!r}")
        self.config = config
        self.statics = statics
        self.model = SyMat(config.model)
        self.tx = optax.chain(optax.clip(config.clip_value), optax.adam(learning_rate(config, total_steps)))
        m = config.model
        self.sigmas = jnp.asarray(score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max), jnp.float32)
        self.level_logits = jnp.log(score.level_probabilities(np.asarray(self.sigmas), config.focus_sigma))
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
        key = run.stream_key(seed, "steps")
        enc = graphs.encoder_edge_graph(batch["enc"])
        b = batch["crystal_mask"].shape[0]
        _, noisy, lattice, _ = self._noisy_positions(batch, key)
        sg, _, _ = score_graphs(noisy, lattice, jnp.asarray(batch["atomic_numbers"]), jnp.asarray(batch["atom_mask"]),
                                graph_config=self.graph_config, num_nodes=self._num_nodes(batch))
        params = self.model.init(run.stream_key(seed, "params"), enc, jnp.asarray(batch["lattice_std"]), b + 1, sg, b)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), key=key,
                          ema_params=jax.tree_util.tree_map(jnp.copy, params),  # own buffers: steps donate both
                          lr_scale=jnp.ones((), jnp.float32))

    # -- forward -------------------------------------------------------------

    @staticmethod
    def _num_nodes(batch: Batch) -> int:
        """Return the batch's node budget: its score graph packs real atoms into as many nodes as its encoder graph."""
        return batch["enc"].nodes["atomic_numbers"].shape[0]

    def _noisy_positions(self, batch: Batch, key: Array) -> tuple[Array, Array, Array, Array]:
        """Return ``(clean, noisy, lattice, levels)`` of the batch at random noise levels."""
        k_lvl, k_eps = jax.random.split(key)
        lattice = geometry.lattice_matrix(batch["lengths"], batch["angles"])
        clean = geometry.frac_to_cart(batch["frac_coords"], lattice)
        mask = batch["atom_mask"]
        if self.config.focus_sigma is None:
            levels = jax.random.randint(k_lvl, (clean.shape[0],), 0, self.sigmas.shape[0])
        else:
            levels = jax.random.categorical(k_lvl, self.level_logits, shape=(clean.shape[0],))
        eps = jax.random.normal(k_eps, clean.shape)
        noisy = jax.vmap(score.perturb)(clean, lattice, mask, self.sigmas[levels], eps)
        if self.config.target_matching == "assignment":
            clean = assignment.matched_clean(clean, noisy, lattice, mask, jnp.asarray(batch["atomic_numbers"]))
        return clean, noisy, lattice, levels

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

        clean, noisy, lattice, levels = self._noisy_positions(batch, k_noise)
        pred, nl = coordinate_scores(
            params, c.model, noisy, lattice, jnp.asarray(batch["atomic_numbers"]), jnp.asarray(batch["atom_mask"]),
            post.pos_mean if c.score_latent == "mean" else z_pos, graph_config=self.graph_config,
            num_nodes=self._num_nodes(batch),
        )
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
            metrics.update(self._composition_accuracy(params, z_comp, cnt_logits, batch))
        return total, metrics

    def _composition_accuracy(self, params: Any, z_comp: Array, cnt_logits: Array, batch: Batch) -> dict[str, Array]:
        """Return accuracies of k, the element set, the counts (given true elements) and the whole composition."""
        crystal = batch["crystal_mask"]
        b = z_comp.shape[0]
        comp = decode_composition(params, self.config.model, z_comp)
        rows = jnp.arange(b)[:, None]
        pred_counts = jnp.zeros((b, batch["element_multi_hot"].shape[-1]), jnp.int32).at[rows, comp.elements - 1].set(
            comp.counts)
        el = jnp.where(batch["element_mask"], batch["elements"] - 1, 0)
        true_counts = jnp.zeros(pred_counts.shape, jnp.int32).at[rows, el].add(
            jnp.where(batch["element_mask"], batch["counts"], 0)
        )
        counts_ok = jnp.all(
            (jnp.argmax(cnt_logits, axis=-1) + 1 == batch["counts"]) | ~batch["element_mask"], axis=-1
        )
        acc = {
            "acc_num_types": comp.num_types == batch["num_types"],
            "acc_elements": jnp.all((pred_counts > 0) == (batch["element_multi_hot"] > 0), axis=-1),
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
        updates = jax.tree_util.tree_map(lambda u: u * state.lr_scale, updates)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
        )
        keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old))
        params = keep(params, state.params)
        decay = self.config.ema_decay
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=keep(opt_state, state.opt_state), ema_params=ema
        )
        metrics["skipped"] = (~finite).astype(jnp.int32)
        return new_state, metrics

    def _eval_step(self, params: Any, batch: Batch, key: Array) -> dict[str, Array]:
        """Return metrics of a batch at the posterior means (random noise levels from ``key``)."""
        self.traces["eval_step"] += 1
        _, metrics = self._losses(params, batch, key, False)
        return metrics

    def batches(self, data: CrystalDataset, order: np.ndarray, budgets: list[PadBudget]):
        """Yield ``(batch, real crystals in it)`` of one pass over ``data`` in ``order``."""
        c = self.config
        for batch in epoch_batches(data, order, budgets, c.batch_size, c.model.max_atoms, self.statics.element_slots,
                                   self.statics.lattice):
            yield batch, int(batch["crystal_mask"].sum())


def learning_rate(config: TrainConfig, total_steps: int) -> float | optax.Schedule:
    """Return the optimiser's learning rate: constant (SPEC 2), or a cosine decay over ``total_steps``."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1), alpha=config.lr_floor)
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")


def divergence_guard(config: TrainConfig) -> loop.DivergenceGuard | None:
    """Return the run's divergence guard (None when ``config.divergence_factor`` is None)."""
    if config.divergence_factor is None:
        return None
    return loop.DivergenceGuard(factor=config.divergence_factor, retries=config.divergence_retries)


def get_trainer(config: TrainConfig, statics: RunStatics, steps_per_epoch: int = 1) -> Trainer:
    """Return the (cached) trainer of a config, so a resumed run in this process reuses compiled steps."""
    if config.lr_schedule == "constant":
        # The number of epochs does not change the compiled steps then: share them across it.
        return _cached_trainer(dataclasses.replace(config, epochs=0), statics, 1)
    return _cached_trainer(config, statics, config.epochs * steps_per_epoch)


@functools.lru_cache(maxsize=8)
def _cached_trainer(config: TrainConfig, statics: RunStatics, total_steps: int) -> Trainer:
    """Return a new trainer (memoised by :func:`get_trainer`)."""
    return Trainer(config, statics, total_steps)


# ----------------------------------------------------------------------------
# The run.


def _subset(data: CrystalDataset, limit: int | None) -> CrystalDataset:
    """Return the first ``limit`` crystals (all when None)."""
    return data if limit is None or limit >= len(data) else data.subset(np.arange(limit))


def compute_statics(config: TrainConfig, train: CrystalDataset, progress: bool = True) -> RunStatics:
    """Return the run statics fit on the training set (score normaliser, image range, standardiser)."""
    m = config.model
    lengths, angles = train.lengths, train.angles
    lattices = np.asarray(geometry.lattice_matrix(lengths, angles))
    images = required_image_range(lattices, m.score_cutoff)
    dense = dense_batch(train, np.arange(len(train)), m.max_atoms)
    norm = score.estimate_score_norm(
        dense["frac_coords"],
        lattices,
        dense["atom_mask"],
        score.ScoreGraphConfig(m.score_cutoff, m.score_neighbors, images),
        score.noise_levels(m.num_levels, m.sigma_min, m.sigma_max),
        run.stream_key(config.seed, "score_norm"),
        progress=progress,
        numbers=dense["atomic_numbers"] if config.target_matching == "assignment" else None,
    )
    return RunStatics(tuple(float(x) for x in norm), images, max_elements(train),
                      LatticeStandardizer.fit(lattice_features(train)), config.dataset)


def evaluate(trainer: Trainer, params: Any, data: CrystalDataset, budgets: list[PadBudget], seed: int) -> dict[str, float]:
    """Return the metrics of ``data`` at the posterior means (fixed noise draws: the run's validation stream)."""
    rows, weights = [], []
    for i, (batch, weight) in enumerate(trainer.batches(data, np.arange(len(data)), budgets)):
        rows.append(trainer.eval_step(params, batch, jax.random.fold_in(run.stream_key(seed, "validation"), i)))
        weights.append(weight)
    return loop.weighted_means(rows, weights, COUNTERS)


def train(
    config: TrainConfig,
    workdir: str | pathlib.Path,
    data_root: str | None = None,
    resume: bool = False,
    progress: bool = True,
    datasets: tuple[CrystalDataset, CrystalDataset] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run in ``workdir`` (layout: :mod:`symat_jax.run`); return the last epoch's metrics.

    ``datasets`` (train, val) skips loading from disk.
    """
    workdir = check_folder_path(workdir, "--workdir")
    config_path = workdir / run.CONFIG_FILE
    # Every refusal and every input comes before the first write: a refused or failed command leaves the folder
    # as it was (and creates none).
    if not resume and run.holds_run(workdir):
        raise ValueError(f"{workdir} already holds a run; pass --resume to continue it, or choose another workdir")
    run.check_training_folder(workdir, run.CONFIG_FILE)
    if resume and config_path.exists():
        stored = run.read_config(workdir)
        if stored != config:
            # Only the schedule (e.g. more epochs), the EMA decay (it does not change training) and the divergence
            # guard (it changes nothing in a healthy run) may change.
            free = dict(epochs=config.epochs, ema_decay=config.ema_decay, divergence_factor=config.divergence_factor,
                        divergence_retries=config.divergence_retries, keep_epochs=config.keep_epochs)
            if dataclasses.replace(stored, **free) != config:
                raise ValueError(f"{config_path} differs from the requested config; resume with the same settings")
    if resume and not run.holds_run(workdir):
        log.warning("%s holds no checkpoint to resume; starting a new run there", workdir)

    if datasets is None:
        train_data = load_split(config.dataset, "train", data_root, progress=progress)
        val_data = load_split(config.dataset, "val", data_root, progress=progress)
    else:
        train_data, val_data = datasets
    workdir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path, config.to_json())
    train_data = _subset(train_data, config.max_train)
    val_data = _subset(val_data, config.max_val)

    if (workdir / run.STATICS_FILE).exists() and resume:
        statics = run.read_statics(workdir)
    else:
        statics = compute_statics(config, train_data, progress)
        run.write_statics(workdir, statics)

    steps_per_epoch = -(-len(train_data) // config.batch_size)
    trainer = get_trainer(config, statics, steps_per_epoch)
    budgets = pad_budgets(train_data, config.batch_size, config.num_buckets, seed=config.seed)
    val_budgets = pad_budgets(val_data, config.batch_size, 1)
    first, _ = next(trainer.batches(train_data, np.arange(len(train_data)), budgets))
    state = trainer.init_state(first, config.seed)
    start = start_run(workdir, config.keep_checkpoints, state, resume, "best_val_loss", config.keep_epochs)

    def end_epoch(state: TrainState, rows: list, weights: list[int], t0: float):
        train_metrics = loop.weighted_means(rows, weights, COUNTERS, skipped="skipped")
        train_time = time.perf_counter() - t0
        if train_metrics["skipped"]:
            log.warning("%d steps had a non-finite loss or gradient; their updates were skipped, the state kept",
                        int(train_metrics["skipped"]))
        val_metrics = evaluate(trainer, state.params, val_data, val_budgets, config.seed)
        ema = {}
        if config.ema_decay > 0:
            ema["val_ema"] = evaluate(trainer, state.ema_params, val_data, val_budgets, config.seed)
        seconds = round(time.perf_counter() - t0, 3)
        record = {
            "step": int(state.step),
            "train_seconds": round(train_time, 3),
            "epoch_seconds": seconds,
            "train": train_metrics,
            "val": val_metrics,
            **ema,
            # Programs traced so far in this process (one per pad budget at most).
            "compilations": dict(trainer.traces),
        }
        message = (f"train loss {train_metrics['loss']:.4f}, val loss {val_metrics['loss']:.4f}, val composition "
                   f"match {val_metrics['acc_composition']:.3f}, val coords {val_metrics['coords']:.4f} ({seconds:.1f} s)")
        return val_metrics["loss"], record, {"val": val_metrics}, message

    _, last, _ = loop.run_epochs(
        start, epochs=config.epochs, seed=config.seed, num_examples=len(train_data),
        steps_per_epoch=steps_per_epoch,
        batches=lambda order: trainer.batches(train_data, order, budgets), train_step=trainer.train_step,
        end_epoch=end_epoch, best_key="best_val_loss", desc="epoch", progress=progress,
        guard=divergence_guard(config),
    )
    # The trained run is complete without it: a failed fit leaves every checkpoint in place.
    try:
        latents.fit_prior(workdir, checkpoint="latest", datasets=(train_data, val_data), progress=progress)
    except Exception as err:  # noqa: BLE001  (sklearn and linear algebra raise several types)
        log.warning("could not fit the latent prior (%s); fit it later with `symat fit-prior --workdir %s`", err, workdir)
    return last
