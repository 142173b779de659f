"""``symat optimize``: steer test crystals' latents towards a lower property, decode the trajectories, score them (SPEC 6).

The latents of the first ``num`` test crystals (posterior means) take Adam
steps down the run's property head (:mod:`symat_jax.property_head`); ``z`` at
every ``every``-th step is decoded through a sampler preset (composition,
lattice, Langevin positions, then the preset's host stages). The independent
property model (``symat train-property``) judges every decoded crystal; per
start the best valid one counts (CDVAE protocol). Scored twice and labelled:
the chain's own crystals (``raw``: chain and retry) and the preset's output
(``final``: after its relaxation and hops where it has them). For Carbon-24
Tersoff's energy after relaxation is a second judge.

``OUT``: ``decodes/`` (one file set per saved step, written as it finishes:
a killed run resumes there), then ``optimized.npz`` / ``optimized_raw.npz``
(CDVAE layout plus ``start`` and ``step`` per crystal), ``trajectory.npz``
(the saved ``z`` and the head's prediction), ``cif/``, ``rejects.json``,
``optimize.json`` (the report), ``optimize.png`` and ``timings.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
from pymatgen.io.cif import CifWriter
from tqdm.auto import tqdm

from symat_jax import configs, metrics, sampling
from symat_jax.configs import OptimizeConfig, RelaxConfig, SamplerPreset
from symat_jax.crystals import CrystalSet
from symat_jax.data import load_split, registry
from symat_jax.data.canonical import to_structure
from symat_jax.optimize import (CDVAE_THRESHOLDS, best_per_start, optimize, percentile_thresholds,
                                success_rates)
from symat_jax.outputs import OutputFolder, check_output
from symat_jax.tersoff import CARBON_DATASETS

log = logging.getLogger(__name__)
CDVAE_KEYS = ("num_atoms", "atom_types", "frac_coords", "lengths", "angles")


def _savez_atomic(path: pathlib.Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` whole or not at all (a kill leaves no half file that a resume would trust)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def _crystals(arrays: dict[str, np.ndarray]) -> CrystalSet:
    """Return the crystal set of a decoded step's arrays (the CDVAE layout plus start and step)."""
    return CrystalSet(*(np.asarray(arrays[k]) for k in CDVAE_KEYS))


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the per-step arrays concatenated into one set."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _decode_step(run: sampling.SamplingRun, preset: SamplerPreset, z: np.ndarray, step: int, folder: pathlib.Path,
                 seed: int, batch_size: int, progress: bool) -> None:
    """Decode one saved step's latents through the preset and write its files (the final set last: the step is done)."""
    c, p = run.model.latent_comp, run.model.latent_pos
    latents = sampling.Latents(z[:, :c], z[:, c : c + p], z[:, c + p :])
    samples = sampling.sample_from_latents(run, preset, latents, seed, batch_size=batch_size, progress=progress)
    rejects = [dict(r, start=int(r["index"]), step=step) for r in samples.rejects]
    (folder / f"step_{step:06d}.rejects.json").write_text(json.dumps(rejects))
    # The CDVAE layout with each crystal's start (its sample index) and step; raw: as the chain and retry left it.
    for name, which in ((f"step_{step:06d}.raw.npz", "unrelaxed" if samples.unrelaxed is not None else "crystals"),
                        (f"step_{step:06d}.npz", "crystals")):
        arrays = samples.cdvae(which)
        arrays["start"] = arrays.pop("sample_index").astype(np.int64)
        _savez_atomic(folder / name, **arrays, step=np.full(len(arrays["start"]), step, np.int64))


def _load_step(folder: pathlib.Path, step: int) -> tuple[dict, dict, list]:
    """Return ``(final arrays, raw arrays, rejects)`` of one decoded step."""
    with np.load(folder / f"step_{step:06d}.npz") as f, np.load(folder / f"step_{step:06d}.raw.npz") as r:
        final, raw = {k: f[k] for k in f.files}, {k: r[k] for k in r.files}
    return final, raw, json.loads((folder / f"step_{step:06d}.rejects.json").read_text())


def check_optimize_inputs(workdir: str, property_model: str) -> tuple[Any, Any, dict[str, Any], Any]:
    """Return ``(the run's training config, head, its report, property model)`` after checking the inputs of ``symat optimize``."""
    from symat_jax.property_head import load_head
    from symat_jax.property_model import load_property_model
    from symat_jax.run import read_config

    train_config = read_config(workdir)
    dataset = train_config.dataset
    head, head_report = load_head(workdir)
    if head.dataset != dataset:
        raise ValueError(f"the property head of {workdir} predicts {head.dataset}, but the run is {dataset}; refit it "
                         f"with `symat fit-head --workdir {workdir}`")
    predictor = load_property_model(property_model)
    if predictor.config.dataset != dataset:
        raise ValueError(f"--property-model {property_model} judges {predictor.config.dataset}, but {workdir} is a "
                         f"{dataset} run; pass a property model of {dataset}")
    return train_config, head, head_report, predictor


