"""``symat evaluate``: score a ``samples.npz`` (ours or another model's; or a CDVAE CSV) against a dataset's test split."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from symat_jax import metrics
from symat_jax.crystal_sets import CrystalSet
from symat_jax.data import read_csv, registry
from symat_jax.files import check_new_file, write_text_atomic

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
) -> dict[str, Any]:
    """Return (and write to ``out`` as JSON) the CDVAE report of ``samples`` against ``reference`` (default: the test split)."""
    # Every input and the output path are checked before the fingerprints (minutes): no finished work is lost.
    if out:
        check_new_file(out, "--out")
    t0 = time.perf_counter()
    if str(samples).endswith(".csv"):
        # A CDVAE CSV as the generated side: the protocol's self-check (test split vs itself).
        generated = CrystalSet.from_dataset(read_csv(samples, dataset, with_graph=False, num_workers=workers,
                                                     progress=progress))
    else:
        generated = CrystalSet.from_samples(samples, batch_idx)
    scaler_path = pathlib.Path(comp_scaler) if comp_scaler else registry.resolve_data_root(data_root) / "comp_scaler.json"
    scaler = metrics.CompScaler.from_json(scaler_path)
    predictor = None
    if property_model:
        from symat_jax.property_model import load_property_model

        predictor = load_property_model(property_model)
    ref_path = pathlib.Path(reference) if reference else registry.split_path(dataset, "test", data_root)
    ref_data = read_csv(ref_path, dataset, with_graph=False, num_workers=workers, progress=progress)
    report = metrics.evaluate(
        generated, CrystalSet.from_dataset(ref_data), dataset, scaler, predictor,
        num_property_samples=num_property_samples, seed=seed, workers=workers, progress=progress,
    )
    report.update({
        "samples": str(samples),
        "reference": str(ref_path),
        "property_model": str(property_model) if property_model else None,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(report, indent=1))
    return report
