"""The chain's schedule, built once on the host: which trained levels it visits, and each level's step, noise and length.

A :class:`Schedule` is plain data (tuples, hashable): the compiled chain
(:mod:`symat_jax.sampling.chain`) takes it as a static argument and has no
options of its own. The paper's 50 x 100 program is one schedule; the
``default`` preset's band of long low levels is another (more steps on some
levels), and studies in ``experiments/`` build their own (``levels=``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from symat_jax import score
from symat_jax.configs import ChainConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per level, high to low noise: trained level index, sigma (A), step size, score normaliser, noise scale, steps.

    ``final_denoise``: the scale of the denoising step after the last level (None: none).
    """

    levels: tuple[int, ...]
    sigmas: tuple[float, ...]
    alphas: tuple[float, ...]
    norms: tuple[float, ...]
    temps: tuple[float, ...]
    steps: tuple[int, ...]
    final_denoise: float | None = None

    def __len__(self) -> int:
        """Return the number of levels."""
        return len(self.levels)

    @property
    def total_steps(self) -> int:
        """Return the Langevin steps of the whole chain."""
        return int(sum(self.steps))

    @property
    def constant_temp(self) -> float | None:
        """Return the noise scale when every level shares it (the paper setting), else None."""
        return self.temps[0] if len(set(self.temps)) == 1 else None

    @property
    def constant_steps(self) -> int | None:
        """Return the steps per level when every level runs the same number, else None."""
        return self.steps[0] if len(set(self.steps)) == 1 else None

    def tail(self, start: int) -> "Schedule":
        """Return the schedule from its ``start``-th level on (a chain that begins part-way down)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start must be in 0..{len(self) - 1}, got {start}")
        cut = lambda xs: tuple(xs[start:])  # noqa: E731
        return Schedule(cut(self.levels), cut(self.sigmas), cut(self.alphas), cut(self.norms), cut(self.temps),
                        cut(self.steps), self.final_denoise)


def spread_levels(num_levels: int, top: int) -> np.ndarray:
    """Return ``num_levels`` trained level indices spread from ``top`` down to 0 (high to low noise)."""
    return np.unique(np.round(np.linspace(0, top, num_levels)).astype(int))[::-1]


def build_schedule(chain: ChainConfig, model: ModelConfig, score_norm: Sequence[float],
                   levels: Sequence[int] | None = None) -> Schedule:
    """Return the schedule of ``chain`` for a trained model (ValueError for a chain the model cannot run).

    ``levels`` (trained indices, high to low) replaces the config's spread of
    ``num_levels`` over the trained levels: a study's own schedule.
    """
    sigmas_all = score.noise_levels(model.num_levels, model.sigma_min, model.sigma_max)
    norm_all = np.asarray(score_norm, np.float64)
    if len(norm_all) != model.num_levels:
        raise ValueError(f"the run's score normaliser has {len(norm_all)} levels, the model {model.num_levels}")
    if levels is None:
        if chain.num_levels > model.num_levels:
            raise ValueError(f"num_levels must be in 1..{model.num_levels} (the trained levels), got {chain.num_levels}")
        idx = spread_levels(chain.num_levels, model.num_levels - 1)
    else:
        idx = np.asarray(levels, int)
        if not len(idx) or idx.min() < 0 or idx.max() >= model.num_levels or np.any(np.diff(idx) >= 0):
            raise ValueError(f"levels must be trained indices 0..{model.num_levels - 1} from high to low, got "
                             f"{idx.tolist()}")
    sig = sigmas_all[idx]
    if chain.step_schedule == "paper":
        alphas = chain.step_scale * (sig / sigmas_all[0]) ** 2
    else:
        alphas = chain.step_scale * norm_all[idx] ** 2
    if chain.noise_schedule == "constant":
        temps = np.full(len(idx), chain.temp_coord)
    else:
        temps = chain.temp_coord * sig / norm_all[idx]
    steps = np.full(len(idx), chain.steps_per_level, np.int64)
    if chain.band is not None:
        lo, hi, band_steps = chain.band
        steps = np.where((sig >= lo) & (sig <= hi), band_steps, steps)
    return Schedule(tuple(int(i) for i in idx), tuple(float(s) for s in sig), tuple(float(a) for a in alphas),
                    tuple(float(n) for n in norm_all[idx]), tuple(float(t) for t in temps),
                    tuple(int(n) for n in steps), chain.final_denoise)
