"""Configs as data: the model and training settings of each dataset, paper and quick presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from symat_jax.data import registry
from symat_jax.networks import SphereNetConfig

PRESETS = ("paper", "quick")
# Epochs of the paper setting (SPEC 2).
PAPER_EPOCHS = {"carbon_24": 150, "perov_5": 700, "mp_20": 300}


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
    clip_value: float = 0.5
    epochs: int = 150
    seed: int = 0
    num_buckets: int = 3  # pad budgets of encoder batches (compilations per epoch)
    keep_checkpoints: int = 3
    max_train: int | None = None  # use only the first N training crystals (quick runs)
    max_val: int | None = None

    def to_json(self) -> str:
        """Return the config as JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Return the config stored by :meth:`to_json` (parsed)."""
        model = dict(d["model"])
        model["encoder"] = SphereNetConfig(**model["encoder"])
        model["score_net"] = SphereNetConfig(**model["score_net"])
        return cls(**{**d, "model": ModelConfig(**model), "loss": LossWeights(**d["loss"])})


def get_config(dataset: str, preset: str = "paper", **overrides: Any) -> TrainConfig:
    """Return the training config of ``dataset`` for a preset; ``overrides`` replace top-level fields."""
    info = registry.get_info(dataset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    model = ModelConfig(max_atoms=info.max_atoms, score_cutoff=info.score_cutoff, score_neighbors=info.max_neighbors)
    config = TrainConfig(dataset=dataset, model=model, epochs=PAPER_EPOCHS[dataset])
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
