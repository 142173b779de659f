"""The quality study: sample every sampler variant from one run, score each as CDVAE and as a chemist, one table.

``python -m experiments.quality_study --dataset carbon_24 --workdir RUN --root ROOT --data-root D
[--num 1000] [--variants ...] [--property-model P] [--skip-sampling]``

Stages (each skipped when its output exists, so an interrupted study resumes):
sampling (``experiments.quality_sample``; runs anywhere, also as a batch job on
an accelerator whose ``ROOT`` is copied back), then per variant the CDVAE
report (``symat evaluate``) and local-structure statistics (coordination
within 1.8 A, nearest-neighbour distances), then ``ROOT/results.md`` (the
table) and ``ROOT/histograms.png`` (atoms per cell and density, generated vs test).

The table's second row is the **data ceiling**: ``--num`` training crystals
drawn at random, scored as if generated (``symat evaluate --subsample``). A
generator that reproduced the training distribution exactly would score
about that, so it is the row a variant is measured against.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from experiments.quality_sample import VARIANTS, sample_variant
from symat_jax import metrics
from symat_jax.coordination import coordination_by_density, crystal_coordination, local_structure
from symat_jax.crystals import CrystalSet
from symat_jax.data import load_split, registry
from symat_jax.evaluate_cli import load_generated, run_evaluate

log = logging.getLogger("quality_study")

COLUMNS = [("struct_validity", "struct. valid %", 100), ("comp_validity", "comp. valid %", 100),
           ("cov_recall", "COV-R %", 100), ("cov_precision", "COV-P %", 100),
           ("cov_recall_symat", "COV-R % (SyMat cut-offs)", 100), ("cov_precision_symat", "COV-P % (SyMat)", 100),
           ("density_emd", "density EMD", 1), ("num_elements_emd", "# elements EMD", 1),
           ("num_atoms_emd", "# atoms EMD", 1), ("property_emd", "property EMD", 1),
           ("share_3_or_4", "3-4-fold atoms %", 100), ("share_isolated", "isolated atoms %", 100),
           ("seconds_per_crystal", "s / crystal", 1)]
# Which generated crystals COV-P counts: those with every atom 3-4-fold, and the others (within the CDVAE cut-offs).
BONDING_COLUMNS = [("share_bonded_crystals", "crystals with every atom 3-4-fold %", 100),
                   ("match_rate_bonded", "of those, near a test crystal %", 100),
                   ("match_rate_unbonded", "of the others, near a test crystal %", 100),
                   ("nearest_struct_median_bonded", "their median structure distance to the nearest test crystal", 1)]

# Datasets whose bonds the local-structure columns describe: coordination counts neighbours within 1.8 A, a
# carbon-carbon bond (data: 100% of Carbon-24 atoms 3- or 4-fold); other chemistries leave those columns empty.
BONDED_DATASETS = ("carbon_24",)
CEILING_ROW = "training set, {num} drawn (data ceiling)"


def score_variant(folder: pathlib.Path, dataset: str, data_root: str | None, property_model: str | None,
                  test: CrystalSet) -> dict[str, Any]:
    """Return (and cache in ``folder/report.json``) the CDVAE report plus local structure of one variant."""
    path = folder / "report.json"
    if path.exists():
        return json.loads(path.read_text())
    report = run_evaluate(str(folder), dataset, property_model=property_model, data_root=data_root, progress=False)
    gen = CrystalSet.from_samples(folder)
    summary = json.loads((folder / "summary.json").read_text())
    if dataset in BONDED_DATASETS:
        coordination = crystal_coordination(gen)  # once, for both
        report.update({k: v for k, v in local_structure(gen, coordination=coordination).items() if k != "nn_distances"})
        report.update(precision_by_bonding(gen, coordination, test, dataset, data_root))
    report["seconds_per_crystal"] = summary["run_seconds"] / max(summary["num_requested"], 1)
    report["sampling_device"] = summary.get("device")
    report["atoms_per_cell"] = np.bincount(gen.num_atoms, minlength=25).tolist()
    report["density_quantiles"] = np.nanquantile(gen.densities(), [0.05, 0.25, 0.5, 0.75, 0.95]).tolist() if len(gen) else []
    path.write_text(json.dumps(report, indent=1))
    return report


def precision_by_bonding(gen: CrystalSet, coordination: list, test: CrystalSet, dataset: str,
                         data_root: str | None) -> dict[str, Any]:
    """Return the share of generated crystals with every atom 3- or 4-fold, and the COV-P match rate among them and among the rest.

    ``coordination``: :func:`crystal_coordination` of ``gen``.
    """
    scaler = metrics.CompScaler.from_json(registry.resolve_data_root(data_root) / "comp_scaler.json")
    scores = metrics.score_crystals(gen, progress=False)
    d = metrics.nearest_distances(scores, metrics.score_crystals(test, progress=False), scaler)
    s_cut, c_cut = metrics.COV_CUTOFFS["cdvae"][dataset]
    matched = np.zeros(len(gen), bool)
    nearest = np.full(len(gen), np.inf)
    if d is not None:
        matched[scores.has_fingerprint] = (d.precision_struct <= s_cut) & (d.precision_comp <= c_cut)
        nearest[scores.has_fingerprint] = d.precision_struct
    bonded = np.array([c is not None and bool(np.all((c[0] >= 3) & (c[0] <= 4))) for c in coordination], bool)
    rate = lambda sel: float(matched[sel].mean()) if sel.any() else None  # noqa: E731
    # How far the bonded crystals miss: near the cut-off, a sharper end could reach it; far, it is the structure.
    median = float(np.median(nearest[bonded])) if bonded.any() else None
    return {"share_bonded_crystals": float(bonded.mean()) if len(gen) else None,
            "match_rate_bonded": rate(bonded), "match_rate_unbonded": rate(~bonded),
            "nearest_struct_median_bonded": median if median is None or np.isfinite(median) else None}


def score_ceiling(folder: pathlib.Path, dataset: str, data_root: str | None, property_model: str | None,
                  num: int, density_edges: np.ndarray | None) -> dict[str, Any]:
    """Return (and cache in ``folder/report.json``) the report of ``num`` training crystals drawn at random, scored as generated.

    With ``density_edges`` (bonded datasets) the report also holds the drawn crystals' local structure.
    """
    path = folder / "report.json"
    if path.exists():
        return json.loads(path.read_text())
    train_csv = str(registry.split_path(dataset, "train", data_root))
    num = min(num, len(load_generated(train_csv, dataset, progress=False)))
    report = run_evaluate(train_csv, dataset, property_model=property_model, data_root=data_root, progress=False,
                          subsample=num)
    if density_edges is not None:
        drawn = load_generated(train_csv, dataset, subsample=num, progress=False)  # the same draw (same seed)
        report.update({k: v for k, v in local_structure(drawn).items() if k != "nn_distances"})
        report["by_density"] = coordination_by_density(drawn, density_edges)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def table(rows: dict[str, dict[str, Any]], data_row: dict[str, Any], columns: list = COLUMNS) -> str:
    """Return the markdown table of every scored variant (and the test split's own local structure)."""
    head = "| variant | " + " | ".join(c[1] for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name, r in [("test split (data)", data_row)] + list(rows.items()):
        cells = []
        for key, _, scale in columns:
            v = r.get(key)
            cells.append("" if v is None else f"{v * scale:.2f}" if scale == 100 else f"{v:.4g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def density_table(rows: dict[str, dict[str, Any]], data_row: dict[str, Any]) -> str:
    """Return the markdown table of 3-4-fold atoms per density bin (the test split's quartiles), with each bin's share of crystals."""
    bins = data_row["by_density"]
    names = [f"< {bins[0]['high']:.2f}"] + [f"{b['low']:.2f}-{b['high']:.2f}" for b in bins[1:-1]] + [f">= {bins[-1]['low']:.2f}"]
    lines = ["| variant | " + " | ".join(f"{n} g/cm^3" for n in names) + " |", "|" + "---|" * (len(bins) + 1)]
    for name, r in [("test split (data)", data_row)] + list(rows.items()):
        cells = [f"{100 * b['share_3_or_4']:.1f} ({100 * b['share_crystals']:.0f}%)" if b["share_3_or_4"] is not None
                 else f"- ({100 * b['share_crystals']:.0f}%)" for b in r["by_density"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finite_densities(crystals: CrystalSet) -> np.ndarray:
    """Return the densities (g/cm^3) of the cells that have a volume."""
    d = crystals.densities()
    return d[np.isfinite(d)]


def scaled_lengths(crystals: CrystalSet) -> np.ndarray:
    """Return the lattice lengths divided by N^(1/3) (the quantity the lattice decoder predicts), pooled over a, b, c."""
    return (crystals.lengths / np.cbrt(np.maximum(crystals.num_atoms, 1))[:, None]).ravel()


def plots(root: pathlib.Path, rows: dict[str, dict[str, Any]], test: CrystalSet, folders: dict[str, pathlib.Path]) -> None:
    """Write ``histograms.png``: atoms per cell, density, scaled lengths and nearest-neighbour distances vs the test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
    test_n = np.bincount(test.num_atoms, minlength=25)
    axes[0].bar(np.arange(25), test_n / test_n.sum(), color="k", alpha=0.3, label="test split")
    quantities = [(finite_densities, np.linspace(0.5, 5.0, 46)), (scaled_lengths, np.linspace(0.0, 6.0, 61)),
                  (lambda c: local_structure(c)["nn_distances"], np.linspace(0.5, 2.5, 41))]
    for ax, (fn, bins) in zip(axes[1:], quantities):
        ax.hist(np.clip(fn(test), bins[0], bins[-1]), bins=bins, density=True, color="k", alpha=0.3, label="test split")
    for name, folder in folders.items():
        gen = CrystalSet.from_samples(folder)
        n = np.bincount(gen.num_atoms, minlength=25)
        axes[0].step(np.arange(25), n / max(n.sum(), 1), where="mid", label=name)
        for ax, (fn, bins) in zip(axes[1:], quantities):
            ax.hist(np.clip(fn(gen), bins[0], bins[-1]), bins=bins, density=True, histtype="step", label=name)
    axes[0].set(xlabel="atoms per cell", ylabel="share", title="atoms per cell")
    axes[1].set(xlabel="density (g/cm^3)", ylabel="density", title="density")
    axes[2].set(xlabel="length / N^(1/3) (A)", ylabel="density", title="scaled lattice lengths (a, b, c pooled)")
    axes[3].set(xlabel="nearest-neighbour distance (A)", ylabel="density",
                title="nearest neighbour (bond cut-off 1.8 A; clipped to 0.5-2.5)")
    axes[3].axvline(1.8, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "histograms.png", dpi=120)

def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the study and print its table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="carbon_24")
    p.add_argument("--workdir", required=True, help="the trained run")
    p.add_argument("--root", required=True, help="folder of the study's outputs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--property-model", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--skip-sampling", action="store_true", help="score only the variants already sampled")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = pathlib.Path(args.root)
    folders = {}
    for name in args.variants:
        folder = root / name
        if not (folder / "summary.json").exists():
            if args.skip_sampling:
                continue
            log.info("sampling %s", name)
            sample_variant(args.workdir, name, folder, args.num, args.batch_size, 4, 0)
        folders[name] = folder
    test = (load_split(args.dataset, "test", args.data_root, with_graph=False, progress=False)).crystal_set()
    bonded = args.dataset in BONDED_DATASETS
    data_row: dict[str, Any] = {}
    edges = None
    if bonded:
        data_local = local_structure(test)
        # Density bins at the test split's quartiles: 3-4-fold atoms per bin tell sparse cells from unbuilt bonds.
        edges = np.nanquantile(test.densities(), [0.25, 0.5, 0.75])
        data_row = {"share_3_or_4": data_local["share_3_or_4"], "share_isolated": data_local["share_isolated"],
                    "by_density": coordination_by_density(test, edges)}
    log.info("scoring the data ceiling")
    ceiling = score_ceiling(root / f"data_ceiling_{args.num}", args.dataset, args.data_root, args.property_model,
                            args.num, edges)
    rows = {CEILING_ROW.format(num=ceiling["num_samples"]): ceiling}
    for name, folder in folders.items():
        log.info("scoring %s", name)
        rows[name] = score_variant(folder, args.dataset, args.data_root, args.property_model, test)
        if bonded:
            rows[name]["by_density"] = coordination_by_density(CrystalSet.from_samples(folder), edges)
    text = table(rows, data_row)
    if bonded:
        text += "\n3-4-fold atoms % by density (share of crystals in the bin):\n\n" + density_table(rows, data_row)
        text += "\nCOV-P's matches by bonding (CDVAE cut-offs):\n\n" + table(rows, {}, BONDING_COLUMNS)
    (root / "results.md").write_text(text)
    (root / "results.json").write_text(json.dumps({"rows": rows, "data": data_row}, indent=1))
    plots(root, rows, test, folders)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