def check_head_latents(head_report: dict[str, Any], run: sampling.SamplingRun, preset: SamplerPreset,
                       workdir: str) -> None:
    """Raise ValueError when the head was fitted on other latents than the preset's checkpoint and weights encode."""
    fitted = (head_report.get("checkpoint_epoch"), head_report.get("weights"))
    decoded = (run.epochs.get("checkpoint_epoch"), run.epochs.get("weights"))
    if fitted != decoded:
        raise ValueError(f"the property head of {workdir} was fitted on the latents of epoch {fitted[0]} ({fitted[1]} "
                         f"weights) but the preset {preset.name} encodes and decodes with epoch {decoded[0]} "
                         f"({decoded[1]}); refit it with `symat fit-head --workdir {workdir} --preset {preset.name}`")


def run_optimize(workdir: str, property_model: str, num: int, out: str, *,
                 config: OptimizeConfig = OptimizeConfig(), preset: SamplerPreset | str = "default", seed: int = 0,
                 batch_size: int = 256, data_root: str | None = None, overwrite: bool = False,
                 tersoff: bool | None = None, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Optimise the latents of ``num`` test crystals, decode their trajectories into ``out`` and return the report.

    Rerun with the same arguments after a kill, it resumes from the last
    decoded step and ends with the same report. ``tersoff`` (default: on for
    carbon) adds the second judge.
    """
    check_output(out, inputs=[workdir, property_model], overwrite=overwrite)
    train_config, head, head_report, predictor = check_optimize_inputs(workdir, property_model)
    dataset = train_config.dataset
    preset = configs.get_sampler_preset(dataset, preset) if isinstance(preset, str) else preset
    tersoff = dataset in CARBON_DATASETS if tersoff is None else tersoff
    if tersoff and dataset not in CARBON_DATASETS:
        raise ValueError(f"Tersoff's potential knows carbon only, not {dataset}; drop --tersoff")
    test = load_split(dataset, "test", data_root, progress=progress)
    if num > len(test):
        raise ValueError(f"--num {num}: the test split of {dataset} holds {len(test)} crystals")
    request = {"command": "symat optimize", "workdir": str(pathlib.Path(workdir).resolve()),
               "property_model": str(pathlib.Path(property_model).resolve()), "num": num, "seed": seed,
               "batch_size": batch_size, "optimize": dataclasses.asdict(config), "preset": preset.to_dict(),
               "tersoff": tersoff}
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with OutputFolder(out, command="symat optimize", inputs=[workdir, property_model], overwrite=overwrite,
                      record={"workdir": str(workdir), "preset": preset.name, "seed": seed, "num": num},
                      resume=request) as tmp:
        from symat_jax.latents import encode_means

        run = sampling.load_sampling_run(workdir, dataclasses.replace(preset, prior=configs.StandardPrior()))
        check_head_latents(head_report, run, preset, workdir)
        starts = test.subset(np.arange(num))
        z0 = encode_means(run.params, train_config, run.statics, starts)
        traj = jax.jit(lambda z: optimize(head.predict, z, config))(z0)
        z, steps = np.asarray(traj.z), [int(s) for s in traj.steps]
        _savez_atomic(tmp / "trajectory.npz", z=z, head_prediction=np.asarray(traj.value), steps=np.asarray(steps))
        timings["trajectory_seconds"] = time.perf_counter() - t0
        folder = tmp / "decodes"
        folder.mkdir(exist_ok=True)
        done = [s for s in steps if (folder / f"step_{s:06d}.npz").exists()]
        if done:
            log.info("resuming: %d of %d decodes were finished", len(done), len(steps))
        for k, step in enumerate(tqdm(steps, desc="decodes", unit="step", disable=not progress)):
            if step not in done:
                _decode_step(run, preset, z[k], step, folder, seed, batch_size, progress)
        timings["decode_seconds"] = time.perf_counter() - t0 - timings["trajectory_seconds"]
        loaded = [_load_step(folder, s) for s in steps]
        final, raw = _concat([x[0] for x in loaded]), _concat([x[1] for x in loaded])
        rejects = [r for x in loaded for r in x[2]]
        np.savez(tmp / "optimized.npz", **final)
        np.savez(tmp / "optimized_raw.npz", **raw)
        (tmp / "rejects.json").write_text(json.dumps(rejects, indent=1))
        (tmp / "cif").mkdir(exist_ok=True)
        crystals = _crystals(final)
        for k in range(len(crystals)):
            CifWriter(to_structure(*crystals.crystal(k))).write_file(
                tmp / "cif" / f"start{int(final['start'][k]):04d}_step{int(final['step'][k]):06d}.cif")
        t1 = time.perf_counter()
        report = score_optimized(final, raw, starts.crystal_set(), starts.properties, num, dataset, predictor,
                                 data_root=data_root, workers=workers, progress=progress, tersoff=tersoff)
        report.update({"num_starts": num, "steps": steps, "preset": preset.name, "seed": seed,
                       "optimize": dataclasses.asdict(config), "num_rejected": len(rejects),
                       "head_prediction_median": np.median(np.asarray(traj.value), axis=1).round(5).tolist()})
        timings["score_seconds"] = time.perf_counter() - t1
        (tmp / "optimize.json").write_text(json.dumps(report, indent=1))
        plot_optimized(report, tmp / "optimize.png")
        (tmp / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1))
    return report


def _distances(best_rows: np.ndarray, scores: metrics.CrystalScores, start_scores: metrics.CrystalScores,
               scaler: metrics.CompScaler | None) -> dict[str, float | None]:
    """Return the median structure and composition fingerprint distances of each start's best crystal from its start."""
    have = np.flatnonzero(best_rows >= 0)
    if not len(have):
        return {"struct_median": None, "comp_median": None}
    rows = best_rows[have]
    struct = np.linalg.norm(scores.struct_fp[rows] - start_scores.struct_fp[have], axis=1)
    out = {"struct_median": _median(struct), "comp_median": None}
    if scaler is not None:
        comp = np.linalg.norm(scaler.transform(scores.comp_fp[rows]) - scaler.transform(start_scores.comp_fp[have]), axis=1)
        out["comp_median"] = _median(comp)
    return out


def _median(x: np.ndarray) -> float | None:
    """Return the median of the finite values of ``x`` (None where there are none: JSON has no NaN)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else None


def _unique_count(crystals: CrystalSet, rows: np.ndarray) -> int:
    """Return how many of the crystals at ``rows`` are distinct (pymatgen ``StructureMatcher``, default tolerances)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    structures = [to_structure(*crystals.crystal(int(r))) for r in rows if r >= 0]
    if not structures:
        return 0
    return len(StructureMatcher().group_structures(structures))


def score_optimized(final: dict[str, np.ndarray], raw: dict[str, np.ndarray], starts: CrystalSet,
                    start_property: np.ndarray, num: int, dataset: str, predictor: Any, *,
                    data_root: str | None = None, workers: int | None = None, progress: bool = True,
                    tersoff: bool = False) -> dict[str, Any]:
    """Return the CDVAE-protocol report of decoded trajectories: SR5/10/15, validity, distances, uniqueness (and Tersoff)."""
    train = load_split(dataset, "train", data_root, with_graph=False, progress=progress)
    ours = percentile_thresholds(train.properties)
    scaler_path = registry.resolve_data_root(data_root) / "comp_scaler.json"
    scaler = metrics.CompScaler.from_json(scaler_path) if scaler_path.exists() else None
    start_scores = metrics.score_crystals(starts, workers=workers, progress=progress, desc="start fingerprints")
    report: dict[str, Any] = {"dataset": dataset, "thresholds": {"ours": ours, "cdvae": CDVAE_THRESHOLDS.get(dataset)},
                              "start_property_median": _median(start_property)}
    for label, arrays in (("raw", raw), ("final", final)):
        if label == "final" and all(np.array_equal(raw[k], final[k]) for k in final):
            report["final"] = {**report["raw"], "same_as_raw": True}  # the preset has no physics stage
            continue
        crystals = _crystals(arrays)
        scores = metrics.score_crystals(crystals, workers=workers, progress=progress, desc=f"{label} fingerprints")
        predicted = predictor(crystals, progress=progress)
        later = arrays["step"] > 0  # the start itself is the reference, not an optimised crystal
        best, rows = best_per_start(arrays["start"], predicted, scores.valid & later, num)
        entry = {
            "validity": float(np.mean(scores.valid[later])) if later.any() else None,
            "num_decoded": int(later.sum()),
            "sr_ours": success_rates(best, ours),
            "sr_cdvae": success_rates(best, CDVAE_THRESHOLDS[dataset]) if dataset in CDVAE_THRESHOLDS else None,
            "best_property_median": _median(best),
            "predicted_by_step": _by_step(arrays["step"], predicted, scores.valid),
            "distance_from_start": _distances(rows, scores, start_scores, scaler),
            "unique_best": _unique_count(crystals, rows),
            "starts_with_a_valid_crystal": int((rows >= 0).sum()),
        }
        entry["distance_from_start"]["share_same_composition"] = _same_composition(crystals, rows, starts)
        if tersoff:
            entry["tersoff"] = _tersoff_judge(crystals, arrays, predicted, scores.valid & later, rows, starts, num,
                                              progress)
        report[label] = entry
    return report


def _same_composition(crystals: CrystalSet, rows: np.ndarray, starts: CrystalSet) -> float | None:
    """Return the share of starts whose best crystal keeps the start's composition (atom types and counts)."""
    have = np.flatnonzero(rows >= 0)
    if not len(have):
        return None
    same = [sorted(crystals.crystal(int(rows[s]))[0].tolist()) == sorted(starts.crystal(int(s))[0].tolist()) for s in have]
    return float(np.mean(same))


def _by_step(step: np.ndarray, value: np.ndarray, valid: np.ndarray) -> dict[str, list]:
    """Return the quartiles of ``value`` over the valid crystals of each step (for the plot)."""
    out: dict[str, list] = {"step": [], "q25": [], "median": [], "q75": []}
    for s in np.unique(step):
        v = value[(step == s) & valid & np.isfinite(value)]
        out["step"].append(int(s))
        for name, q in (("q25", 25), ("median", 50), ("q75", 75)):
            out[name].append(float(np.percentile(v, q)) if len(v) else None)
    return out


def _tersoff_judge(crystals: CrystalSet, arrays: dict[str, np.ndarray], predicted: np.ndarray, valid: np.ndarray,
                   rows: np.ndarray, starts: CrystalSet, num: int, progress: bool) -> dict[str, Any]:
    """Return Tersoff energies per atom after relaxation beside the predictions: rank correlation, starts improved."""
    from scipy.stats import spearmanr

    from symat_jax.sampling import relax_crystals

    relaxed = relax_crystals(crystals, RelaxConfig(), progress=progress, strict=False)
    energy = np.asarray(relaxed.arrays["relax"]["energy_per_atom"], float)
    kept = np.asarray(relaxed.arrays["relax"]["kept"], bool)
    start_relaxed = relax_crystals(starts, RelaxConfig(), progress=progress, strict=False)
    start_energy = np.asarray(start_relaxed.arrays["relax"]["energy_per_atom"], float)
    start_kept = np.asarray(start_relaxed.arrays["relax"]["kept"], bool)
    both = valid & kept & np.isfinite(energy) & np.isfinite(predicted)
    rho = float(spearmanr(predicted[both], energy[both]).statistic) if both.sum() > 2 else float("nan")
    rho = rho if np.isfinite(rho) else None
    have = np.flatnonzero(rows >= 0)
    lower = [bool(energy[rows[s]] < start_energy[s]) for s in have if kept[rows[s]] and start_kept[s]]
    return {"spearman_predicted_vs_tersoff": rho, "num_compared": int(both.sum()),
            "share_best_below_start": float(np.sum(lower) / num),
            "start_energy_median": _median(start_energy[start_kept]),
            "best_energy_median": _median(energy[rows[have]][kept[rows[have]]]),
            "energy_by_step": _by_step(arrays["step"], energy, kept)}


def plot_optimized(report: dict[str, Any], path: pathlib.Path) -> None:
    """Write the report's trajectories as a PNG: the judge's prediction by step (and Tersoff's energy for carbon)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("final", "predicted_by_step", f"predicted property ({report['dataset']})")]
    if "tersoff" in report["final"]:
        panels.append(("final", "tersoff", "Tersoff energy per atom after relaxation (eV)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, key, title) in zip(axes[0], panels):
        for which, colour in (("raw", "tab:blue"), ("final", "tab:orange")):
            d = report[which][key] if key != "tersoff" else report[which].get("tersoff", {}).get("energy_by_step")
            if not d:
                continue
            x = np.asarray(d["step"])
            med = np.asarray([np.nan if v is None else v for v in d["median"]], float)
            lo = np.asarray([np.nan if v is None else v for v in d["q25"]], float)
            hi = np.asarray([np.nan if v is None else v for v in d["q75"]], float)
            ax.plot(x, med, color=colour, label=f"{which}: median over starts")
            ax.fill_between(x, lo, hi, color=colour, alpha=0.2)
        if key == "predicted_by_step":
            for t, pct in zip(report["thresholds"]["ours"], (5, 10, 15)):
                ax.axhline(t, color="grey", ls=":", lw=1)
                ax.text(x[-1] if len(x) else 0, t, f" {pct}th pct (train)", va="center", fontsize=7)
        ax.set_xlabel("gradient step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
