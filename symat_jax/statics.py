"""The values a trained run fixes and stores beside its checkpoints: the lattice standardiser and :class:`RunStatics`.

A floor of its own (numpy and json only): batching, training and sampling
all read these values, and none of them should load orbax to get them.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class LatticeStandardizer:
    """Mean and std of ``(scaled lengths, angles)`` fit on a training set (saved with the model)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, features: np.ndarray) -> "LatticeStandardizer":
        """Return the standardiser of ``[c, 6]`` lattice features (scaled lengths, angles)."""
        x = np.asarray(features)
        return cls(tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in np.maximum(x.std(0), 1e-6)))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Return standardised ``[c, 6]`` features."""
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Return ``[..., 6]`` (scaled lengths, angles) from standardised values."""
        return np.asarray(x) * np.asarray(self.std) + np.asarray(self.mean)

    def to_json(self) -> str:
        """Return the standardiser as JSON."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LatticeStandardizer":
        """Return the standardiser stored by :meth:`to_json`."""
        d = json.loads(text)
        return cls(tuple(d["mean"]), tuple(d["std"]))


@dataclasses.dataclass(frozen=True)
class RunStatics:
    """Values fixed for a run and stored beside its checkpoints (``normalizers.json``).

    Frozen and hashable: jitted samplers take it whole as a static argument.
    """

    score_norm: tuple[float, ...]
    max_images: tuple[int, int, int]
    element_slots: int
    lattice: LatticeStandardizer
    dataset: str | None = None  # the data they were computed on (None: a run written before it was recorded)

    def to_json(self) -> str:
        """Return the statics as JSON."""
        return json.dumps(
            {
                "score_norm": list(self.score_norm),
                "max_images": list(self.max_images),
                "element_slots": self.element_slots,
                "lattice": json.loads(self.lattice.to_json()),
                **({"dataset": self.dataset} if self.dataset is not None else {}),
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
            None if d.get("dataset") is None else str(d["dataset"]),
        )
