"""A trained SyMat run: its folder layout, statics, train state and loading (one home for all three users).

Training writes a run, sampling and evaluation read it; none of them imports
another's module to get at it. A run folder holds:

* ``config.json``: the :class:`~symat_jax.configs.TrainConfig`;
* ``normalizers.json``: the :class:`RunStatics` (lattice standardiser, score
  normaliser, image range, element slots) and ``score_norm.txt`` (the
  normaliser alone, comparable with the published ``score_norm.txt``);
* ``checkpoints/`` (latest N) and ``best/`` (best validation loss): orbax
  checkpoints of the :class:`TrainState`;
* ``metrics.jsonl``: one line per finished epoch;
* ``prior.npz`` and ``prior.json``: the latent prior fitted to the training
  set (:mod:`symat_jax.latents`) and how it was chosen.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, NamedTuple

import flax
import jax
import numpy as np

from symat_jax.checkpoints import DamagedCheckpointError, RunCheckpoints
from symat_jax.files import UNREADABLE_NPZ, read_json, write_text_atomic
from symat_jax.configs import TrainConfig
from symat_jax.model import SCORE_MODULES
from symat_jax.prior import MixturePrior
from symat_jax.statics import LatticeStandardizer, RunStatics  # noqa: F401  (part of a run)

log = logging.getLogger(__name__)

Array = jax.Array

CONFIG_FILE = "config.json"
STATICS_FILE = "normalizers.json"
SCORE_NORM_FILE = "score_norm.txt"
METRICS_FILE = "metrics.jsonl"
PRIOR_FILE = "prior.npz"
PRIOR_REPORT_FILE = "prior.json"
CHECKPOINT_CHOICES = ("best", "latest")
WEIGHT_CHOICES = ("raw", "ema")
# The random streams of a run, each derived from the seed with its own fold_in,
# so no two uses of randomness share a key (and resume re-derives them all).
RANDOM_STREAMS = {"params": 0, "steps": 1, "score_norm": 2, "validation": 3}


def stream_key(seed: int, stream: str) -> Array:
    """Return the PRNG key of a named random stream of the run with ``seed``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), RANDOM_STREAMS[stream])


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: step, parameters, optimiser state and the base PRNG key."""

    step: Array
    params: Any
    opt_state: Any
    key: Array  # raw key data; the step's key is fold_in(key, step)
    # Exponential moving average of ``params`` (TrainConfig.ema_decay); None for models that keep none.
    ema_params: Any = None
    # Multiplies every update (the optimiser's rate); the divergence guard lowers it when it reruns an epoch.
    # None for models that keep none; checkpoints from before it restore with the fresh state's 1.
    lr_scale: Any = None

    def restore_older(self, stored: dict[str, Any]) -> "TrainState":
        """Return this state with the fields of an older checkpoint that lacks some (an EMA starts at its params)."""
        state = self.replace(**stored)
        if "ema_params" not in stored and self.ema_params is not None:
            state = state.replace(ema_params=jax.tree_util.tree_map(np.array, stored["params"]))  # a copy: steps donate
        return state


class LoadedRun(NamedTuple):
    """A run read back for sampling or evaluation: config, statics, parameters and the checkpoint's meta.

    ``meta["weights"]`` says which parameters were loaded: ``raw`` or ``ema``.
    """

    config: TrainConfig
    statics: RunStatics
    params: Any
    meta: dict[str, Any]


def holds_run(workdir: str | pathlib.Path) -> bool:
    """Return whether ``workdir`` already holds a run (a checkpoint of one), without creating anything."""
    folder = pathlib.Path(workdir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_training_folder(workdir: pathlib.Path, config_file: str) -> None:
    """Raise ValueError when ``workdir`` holds files but no run of this kind (no ``config_file``): training never mixes in."""
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / config_file).exists():
        raise ValueError(f"{workdir} holds files but no run (no {config_file}); train into a new or empty folder")


def read_config(workdir: str | pathlib.Path) -> TrainConfig:
    """Return the config stored in a run folder."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} holds no SyMat run")
    data = read_json(path, ("dataset", "model"))
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a SyMat training config ({err})") from None


def read_statics(workdir: str | pathlib.Path) -> RunStatics:
    """Return the statics stored in a run folder."""
    path = pathlib.Path(workdir) / STATICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run in {workdir} lacks its statics (score normaliser, "
                                "lattice standardiser); copy it back from a backup of the run")
    data = read_json(path, ("score_norm", "max_images", "element_slots", "lattice"))
    try:
        statics = RunStatics.from_json(json.dumps(data))
        if len(statics.max_images) != 3 or not all(float(x) > 0 for x in statics.score_norm):
            raise ValueError("max_images needs 3 entries and score_norm positive values")
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path} does not hold a run's statics ({err}); copy it back from a backup of the run") from None
    return statics


def write_statics(workdir: str | pathlib.Path, statics: RunStatics) -> None:
    """Write ``normalizers.json`` and ``score_norm.txt`` of a run (atomically)."""
    workdir = pathlib.Path(workdir)
    write_text_atomic(workdir / STATICS_FILE, statics.to_json())
    tmp = workdir / f".{SCORE_NORM_FILE}.tmp"
    np.savetxt(tmp, np.asarray(statics.score_norm))
    os.replace(tmp, workdir / SCORE_NORM_FILE)


