"""Train -> sample -> evaluate one dataset and write a results table beside the published rows.

    python -m experiments.cdvae_benchmark --dataset perov_5 --root runs/perov_5 [--num-samples 10000]

Stages, each skipped when its output exists (so an interrupted run is resumed
by running the same command again):

1. SyMat training in ``ROOT/model``, resumed from its checkpoints (``--model-workdir``: use that run as it is);
2. the property model in ``ROOT/property`` (``--property-workdir``: use that one);
3. ``--num-samples`` crystals in ``ROOT/samples`` (or ``--samples-dir``);
4. ``symat evaluate`` into ``ROOT/metrics.json``; the table goes to ``ROOT/results.md``.

The CDVAE protocol uses 10,000 samples for validity and coverage and 1,000
valid ones for the property statistics; the table states the counts used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any, Sequence

from symat_jax import cli

# DiffCSP paper, Table 4 (CDVAE cut-offs): struct. validity, comp. validity, COV-R, COV-P (%),
# density EMD, energy (property) EMD, number-of-elements EMD. None: not reported.
PUBLISHED: dict[str, list[tuple[str, tuple[Any, ...]]]] = {
    "carbon_24": [
        ("CDVAE (published)", (100.0, None, 99.80, 83.08, 0.1407, 0.2850, None)),
        ("DiffCSP (published)", (100.0, None, 99.90, 97.27, 0.0805, 0.0820, None)),
    ],
    "perov_5": [
        ("CDVAE (published)", (100.0, 98.59, 99.45, 98.46, 0.1258, 0.0264, 0.0628)),
        ("DiffCSP (published)", (100.0, 98.85, 99.74, 98.27, 0.1110, 0.0263, 0.0128)),
    ],
}
COLUMNS = ("method", "struct. valid %", "comp. valid %", "COV-R %", "COV-P %", "density EMD", "property EMD",
           "# elements EMD", "# atoms EMD", "samples (valid for EMDs)")


def _fmt(x: Any, pct: bool = False) -> str:
    """Return a table cell."""
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.4f}"


def results_table(report: dict[str, Any], label: str = "symat-jax (this run)") -> str:
    """Return a Markdown table: our row under both cut-off sets, then the published rows of the dataset."""
    ds = report["dataset"]
    samples = f"{report['num_samples']} ({report['num_property_samples']})"
    rows = [
        (f"{label}, CDVAE cut-offs {tuple(report['cov_cutoffs'])}", _fmt(report["struct_validity"], True),
         _fmt(report["comp_validity"], True), _fmt(report["cov_recall"], True), _fmt(report["cov_precision"], True),
         _fmt(report["density_emd"]), _fmt(report["property_emd"]), _fmt(report["num_elements_emd"]),
         _fmt(report["num_atoms_emd"]), samples),
    ]
    if "cov_recall_symat" in report:
        rows.append((f"{label}, SyMat cut-offs {tuple(report['cov_cutoffs_symat'])}", "", "",
                     _fmt(report["cov_recall_symat"], True), _fmt(report["cov_precision_symat"], True),
                     "", "", "", "", ""))
    for name, vals in PUBLISHED.get(ds, []):
        rows.append((name, *("-" if v is None else f"{v:.2f}" if i < 4 else f"{v:.4f}" for i, v in enumerate(vals)),
                     "-", "10000 (1000)"))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages that are not done yet and return the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(PUBLISHED) + ["mp_20"])
    p.add_argument("--root", required=True, help="folder for every stage's outputs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--preset", default="paper", choices=("paper", "quick"))
    p.add_argument("--epochs", type=int, default=None, help="SyMat epochs (default: the preset's)")
    p.add_argument("--property-epochs", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256, help="sampling batch")
    p.add_argument("--langevin-steps", type=int, default=None, help="steps per noise level (default: the sampler preset's)")
    p.add_argument("--sampler-preset", default="default", choices=("paper", "default"),
                   help="sampler preset (symat_jax.configs.get_sampler_preset)")
    p.add_argument("--model-workdir", default=None)
    p.add_argument("--property-workdir", default=None)
    p.add_argument("--samples-dir", default=None)
    args = p.parse_args(argv)
    cli.setup_logging()
    log = logging.getLogger("cdvae_benchmark")
    root = pathlib.Path(args.root)
    model_dir = pathlib.Path(args.model_workdir or root / "model")
    prop_dir = pathlib.Path(args.property_workdir or root / "property")
    samples_dir = pathlib.Path(args.samples_dir or root / "samples")
    try:
        from symat_jax import configs, train
        from symat_jax.evaluate_cli import run_evaluate
        from symat_jax.generate_cli import run_sample
        from symat_jax.property_model import train_property

        # A run given with --model-workdir / --property-workdir is used as it is.
        if args.model_workdir is None and not (samples_dir / "samples.npz").exists():
            overrides = {"epochs": args.epochs} if args.epochs else {}
            config = configs.get_config(args.dataset, args.preset, **overrides)
            log.info("stage 1: SyMat training in %s", model_dir)
            train.train(config, model_dir, args.data_root, resume=(model_dir / "config.json").exists())
        if args.property_workdir is None and not (prop_dir / "test_metrics.json").exists():
            overrides = {"epochs": args.property_epochs} if args.property_epochs else {}
            pconfig = configs.get_property_config(args.dataset, "quick" if args.preset == "quick" else "default", **overrides)
            log.info("stage 2: property model in %s", prop_dir)
            train_property(pconfig, prop_dir, args.data_root, resume=(prop_dir / "property_config.json").exists())
        if not (samples_dir / "samples.npz").exists():
            log.info("stage 3: %d samples into %s", args.num_samples, samples_dir)
            preset = configs.get_sampler_preset(args.dataset, args.sampler_preset)
            if args.langevin_steps:
                preset = preset.replace_stage(dataclasses.replace(preset.chain, steps_per_level=args.langevin_steps))
            run_sample(str(model_dir), args.num_samples, str(samples_dir), preset=preset, batch_size=args.batch_size)
        log.info("stage 4: evaluation")
        report = run_evaluate(str(samples_dir), args.dataset, str(root / "metrics.json"),
                              property_model=str(prop_dir), data_root=args.data_root)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prop = json.loads((prop_dir / "test_metrics.json").read_text())
    text = (f"# {args.dataset}: CDVAE evaluation\n\n{results_table(report)}\n\n"
            f"Property model ({prop['property']}): test MAE {prop['test_mae']:.4f} "
            f"(mean predictor {prop['test_mae_mean_predictor']:.4f}), {prop['num_train']} training crystals.\n")
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
