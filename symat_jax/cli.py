"""The ``symat`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Sequence

from symat_jax.configs import (DEFAULT_SAMPLER_PRESET, SAMPLER_PRESETS, SCORE_CONDITIONS, SCORE_LATENTS,
                               TARGET_MATCHINGS)
from symat_jax.data import registry
from symat_jax.stage_flags import add_stage_args, apply_stage_args, stage_configs


def _add_data_args(parser: argparse.ArgumentParser, dataset: str | None = "carbon_24") -> None:
    """Add the dataset and data-root options shared by every sub-command (``dataset``: the default, None: the run's)."""
    parser.add_argument("--dataset", default=dataset, choices=sorted(registry.DATASETS))
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"folder holding <dataset>/<split>.csv (default: ${registry.DATA_ROOT_ENV}, else ./data)",
    )


def preprocess(dataset: str, data_root: str | None, splits: Sequence[str], workers: int | None) -> dict[str, float]:
    """Return seconds spent per split after reading (and caching) each split of ``dataset``."""
    from symat_jax.data import load_split

    timings = {}
    for split in splits:
        t0 = time.perf_counter()
        data = load_split(dataset, split, data_root, num_workers=workers)
        timings[split] = time.perf_counter() - t0
        counts = data.num_atoms
        print(
            f"{dataset}/{split}: {len(data)} crystals, atoms per cell {counts.min()}..{counts.max()} "
            f"(mean {counts.mean():.1f}), {int(data.num_edges.sum())} encoder edges, "
            f"{len(data.skipped)} rows skipped, {timings[split]:.2f} s"
        )
    return timings


# Research options of the score model, all off by default (docs/quality-history.md): flag -> (choices, help).
SCORE_MODEL_OPTIONS = {
    "--score-condition": (SCORE_CONDITIONS, "where the score network sees z_pos: at the edge head only (SPEC 3, "
                                            "default) or also on every atom's embedding"),
    "--target-matching": (TARGET_MATCHINGS, "pair each noisy atom's score target with the clean atom it came from "
                                            "(SPEC 3, default) or with its partner in an optimal same-element assignment"),
    "--score-latent": (SCORE_LATENTS, "z_pos the score network sees in training: a posterior draw (SPEC 2, default) "
                                      "or the posterior mean (what the fitted prior gives the sampler)"),
}


def add_train_args(parser: argparse.ArgumentParser, workdir_default: str | None = None) -> None:
    """Add the training options (shared by ``symat train`` and the experiments)."""
    from symat_jax.configs import PRESETS

    parser.add_argument(
        "--workdir",
        required=workdir_default is None,
        default=workdir_default,
        help="run folder: config, checkpoints, metrics.jsonl" + (f" (default {workdir_default})" if workdir_default else ""),
    )
    parser.add_argument("--preset", default="paper", choices=PRESETS)
    parser.add_argument("--epochs", type=positive_int, default=None, help="override the preset's number of epochs")
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--seed", type=seed_int, default=None)
    parser.add_argument("--focus-sigma", type=focus_sigma, default=None,
                        help="draw training noise levels above this sigma (A) less often, as sigma^-1; 'uniform': "
                             "every level alike, as SPEC 3 (default: 1.0)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                        help="learning rate: constant (SPEC 2) or a cosine decay to 1%% over the run")
    parser.add_argument("--ema-decay", type=ema_decay, default=None,
                        help="decay of the parameters' moving average the default sampler uses (0: none)")
    for flag, (choices, text) in SCORE_MODEL_OPTIONS.items():
        parser.add_argument(flag, choices=choices, default=None, help=text)
    parser.add_argument("--divergence-factor", type=divergence_factor, default=None,
                        help="rerun an epoch whose training or validation loss exceeds this many times its median over "
                             "the last 5 epochs, at half the learning rate (default 3; 'off': never)")
    parser.add_argument("--divergence-retries", type=non_negative_int, default=None,
                        help="reruns of a diverging epoch before the run stops at its last good epoch (default 3)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")


def run_training(args: argparse.Namespace) -> dict:
    """Train as the parsed arguments say and return the last epoch's record."""
    from symat_jax import configs, train

    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("seed", args.seed),
                                   ("focus_sigma", args.focus_sigma), ("target_matching", args.target_matching),
                                   ("score_latent", args.score_latent),
                                   ("ema_decay", args.ema_decay), ("lr_schedule", args.lr_schedule),
                                   ("divergence_factor", args.divergence_factor),
                                   ("divergence_retries", args.divergence_retries)) if v is not None}
    if overrides.get("focus_sigma") == "uniform":
        overrides["focus_sigma"] = None
    if overrides.get("divergence_factor") == "off":
        overrides["divergence_factor"] = None
    config = configs.get_config(args.dataset, args.preset, **overrides)
    if args.score_condition is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, score_condition=args.score_condition))
    t0 = time.perf_counter()
    record = train.train(config, args.workdir, data_root=args.data_root, resume=args.resume)
    print(f"trained {args.dataset} ({args.preset}) in {time.perf_counter() - t0:.1f} s; workdir {args.workdir}")
    if record:
        val = record["val"]
        print(
            f"epoch {record['epoch']}: val loss {val['loss']:.4f}, composition match {val['acc_composition']:.3f}, "
            f"lattice MSE {val['lattice']:.4f}, coordinate loss {val['coords']:.4f}"
        )
    return record