def checkpoint_choice(text: str) -> str:
    """Return ``text`` if it names a checkpoint: ``best``, ``latest`` or an epoch number (ValueError otherwise)."""
    if text in CHECKPOINT_CHOICES or (text.isdigit() and int(text) >= 1):
        return text
    raise ValueError(f"a checkpoint is best, latest or an epoch number (1, 2, ...), got {text!r}")


def _restore_state(workdir: pathlib.Path, checkpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(state as nested dicts, meta)`` of one checkpoint; a damaged one is an error naming others to try."""
    ckpt = RunCheckpoints(workdir, read_only=True)
    try:
        epoch = int(checkpoint) - 1 if checkpoint.isdigit() else None
        return ckpt.restore_raw(best=checkpoint == "best", epoch=epoch)
    except DamagedCheckpointError as err:
        kept = [str(s + 1) for s in reversed(ckpt.kept_steps()) if s != err.step]
        others = ["`--checkpoint best`"] if checkpoint != "best" else ["`--checkpoint latest`"]
        others += [f"`--checkpoint {k}`" for k in kept[:2]]
        raise ValueError(f"{err}; {' or '.join(others)} loads another") from None
    finally:
        ckpt.close()


def load_run(workdir: str | pathlib.Path, checkpoint: str = "best", weights: str = "raw",
             score_checkpoint: str | None = None) -> LoadedRun:
    """Return the config, statics, parameters and meta of a trained run.

    ``checkpoint``: best, latest or a kept epoch's number; ``weights``: the
    trained parameters (``raw``) or their moving average (``ema``; a run
    trained without one gives its raw parameters, and ``meta["weights"]`` says so).
    ``score_checkpoint``: take the score network's parameters
    (``model.SCORE_MODULES``) from that checkpoint of the run instead, the
    rest from ``checkpoint`` (``meta["score_epoch"]`` says which): the
    decoders and the score network each at the epoch that generates best.
    A damaged checkpoint is an error that names the others to try.
    """
    checkpoint = checkpoint_choice(str(checkpoint))
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    statics = read_statics(workdir)
    if statics.dataset is not None and statics.dataset != config.dataset:
        raise ValueError(f"{workdir / CONFIG_FILE} says {config.dataset} but {workdir / STATICS_FILE} was computed on "
                         f"{statics.dataset}: the run's files disagree; copy config.json back from a backup of the run")
    state, meta = _restore_state(workdir, checkpoint)
    has_ema = weights == "ema" and state.get("ema_params") is not None and config.ema_decay > 0
    meta["weights"] = "ema" if has_ema else "raw"
    params = state["ema_params" if has_ema else "params"]
    meta["score_epoch"] = int(meta["epoch"]) + 1
    if score_checkpoint is not None:
        other, other_meta = _restore_state(workdir, checkpoint_choice(str(score_checkpoint)))
        if has_ema and other.get("ema_params") is None:
            raise ValueError(f"the checkpoint of epoch {int(other_meta['epoch']) + 1} holds no EMA weights; "
                             "sample with `--weights raw` to take its score network")
        source = other["ema_params" if has_ema else "params"]
        params = {**params, "params": {**params["params"], **{k: source["params"][k] for k in SCORE_MODULES}}}
        meta["score_epoch"] = int(other_meta["epoch"]) + 1
    return LoadedRun(config, statics, params, meta)


def load_prior(workdir: str | pathlib.Path) -> MixturePrior:
    """Return the fitted latent prior of a run (FileNotFoundError saying how to fit one)."""
    path = pathlib.Path(workdir) / PRIOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: fit it with `symat fit-prior --workdir {workdir}`")
    try:
        return MixturePrior.load(path)
    except UNREADABLE_NPZ as err:
        raise ValueError(f"{path} is not a readable prior ({type(err).__name__}: {err}); refit it with "
                         f"`symat fit-prior --workdir {workdir}`") from None


def export_params(workdir: str | pathlib.Path, dest: str | pathlib.Path) -> pathlib.Path:
    """Write a light copy of a run into ``dest``: its files and the parameters (and EMA) of its best and latest checkpoints.

    No optimiser state (a third of the size): the copy samples and evaluates
    like the original but cannot resume training. Refuses an existing ``dest``.
    """
    import shutil

    workdir, dest = pathlib.Path(workdir), pathlib.Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; export into a new folder")
    read_config(workdir)  # fails early on a folder that holds no run
    dest.mkdir(parents=True)
    for name in (CONFIG_FILE, STATICS_FILE, SCORE_NORM_FILE, METRICS_FILE, PRIOR_FILE, PRIOR_REPORT_FILE):
        if (workdir / name).exists():
            shutil.copy2(workdir / name, dest / name)
    src = RunCheckpoints(workdir, read_only=True)
    out = RunCheckpoints(dest, keep=1)
    try:
        best_state, best_meta = src.restore_raw(best=True)
        last_state, last_meta = src.restore_raw(best=False)
        light = lambda state: {k: state[k] for k in ("params", "ema_params") if state.get(k) is not None}  # noqa: E731
        out.save(int(best_meta["epoch"]), light(best_state), best_meta, is_best=True)
        if int(last_meta["epoch"]) != int(best_meta["epoch"]):
            out.save(int(last_meta["epoch"]), light(last_state), last_meta, is_best=False)
    finally:
        src.close()
        out.close()
    return dest
