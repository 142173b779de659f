"""Configs as data: every preset of the project (model, training, sampler, property model) per dataset.

* :func:`get_config` -> :class:`TrainConfig` (with its :class:`ModelConfig`):
  ``paper`` (SPEC 2/3) and ``quick`` (a few CPU minutes);
* :func:`get_sampler_preset` -> :class:`SamplerPreset` (one config per sampler stage): ``paper`` (SPEC 4),
  ``default`` (the best measured);
* :func:`get_property_config` -> :class:`PropertyConfig`: ``default``, ``quick``.

Configs are frozen dataclasses, hashable, so jitted code takes them as static
arguments; runs store them as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from symat_jax.networks import SphereNetConfig

def _dataset_info(dataset: str) -> Any:
    """Return the registry's entry of ``dataset`` (ValueError for an unknown one)."""
    # The dataset table belongs to the data layer: the model and the sampler import these configs without it.
    from symat_jax.data import registry

    return registry.get_info(dataset)


PRESETS = ("paper", "quick")
SAMPLER_PRESETS = ("paper", "default")
DEFAULT_SAMPLER_PRESET = "default"
PROPERTY_PRESETS = ("default", "quick")
# Epochs of the paper setting (SPEC 2).
PAPER_EPOCHS = {"carbon_24": 150, "perov_5": 700, "mp_20": 300}
# SPEC 4 temperatures (comp, pos, lattice, coordinate noise) per dataset.
PAPER_TEMPERATURES = {
    "carbon_24": (1.0, 0.7, 1.0, 0.01),
    "perov_5": (1.0, 1.0, 0.01, 0.01),
    "mp_20": (0.2, 0.7, 0.7, 0.01),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model settings (SPEC 2 and 3)."""

    max_atoms: int
    latent_comp: int = 128
    latent_pos: int = 128
    latent_lat: int = 128
    decoder_hidden: int = 256
    encoder: SphereNetConfig = SphereNetConfig()
    score_net: SphereNetConfig = SphereNetConfig(
        out_channels=0, envelope_exponent=None, use_angles=False, graph_output=False
    )
    score_cutoff: float = 3.0  # A, the score graph's cut-off (the network's basis uses score_net.cutoff)
    score_neighbors: int = 5
    num_levels: int = 50
    sigma_min: float = 0.01
    sigma_max: float = 10.0
    # Atom embedding init: "flax" (variance 1 / features) or "unit_uniform" (the reference's, SPEC 3), whose latent
    # means saturated in epoch 1 (composition match 56.5% at epoch 150 vs 87%: README, Training).
    embed_init: str = "flax"
    # Where the score network sees z_pos: "head" (the edge head, SPEC 3) or also "nodes" (every atom's embedding);
    # neither makes the chain use the latent (docs/quality-history.md, "Where the chain loses the crystal").
    score_condition: str = "head"


SCORE_CONDITIONS = ("head", "nodes")
# Which clean atom a noisy atom's score target points to, and which z_pos the score network sees in training
# (TrainConfig.target_matching, TrainConfig.score_latent).
TARGET_MATCHINGS = ("none", "assignment")
SCORE_LATENTS = ("sample", "mean")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (SPEC 2)."""

    kl: float = 0.01
    num_types: float = 1.0
    elements: float = 30.0
    counts: float = 1.0
    lattice: float = 10.0
    coords: float = 10.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: dataset, model, optimiser, schedule."""

    dataset: str
    model: ModelConfig
    loss: LossWeights = LossWeights()
    batch_size: int = 256
    learning_rate: float = 1e-3
    # "constant" (SPEC 2) or "cosine" down to lr_floor * learning_rate over the run: cosine lowered the validation
    # loss but its samples had fewer 3-4-fold atoms (36 vs 59%: docs/quality-history.md, "Batch 32").
    lr_schedule: str = "constant"
    lr_floor: float = 0.01
    clip_value: float = 0.5
    epochs: int = 150
    seed: int = 0
    num_buckets: int = 3  # pad budgets of encoder batches (compilations per epoch)
    keep_checkpoints: int = 3
    # Epochs kept for good (in kept/, beside the latest N) because a sampler preset samples them (preset_epochs).
    keep_epochs: tuple[int, ...] = ()
    max_train: int | None = None  # use only the first N training crystals (quick runs)
    max_val: int | None = None
    # Decay of the parameters' moving average kept beside them (0: none; spans ~1 / (1 - decay) steps); presets
    # sample raw or averaged weights (SamplerPreset.weights; docs/quality-history.md, "Weight EMA").
    ema_decay: float = 0.99
    # Levels with sigma above s drawn with probability ~ s / sigma (None: uniformly, SPEC 3): fewer steps where the
    # noise has erased the crystal; 1 A raised 3-4-fold atoms 40 -> 49% (docs/quality-history.md, "Level focus").
    focus_sigma: float | None = 1.0
    # A noisy atom's target: the atom it came from ("none", SPEC 3) or its partner in an optimal same-element
    # assignment; a run trained on it recovered no better (docs/quality-history.md, "The target ... is right").
    target_matching: str = "none"
    # The z_pos the score network sees in training: a posterior draw ("sample", SPEC 2) or the mean (what the fitted
    # prior hands the sampler); the mean widened the own-vs-other latent gap a little (docs/quality-history.md).
    score_latent: str = "sample"
    # Divergence guard (loop.DivergenceGuard): an epoch above this many times its recent median loss is rerun at
    # half the rate (None: off); 3 of 4 batch-32 Carbon-24 runs blew up without it (docs/quality-history.md).
    divergence_factor: float | None = 3.0
    divergence_retries: int = 3

    def to_json(self) -> str:
        """Return the config as JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Return the config stored by :meth:`to_json` (parsed)."""
        # Runs written before these fields existed kept no EMA and drew levels uniformly.
        d = {"ema_decay": 0.0, "focus_sigma": None, **d}
        d["keep_epochs"] = tuple(d.get("keep_epochs", ()))
        model = dict(d["model"])
        model["encoder"] = SphereNetConfig(**model["encoder"])
        model["score_net"] = SphereNetConfig(**model["score_net"])
        return cls(**{**d, "model": ModelConfig(**model), "loss": LossWeights(**d["loss"])})


# The paper preset's measured departures from SPEC 2: on our 1,632 Carbon-24 training crystals batch 32 makes 51
# optimiser steps per epoch (batch 256: 7), and its epoch-80 state samples best (README, Training;
# docs/quality-history.md, "Batch 32"). `--batch-size 256 --epochs 150 --ema-decay 0.99` restores SPEC 2.
TRAINING_DEPARTURES: dict[str, dict[str, Any]] = {
    "carbon_24": dict(batch_size=32, epochs=80, ema_decay=0.999),
}


def get_config(dataset: str, preset: str = "paper", **overrides: Any) -> TrainConfig:
    """Return the training config of ``dataset`` for a preset; ``overrides`` replace top-level fields."""
    info = _dataset_info(dataset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    model = ModelConfig(max_atoms=info.max_atoms, score_cutoff=info.score_cutoff, score_neighbors=info.max_neighbors)
    config = TrainConfig(dataset=dataset, model=model, epochs=PAPER_EPOCHS[dataset])
    if preset == "paper":
        # The epochs a sampler preset samples (the Carbon-24 retry's epoch 40) are kept for good.
        config = dataclasses.replace(config, **TRAINING_DEPARTURES.get(dataset, {}), keep_epochs=preset_epochs(dataset))
    if preset == "quick":
        # A few minutes on a laptop CPU: small networks, a subset, few epochs.
        small = dict(num_layers=2, hidden=32, out_channels=64, int_emb=16, out_emb=64, num_output_layers=1)
        model = dataclasses.replace(
            model,
            latent_comp=32,
            latent_pos=32,
            latent_lat=32,
            decoder_hidden=64,
            encoder=SphereNetConfig(**small),
            score_net=SphereNetConfig(
                **{**small, "out_channels": 0}, envelope_exponent=None, use_angles=False, graph_output=False
            ),
        )
        config = dataclasses.replace(config, model=model, batch_size=64, epochs=5, max_train=512, max_val=128)
    return dataclasses.replace(config, **overrides)


# ----------------------------------------------------------------------------
# Sampler presets: one config per stage (symat_jax.sampling), gathered in a SamplerPreset.


@dataclasses.dataclass(frozen=True)
class StandardPrior:
    """Latents from ``N(0, T^2 I)`` with one temperature per latent block (SPEC 4)."""

    temp_comp: float = 1.0
    temp_pos: float = 0.7
    temp_lat: float = 1.0


@dataclasses.dataclass(frozen=True)
class FittedPrior:
    """Latents from the density fitted to the training latents (the run's ``prior.npz``), each component spread by ``temperature``."""

    temperature: float = 1.0


PriorConfig = StandardPrior | FittedPrior
PRIOR_CONFIGS: dict[str, type] = {"standard": StandardPrior, "fitted": FittedPrior}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How a composition is read off the decoders.

    ``sample_temperature``: None takes each argmax (SPEC 4); a number draws k
    and the counts from the predicted distributions at that temperature.
    ``fit_counts``: the most likely counts whose total fits ``max_atoms``
    (``model.fit_counts``), not each count's argmax, whose sum can pass the
    padding and get the cell rejected.
    """

    sample_temperature: float | None = None
    fit_counts: bool = False

    def __post_init__(self) -> None:
        if self.sample_temperature is not None and not self.sample_temperature > 0:
            raise ValueError(f"sample_temperature must be None (argmax) or positive, got {self.sample_temperature!r}")


STEP_SCHEDULES = ("paper", "norm")
NOISE_SCHEDULES = ("constant", "sigma")


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    """The compiled annealed-Langevin chain (its jit cache key, with the model and the run's statics).

    ``num_levels`` levels spread over the trained ones, high to low noise,
    ``steps_per_level`` steps each. Step size ``alpha_t``: ``"paper"``
    ``step_scale (sigma_t / sigma_1)^2`` (SPEC 4), ``"norm"``
    ``step_scale norm(sigma_t)^2`` (the same share of the predicted target at
    every level; ``sampling.schedule``). Noise: ``"constant"`` ``temp_coord``
    (SPEC 4) or ``"sigma"`` ``temp_coord sigma_t / norm(sigma_t)``.
    ``band = (low, high, steps)``: levels with sigma in ``[low, high]`` A run
    ``steps`` steps (the chain's time where bonds form). ``final_denoise``:
    end with ``x + final_denoise * norm(sigma_1) s(x)`` (``sampling.chain.denoise``).
    """

    num_levels: int = 50
    steps_per_level: int = 100
    step_schedule: str = "paper"
    step_scale: float = 1e-4
    noise_schedule: str = "constant"
    temp_coord: float = 0.01
    band: tuple[float, float, int] | None = None
    final_denoise: float | None = None

    def __post_init__(self) -> None:
        if self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"step_schedule must be one of {STEP_SCHEDULES}, got {self.step_schedule!r}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if self.num_levels < 1 or self.steps_per_level < 1:
            raise ValueError(f"num_levels and steps_per_level must be at least 1, got {self.num_levels}, "
                             f"{self.steps_per_level}")
        if not self.step_scale > 0 or not self.temp_coord >= 0:
            raise ValueError(f"step_scale must be positive and temp_coord >= 0, got {self.step_scale}, {self.temp_coord}")
        if self.band is not None:
            if len(self.band) != 3:
                raise ValueError(f"band must be (low sigma, high sigma, steps), got {self.band!r}")
            lo, hi, steps = float(self.band[0]), float(self.band[1]), int(self.band[2])
            if not 0 < lo <= hi or steps < 1 or steps != self.band[2]:
                raise ValueError(f"band must be 0 < low <= high sigma (A) with steps >= 1, got {self.band!r}")
            object.__setattr__(self, "band", (lo, hi, steps))  # a tuple whatever the caller passed: a cache key
        if self.final_denoise is not None and not self.final_denoise > 0:
            raise ValueError(f"final_denoise must be None or a positive scale, got {self.final_denoise!r}")


@dataclasses.dataclass(frozen=True)
class CoordinationRule:
    """The carbon bonding rule the retry, the relaxation guard and the hops share: ``low`` to ``high`` neighbours within ``cutoff`` A."""

    low: int = 3
    high: int = 4
    cutoff: float = 1.8

    def __post_init__(self) -> None:
        if not 0 <= int(self.low) <= int(self.high) or not self.cutoff > 0:
            raise ValueError(f"a coordination rule needs 0 <= low <= high and cutoff > 0, got {self}")
        object.__setattr__(self, "low", int(self.low))
        object.__setattr__(self, "high", int(self.high))
        object.__setattr__(self, "cutoff", float(self.cutoff))


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """A second chain for the crystals the first left with an atom outside ``rule``; kept where more atoms are in range.

    Same latent, same cell, new noise; the score network of the run's kept
    epoch ``checkpoint`` (None: the sampling network).
    """

    rule: CoordinationRule = CoordinationRule()
    checkpoint: str | None = None


# Basin hopping's threshold (eV/atom): 95% of 300 Carbon-24 training crystals relax (fixed cell, Tersoff) below it
# (median -6.92, 99% -6.29); half the generated crystals relax above it (BENCHMARKS.md, basin hopping).
HOP_ABOVE = -6.37


@dataclasses.dataclass(frozen=True)
class RelaxConfig:
    """FIRE relaxation in Tersoff's carbon potential (``symat_jax.relax``).

    ``steps`` at most, converged below ``fmax`` eV/A; ``cell``: ``"fixed"``
    keeps each lattice, ``"free"`` relaxes it too at ``pressure`` GPa
    (Carbon-24 was relaxed at 10 GPa); ``max_step`` (A) caps any atom's move
    per step. ``guard``: a relaxed crystal replaces the sampled one only where
    no fewer atoms satisfy the rule (None: every trusted relaxation is kept).
    """

    steps: int = 1000
    fmax: float = 0.01
    cell: str = "fixed"
    pressure: float = 0.0
    max_step: float = 0.1
    max_neighbors: int = 16
    guard: CoordinationRule | None = None

    def __post_init__(self) -> None:
        if self.cell not in ("fixed", "free"):
            raise ValueError(f"cell must be 'fixed' or 'free', got {self.cell!r}")
        if self.steps < 1 or not self.fmax > 0 or not self.max_step > 0 or self.max_neighbors < 1:
            raise ValueError(f"steps, fmax, max_step and max_neighbors must be positive, got {self}")
        if not math.isfinite(self.pressure):
            raise ValueError(f"pressure must be finite, got {self.pressure}")
        if self.cell == "fixed" and self.pressure != 0:
            raise ValueError("a pressure acts only on a free cell: use cell='free' with it")


@dataclasses.dataclass(frozen=True)
class HopConfig:
    """Basin hopping after the relaxation (how AIRSS-style searches find low-energy carbon).

    ``rounds`` times, each crystal whose relaxed energy per atom lies above
    ``above`` eV has every atom moved by Gaussian noise of ``sigma`` A and is
    relaxed again (the preset's ``RelaxConfig`` without its guard); the new
    crystal is kept where its energy is lower and, with ``guard``, no fewer
    atoms satisfy the rule. The sample seed draws the displacements.
    """

    rounds: int = 6
    sigma: float = 0.3
    above: float = HOP_ABOVE
    guard: CoordinationRule | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or not self.sigma > 0 or not math.isfinite(self.above):
            raise ValueError(f"hops need rounds >= 1, sigma > 0 and a finite threshold, got {self}")


StageConfig = ChainConfig | RetryConfig | RelaxConfig | HopConfig
CHECKPOINT_WEIGHTS = ("raw", "ema")


@dataclasses.dataclass(frozen=True)
class SamplerPreset:
    """A sampler: the checkpoint and weights it samples, its prior and decoding, then its stages in order.

    ``stages`` starts with the :class:`ChainConfig`; a :class:`RetryConfig`,
    :class:`RelaxConfig` or :class:`HopConfig` may follow (a hop needs a
    relaxation before it). ``checkpoint``: ``best``, ``latest`` or a kept
    epoch; ``weights``: ``raw`` (trained) or ``ema`` (their moving average).
    """

    name: str
    checkpoint: str
    weights: str
    prior: PriorConfig
    decode: DecodeConfig
    stages: tuple[StageConfig, ...]

    def __post_init__(self) -> None:
        if self.weights not in CHECKPOINT_WEIGHTS:
            raise ValueError(f"weights must be one of {CHECKPOINT_WEIGHTS}, got {self.weights!r}")
        if not self.stages or not isinstance(self.stages[0], ChainConfig):
            raise ValueError("a sampler preset's first stage is its chain (a ChainConfig)")
        object.__setattr__(self, "stages", tuple(self.stages))
        kinds = [type(s) for s in self.stages]
        if kinds.count(ChainConfig) != 1 or len(set(kinds)) != len(kinds):
            raise ValueError(f"a sampler preset holds one chain and each other stage at most once, got "
                             f"{[k.__name__ for k in kinds]}")
        if HopConfig in kinds and (RelaxConfig not in kinds or kinds.index(HopConfig) < kinds.index(RelaxConfig)):
            raise ValueError("basin hopping (HopConfig) needs a relaxation (RelaxConfig) before it")

    @property
    def chain(self) -> ChainConfig:
        """Return the chain's config."""
        return self.stages[0]

    def stage(self, kind: type) -> Any:
        """Return this preset's config of stage ``kind`` (e.g. :class:`RelaxConfig`), or None without that stage."""
        return next((s for s in self.stages if isinstance(s, kind)), None)

    def replace_stage(self, config: StageConfig) -> "SamplerPreset":
        """Return this preset with ``config`` in place of its stage of that kind (appended where it has none)."""
        kind = type(config)
        if self.stage(kind) is None:
            return dataclasses.replace(self, stages=self.stages + (config,))
        return dataclasses.replace(self, stages=tuple(config if isinstance(s, kind) else s for s in self.stages))

    def without(self, kind: type) -> "SamplerPreset":
        """Return this preset without its stage of ``kind`` (and without the hops when the relaxation goes)."""
        drop = (kind, HopConfig) if kind is RelaxConfig else (kind,)
        return dataclasses.replace(self, stages=tuple(s for s in self.stages if not isinstance(s, drop)))

    def to_dict(self) -> dict[str, Any]:
        """Return the preset as JSON-ready data (each stage under its config's name)."""
        return {"name": self.name, "checkpoint": self.checkpoint, "weights": self.weights,
                "prior": {"kind": PRIOR_NAMES[type(self.prior)], **dataclasses.asdict(self.prior)},
                "decode": dataclasses.asdict(self.decode),
                "stages": [{"stage": type(s).__name__, **dataclasses.asdict(s)} for s in self.stages]}


PRIOR_NAMES = {cls: name for name, cls in PRIOR_CONFIGS.items()}


def _paper_preset(dataset: str) -> SamplerPreset:
    """Return SPEC 4 exactly: N(0, T^2 I) latents at the paper temperatures, argmax decoding, 50 x 100 steps of 1e-4."""
    tc, tp, tl, tx = PAPER_TEMPERATURES[dataset]
    return SamplerPreset("paper", "best", "raw", StandardPrior(tc, tp, tl), DecodeConfig(),
                         (ChainConfig(temp_coord=tx),))


def _default_preset(dataset: str) -> SamplerPreset:
    """Return the best setting measured here (BENCHMARKS.md, current results).

    The EMA weights of the latest checkpoint (on the 150-epoch Carbon-24 run
    they raised 3-4-fold atoms from 27% to 40%); the fitted prior; counts that
    fit; 25 levels x 10 steps at 0.05 of the target with noise at unit
    temperature, but the 5 levels with sigma in 0.03-0.1 A run 1,000 steps each
    (5,200 steps, the paper's cost: 3-4-fold atoms 58 -> 84%), then a denoising
    step at 0.35 (``experiments/recovery.py``).
    """
    chain = ChainConfig(num_levels=25, steps_per_level=10, step_schedule="norm", step_scale=0.05,
                        noise_schedule="sigma", temp_coord=1.0, band=(0.03, 0.1, 1000), final_denoise=0.35)
    return SamplerPreset("default", "latest", "ema", FittedPrior(), DecodeConfig(fit_counts=True),
                         (chain, *DEFAULT_STAGES_BY_DATASET.get(dataset, ())))


# Carbon-24's stages after the chain (BENCHMARKS.md, current results and their history in docs/quality-history.md):
# the retry with epoch 40's score network (3-4-fold atoms 65 -> 99%), a fixed-cell Tersoff relaxation without the
# guard (guarded, 108 of 256 relaxations were undone and never hop), then 6 rounds of basin hopping.
DEFAULT_STAGES_BY_DATASET: dict[str, tuple[StageConfig, ...]] = {
    "carbon_24": (RetryConfig(CoordinationRule(3, 4, 1.8), checkpoint="40"), RelaxConfig(cell="fixed"),
                  HopConfig(rounds=6))}
SAMPLER_PRESET_BUILDERS = {"paper": _paper_preset, "default": _default_preset}


def get_sampler_preset(dataset: str, preset: str = "paper") -> SamplerPreset:
    """Return the sampler preset ``preset`` (``paper``: SPEC 4; ``default``: the best measured) of ``dataset``."""
    _dataset_info(dataset)
    if preset not in SAMPLER_PRESET_BUILDERS:
        raise ValueError(f"unknown sampler preset {preset!r}; known: {', '.join(SAMPLER_PRESET_BUILDERS)}")
    return SAMPLER_PRESET_BUILDERS[preset](dataset)


def preset_epochs(dataset: str) -> tuple[int, ...]:
    """Return the epochs whose checkpoints a run of ``dataset`` keeps because one of its sampler presets samples them."""
    epochs = set()
    for name in SAMPLER_PRESET_BUILDERS:
        preset = get_sampler_preset(dataset, name)
        retry = preset.stage(RetryConfig)
        for ckpt in (preset.checkpoint, retry.checkpoint if retry else None):
            if ckpt is not None and ckpt.isdigit():
                epochs.add(int(ckpt))
    return tuple(sorted(epochs))

@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """A property head on the latents (``symat fit-head``): an MLP on ``[z_comp, z_pos, z_lat]`` fitted to the
    training crystals' posterior means, the best validation epoch kept."""

    hidden: int = 256
    layers: int = 3
    epochs: int = 400
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        """Check the sizes."""
        for name in ("hidden", "layers", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """Gradient steps on the latents (``symat optimize``, SPEC 6): Adam for ``steps`` steps, ``z`` saved every ``every``
    (CDVAE's defaults: 5,000 steps at 1e-3, decoded every 500)."""

    steps: int = 5000
    learning_rate: float = 1e-3
    every: int = 500

    def __post_init__(self) -> None:
        """Check that the saves divide the steps."""
        if self.steps < 1 or self.every < 1 or self.steps % self.every:
            raise ValueError(f"steps ({self.steps}) must be a positive multiple of every ({self.every})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    @property
    def saved_steps(self) -> tuple[int, ...]:
        """Return the steps whose ``z`` is saved: the start (0), then every ``every`` steps to ``steps``."""
        return tuple(range(0, self.steps + 1, self.every))


@dataclasses.dataclass(frozen=True)
class PropertyConfig:
    """Settings of a property-model run."""

    dataset: str
    max_atoms: int
    encoder: SphereNetConfig = SphereNetConfig(
        num_layers=3, hidden=64, out_channels=128, int_emb=32, out_emb=128, num_spherical=3, num_radial=6, cutoff=6.0
    )
    max_neighbors: int = 12  # K nearest, plus every neighbour tied with the K-th
    neighbor_capacity: int = 16  # slots per atom for K and its ties (overflow is reported)
    head_hidden: int = 128
    batch_size: int = 64
    epochs: int = 60
    learning_rate: float = 1e-3
    seed: int = 0
    keep_checkpoints: int = 2
    max_train: int | None = None

    def to_json(self) -> str:
        """Return the config as JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PropertyConfig":
        """Return the config stored by :meth:`to_json` (parsed)."""
        return cls(**{**d, "encoder": SphereNetConfig(**d["encoder"])})


def get_property_config(dataset: str, preset: str = "default", **overrides: Any) -> PropertyConfig:
    """Return the property-model config of ``dataset`` for a preset; ``overrides`` replace fields."""
    info = _dataset_info(dataset)
    if preset not in PROPERTY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PROPERTY_PRESETS)}")
    config = PropertyConfig(dataset=dataset, max_atoms=info.max_atoms)
    if preset == "quick":
        small = SphereNetConfig(num_layers=1, hidden=16, out_channels=16, int_emb=8, out_emb=16, num_spherical=2,
                                num_radial=3, num_output_layers=1, cutoff=5.0)
        config = dataclasses.replace(config, encoder=small, max_neighbors=8, neighbor_capacity=16, head_hidden=16,
                                     epochs=3, max_train=128)
    return dataclasses.replace(config, **overrides)
