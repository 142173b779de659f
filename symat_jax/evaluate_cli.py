"""``symat evaluate``: score a ``samples.npz`` (ours or another model's; or a CDVAE CSV) against a dataset's test split.

``--subsample N`` scores ``N`` crystals drawn at random from the generated side.
With the training split's CSV as that side it gives the **data ceiling**: what
a generator that reproduces the training distribution exactly would score
with ``N`` samples. Coverage depends on the sample count and on how densely
the test split covers the data, so a table's targets mean little without it
(on our Perov-5 split 1,000 training crystals score COV-P 68%, see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import numpy as np
from pymatgen.core import Element

from symat_jax import metrics
from symat_jax.crystals import CrystalSet
from symat_jax.data import read_csv, registry
from symat_jax.files import check_new_file, write_text_atomic
from symat_jax.outputs import check_readable

REQUIRED_KEYS = ("num_samples", "struct_validity", "comp_validity", "cov_recall", "cov_precision",
                 "density_emd", "num_elements_emd", "property_emd")


def run_evaluate(
    samples: str,
    dataset: str,
    out: str | None = None,
    reference: str | None = None,
    property_model: str | None = None,
    data_root: str | None = None,
    comp_scaler: str | None = None,
    workers: int | None = None,
    num_property_samples: int = metrics.PROPERTY_SAMPLES,
    seed: int = 0,
    batch_idx: int = 0,
    progress: bool = True,
    subsample: int | None = None,
) -> dict[str, Any]:
    """Return (and write to ``out`` as JSON) the CDVAE report of ``samples`` against ``reference`` (default: the test split).

    ``subsample`` scores that many generated crystals drawn without replacement (seeded by ``seed``).
    """
    # Every input and the output path are checked before the fingerprints (minutes): no finished work is lost.
    if out:
        check_report_path(out, [samples, reference, property_model, comp_scaler])
    source = pathlib.Path(samples)
    if source.suffix != ".csv":
        check_readable(source.parent if source.suffix == ".npz" else source)
    t0 = time.perf_counter()
    generated = load_generated(samples, dataset, batch_idx, subsample, seed, workers, progress)
    scaler_path = pathlib.Path(comp_scaler) if comp_scaler else registry.resolve_data_root(data_root) / "comp_scaler.json"
    scaler = metrics.CompScaler.from_json(scaler_path)
    predictor = None
    if property_model:
        from symat_jax.property_model import load_property_model

        predictor = load_property_model(property_model)
    ref_path = pathlib.Path(reference) if reference else registry.split_path(dataset, "test", data_root)
    for flag, path in (("--reference", ref_path), ("--samples", pathlib.Path(samples))):
        _check_dataset_folder(flag, path, dataset)
    ref_data = read_csv(ref_path, dataset, with_graph=False, num_workers=workers, progress=progress)
    ref_set = ref_data.crystal_set()
    _check_shared_elements(samples, generated, ref_path, ref_set)
    report = metrics.evaluate(
        generated, ref_set, dataset, scaler, predictor,
        num_property_samples=num_property_samples, seed=seed, workers=workers, progress=progress,
    )
    report.update({
        "samples": str(samples),
        "subsample": subsample,
        "reference": str(ref_path),
        "property_model": str(property_model) if property_model else None,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(report, indent=1))
    return report


def _check_dataset_folder(flag: str, path: pathlib.Path, dataset: str) -> None:
    """Raise ValueError when a CSV lies in another known dataset's folder than ``--dataset`` (a mixed-up evaluation)."""
    other = path.resolve().parent.name
    if path.suffix == ".csv" and other in registry.DATASETS and other != dataset:
        raise ValueError(f"{flag} {path} is a {other} split but --dataset is {dataset}; pass --dataset {other} or "
                         "the matching file")


def _check_shared_elements(samples: str, generated: CrystalSet, ref_path: pathlib.Path, ref_set: CrystalSet) -> None:
    """Raise ValueError when the samples and the reference share no element: a reference of another dataset."""
    ours, theirs = set(np.unique(generated.atom_types).tolist()), set(np.unique(ref_set.atom_types).tolist())
    if ours and theirs and not ours & theirs:
        name = lambda zs: ", ".join(Element.from_Z(z).symbol for z in sorted(zs)[:8])  # noqa: E731
        raise ValueError(f"the samples ({samples}: {name(ours)}) and the reference ({ref_path}: {name(theirs)}) "
                         "share no element; pass the reference of the samples' dataset")


def check_report_path(out: str, inputs: list[str | None]) -> None:
    """Raise ValueError when the report's path is an input, lies inside a samples folder's files, or holds a file that is no report."""
    path = check_new_file(out, "--out").resolve()
    for given in filter(None, inputs):
        source = pathlib.Path(given).resolve()
        inside = source.is_dir() and path.parent == source and path.name in ("samples.npz", "rejects.json",
                                                                            "summary.json", ".symat.json")
        if path == source or inside:
            raise ValueError(f"--out {out} is an input of this evaluation ({given}); write the report elsewhere")
    if path.exists():
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = None
        if not isinstance(report, dict) or "cov_recall" not in report:
            raise ValueError(f"--out {out} exists and is not an evaluation report; choose another file")


def load_generated(
    samples: str,
    dataset: str,
    batch_idx: int = 0,
    subsample: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> CrystalSet:
    """Return the generated side of an evaluation: a ``samples.npz`` (file or folder) or a CDVAE CSV, optionally subsampled."""
    if str(samples).endswith(".csv"):
        # A CDVAE CSV as the generated side: the protocol's self-check (test split vs itself) or the data ceiling.
        generated = (read_csv(samples, dataset, with_graph=False, num_workers=workers,
                                                     progress=progress)).crystal_set()
    else:
        generated = CrystalSet.from_samples(samples, batch_idx)
    if subsample is None:
        return generated
    if subsample < 1 or subsample > len(generated):
        raise ValueError(f"--subsample {subsample}: {samples} holds {len(generated)} crystals")
    if generated.num_rejected:
        # Rejected cells have no coordinates to draw; a subsample would silently drop their misses.
        raise ValueError(f"{samples} counts {generated.num_rejected} rejected cells, which a subsample cannot draw; "
                         "evaluate it whole")
    return generated.subset(np.sort(np.random.default_rng(seed).choice(len(generated), subsample, replace=False)))