def _number(text: str, integer: bool = False) -> float:
    """Return ``text`` as an int or float (argparse types; a clear message otherwise)."""
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if integer else 'number'}") from None


def _positive(text: str, integer: bool) -> float:
    """Return ``text`` as an integer >= 1 or a finite number > 0 (argparse types; a clear message otherwise)."""
    value = _number(text, integer)
    if integer and value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if not integer and not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def checkpoint_choice(text: str) -> str:
    """Return ``text`` if it names a checkpoint: best, latest or an epoch number (argparse type)."""
    from symat_jax.run import checkpoint_choice as check

    try:
        return check(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# Seeds feed jax.random.PRNGKey and numpy's generators (the hops): unsigned 32-bit.
MAX_SEED = 2**32 - 1


def seed_int(text: str) -> int:
    """Return ``text`` as a seed in 0..2^32-1 (argparse type of every ``--seed``)."""
    value = int(_number(text, integer=True))
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to {MAX_SEED}, got {text}")
    return value


def positive_int(text: str) -> int:
    """Return ``text`` as an integer >= 1 (argparse type)."""
    return int(_positive(text, integer=True))


def non_negative_int(text: str) -> int:
    """Return ``text`` as an integer >= 0 (argparse type)."""
    value = int(_number(text, integer=True))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def focus_sigma(text: str) -> float | str:
    """Return ``text`` as a sigma > 0, or the word ``uniform`` (argparse type of ``--focus-sigma``)."""
    return "uniform" if text == "uniform" else positive_float(text)


def divergence_factor(text: str) -> float | str:
    """Return ``text`` as a factor > 1, or the word ``off`` (argparse type of ``--divergence-factor``)."""
    if text == "off":
        return text
    value = _number(text)
    if not 1.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 1, or 'off', got {text}")
    return value


def ema_decay(text: str) -> float:
    """Return ``text`` as a decay in [0, 1) (argparse type of ``--ema-decay``)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """Return ``text`` as a finite number > 0 (argparse type)."""
    return _positive(text, integer=False)


def setup_logging() -> None:
    """Log INFO from this package; keep orbax/absl chatter at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``symat`` command line and return its exit status."""
    parser = argparse.ArgumentParser(prog="symat", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preprocess", help="canonicalise a dataset and cache its CrystalNN graphs")
    _add_data_args(p)
    p.add_argument("--splits", nargs="+", default=list(registry.SPLITS), choices=registry.SPLITS)
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p = sub.add_parser("train", help="train SyMat (resumable; orbax checkpoints in --workdir)")
    _add_data_args(p)
    add_train_args(p)
    p = sub.add_parser("sample", help="generate crystals from a trained run (samples.npz + CIF files)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=positive_int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=SAMPLER_PRESETS, default=DEFAULT_SAMPLER_PRESET,
                   help="sampler preset: 'paper' is SPEC 4 exactly; 'default' the best measured setting; the flags "
                        "below change its stages (symat_jax.configs.SamplerPreset)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--checkpoint", type=checkpoint_choice, default=None,
                   help="best, latest or a kept epoch's number (default: the preset's choice)")
    p.add_argument("--score-checkpoint", type=checkpoint_choice, default=None,
                   help="take the score network from this kept checkpoint (the decoders from --checkpoint)")
    p.add_argument("--weights", choices=("raw", "ema"), default=None,
                   help="trained parameters or their moving average (default: the preset's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    add_stage_args(p)
    p = sub.add_parser("relax", help="relax generated carbon crystals in Tersoff's potential (FIRE) into a new folder")
    p.add_argument("--samples", required=True, help="samples.npz in the CDVAE layout or the folder holding it (only read)")
    p.add_argument("--out", required=True, help="new folder for the relaxed crystals")
    p.add_argument("--seed", type=seed_int, default=0, help="draws the hops' displacements")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    add_stage_args(p, ("relax", "hop"), prior=False, optional=("hop",))
    p = sub.add_parser("fit-prior", help="fit the latent prior of a trained run to its encoded training set")
    _add_data_args(p, dataset=None)
    p.add_argument("--workdir", required=True)
    p.add_argument("--checkpoint", type=checkpoint_choice, default="latest", help="best, latest or a kept epoch's number")
    p.add_argument("--families", nargs="+", choices=("gmm", "kde"), default=["gmm", "kde"],
                   help="candidate densities the validation likelihood chooses among: Gaussian mixtures, kernel "
                        "density estimates (default: both)")
    p = sub.add_parser("fit-head", help="fit a property head on a trained run's latents (the objective of symat optimize)")
    _add_data_args(p, dataset=None)
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", choices=SAMPLER_PRESETS, default=DEFAULT_SAMPLER_PRESET,
                   help="the sampler preset symat optimize will decode with: its checkpoint and weights encode the latents")
    p.add_argument("--checkpoint", type=checkpoint_choice, default=None, help="instead of the preset's checkpoint")
    p.add_argument("--weights", choices=("raw", "ema"), default=None, help="instead of the preset's weights")
    p.add_argument("--epochs", type=positive_int, default=None)
    p = sub.add_parser("optimize", help="lower a property by gradient steps on test crystals' latents; SR5/10/15 (SPEC 6)")
    p.add_argument("--workdir", required=True, help="a trained run with a property head (symat fit-head)")
    p.add_argument("--property-model", required=True, help="workdir of `symat train-property`: the independent judge")
    p.add_argument("--num", type=positive_int, default=100, help="starts: the first NUM crystals of the test split")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=positive_int, default=5000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=positive_int, default=500, help="decode z every EVERY steps")
    p.add_argument("--preset", choices=SAMPLER_PRESETS, default=DEFAULT_SAMPLER_PRESET,
                   help="the sampler preset that decodes each saved z (its flags below change its stages)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--data-root", default=None)
    p.add_argument("--workers", type=positive_int, default=None, help="processes for fingerprints (default: all cores)")
    p.add_argument("--tersoff", action=argparse.BooleanOptionalAction, default=None,
                   help="Tersoff's energy after relaxation as a second judge (default: on for carbon)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder symat optimize wrote")
    add_stage_args(p)
    p = sub.add_parser("train-property", help="train the property model used by the evaluation's property EMD")
    _add_data_args(p)
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", default="default", choices=("default", "quick"))
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("evaluate", help="CDVAE metrics of generated crystals (validity, COV-R/COV-P, EMDs)")
    _add_data_args(p)
    p.add_argument("--samples", required=True, help="samples.npz in the CDVAE layout, the folder holding it, or a CDVAE CSV")
    p.add_argument("--reference", default=None, help="CSV of reference crystals (default: the dataset's test split)")
    p.add_argument("--property-model", default=None, help="workdir of `symat train-property` (else property_emd is null)")
    p.add_argument("--out", default=None, help="write the report here as JSON")
    p.add_argument("--comp-scaler", default=None, help="comp_scaler.json (default: <data root>/comp_scaler.json)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes for fingerprints (default: all cores)")
    p.add_argument("--num-property-samples", type=positive_int, default=1000)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--batch-idx", type=int, default=0, help="evaluation index of CDVAE files with a leading axis")
    p.add_argument("--subsample", type=positive_int, default=None,
                   help="score this many generated crystals drawn at random (--seed); with the training CSV as "
                        "--samples: the data ceiling at that sample count")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.command == "preprocess":
            preprocess(args.dataset, args.data_root, args.splits, args.workers)
        elif args.command == "train":
            run_training(args)
        elif args.command == "sample":
            from symat_jax.configs import get_sampler_preset
            from symat_jax.generate_cli import run_sample
            from symat_jax.run import read_config

            # The flags are checked (on the preset with every stage) before the run is read or any work starts.
            apply_stage_args(get_sampler_preset("carbon_24", args.preset), args)
            preset = get_sampler_preset(read_config(args.workdir).dataset, args.preset)
            preset = dataclasses.replace(preset, checkpoint=args.checkpoint or preset.checkpoint,
                                weights=args.weights or preset.weights)
            preset = apply_stage_args(preset, args)
            summary = run_sample(args.workdir, args.num, args.out, preset=preset, batch_size=args.batch_size,
                                 seed=args.seed, score_checkpoint=args.score_checkpoint, overwrite=args.overwrite)
            print(json.dumps(summary, indent=1))
        elif args.command == "relax":
            from symat_jax.relax_cli import relax_samples

            cfgs = stage_configs(args, ("relax", "hop"), optional=("hop",))
            if cfgs["relax"] is None:  # --no-relax: there is nothing else this command does
                raise ValueError("symat relax relaxes: drop --no-relax")
            print(json.dumps(relax_samples(args.samples, args.out, cfgs["relax"], cfgs["hop"],
                                           batch_size=args.batch_size, overwrite=args.overwrite, seed=args.seed),
                             indent=1))
        elif args.command == "fit-prior":
            from symat_jax.latents import fit_prior
            from symat_jax.run import read_config

            trained = read_config(args.workdir).dataset
            if args.dataset not in (None, trained):
                raise ValueError(f"--dataset {args.dataset}: {args.workdir} is a {trained} run; its prior is fitted "
                                 "on its own dataset (drop --dataset)")

            print(json.dumps(fit_prior(args.workdir, args.data_root, args.checkpoint, families=args.families), indent=1))
        elif args.command == "fit-head":
            from symat_jax.configs import HeadConfig
            from symat_jax.property_head import fit_run_head
            from symat_jax.run import read_config

            trained = read_config(args.workdir).dataset
            if args.dataset not in (None, trained):
                raise ValueError(f"--dataset {args.dataset}: {args.workdir} is a {trained} run (drop --dataset)")
            head = HeadConfig(**({"epochs": args.epochs} if args.epochs else {}))
            print(json.dumps(fit_run_head(args.workdir, args.data_root, args.checkpoint, args.weights, head,
                                          preset=args.preset), indent=1))
        elif args.command == "optimize":
            from symat_jax.configs import OptimizeConfig, get_sampler_preset
            from symat_jax.optimize_cli import run_optimize
            from symat_jax.run import read_config

            config = OptimizeConfig(args.steps, args.lr, args.every)
            apply_stage_args(get_sampler_preset("carbon_24", args.preset), args)
            preset = apply_stage_args(get_sampler_preset(read_config(args.workdir).dataset, args.preset), args)
            report = run_optimize(args.workdir, args.property_model, args.num, args.out, config=config, preset=preset,
                                  seed=args.seed, batch_size=args.batch_size, data_root=args.data_root,
                                  overwrite=args.overwrite, tersoff=args.tersoff, workers=args.workers)
            print(json.dumps({k: report[k] for k in ("dataset", "num_starts", "thresholds")}, indent=1))
            for label in ("raw", "final"):
                r = report[label]
                print(f"{label:5s}: SR5/10/15 (our split) {r['sr_ours']}, CDVAE thresholds {r['sr_cdvae']}, "
                      f"validity {r['validity']}, unique best {r['unique_best']}")
        elif args.command == "train-property":
            from symat_jax.configs import get_property_config
            from symat_jax.property_model import train_property

            overrides = {"epochs": args.epochs} if args.epochs is not None else {}
            config = get_property_config(args.dataset, args.preset, **overrides)
            print(json.dumps(train_property(config, args.workdir, args.data_root, resume=args.resume), indent=1))
        elif args.command == "evaluate":
            from symat_jax import metrics
            from symat_jax.evaluate_cli import run_evaluate

            report = run_evaluate(args.samples, args.dataset, args.out, args.reference, args.property_model,
                                  args.data_root, args.comp_scaler, args.workers, args.num_property_samples,
                                  args.seed, args.batch_idx, subsample=args.subsample)
            print(metrics.format_report(report))
    except KeyboardInterrupt:
        print(f"symat {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one error boundary of the command line)
        if args.debug:
            raise
        from symat_jax.loop import TrainingDiverged

        # ValueError and OSError include FileNotFoundError and DatasetNotFoundError.
        expected = isinstance(err, (ValueError, OSError, TrainingDiverged))
        kind = "" if expected else f"unexpected {type(err).__name__}: "
        hint = "" if expected else " (rerun with --debug for the traceback)"
        print(f"symat {args.command}: error: {kind}{err}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
