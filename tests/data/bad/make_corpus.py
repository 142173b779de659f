"""Regenerate the bad-input corpus of ``tests/test_faults.py`` from the shared Carbon-24 data.

``python tests/data/bad/make_corpus.py [SHARED_DATA_ROOT]`` rewrites the files
beside this script: data roots whose ``carbon_24/train.csv`` holds three good
rows and one bad one of each kind, broken CSV files, samples files and JSON
files. The cases that use them are listed in ``cases.json``.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import re
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
FIELDS = ["", "material_id", "cif", "energy_per_atom"]


def _rows(shared: pathlib.Path) -> list[dict[str, str]]:
    """Return the smallest good Carbon-24 training rows (few atoms: fast to load)."""
    csv.field_size_limit(1 << 30)
    with open(shared / "carbon_24" / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: (int(re.search(r"_chemical_formula_sum\s+C(\d+)", r["cif"]).group(1)), r["material_id"]))
    return rows[:8]


def _write(path: pathlib.Path, rows: list[dict[str, str]], fields: list[str] = FIELDS) -> None:
    """Write a CDVAE CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _replace_line(cif: str, start: str, new: str) -> str:
    """Return ``cif`` with the line starting with ``start`` replaced by ``new``."""
    return "\n".join(new if line.startswith(start) else line for line in cif.splitlines())


def _first_site(cif: str, edit) -> str:
    """Return ``cif`` with its first atom-site line rewritten by ``edit(fields) -> fields``."""
    lines = cif.splitlines()
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) >= 7 and parts[0] == "C" and parts[1].startswith("C"):
            lines[i] = "  " + "  ".join(edit(parts))
            break
    return "\n".join(lines)


def _supercell(cif: str) -> str:
    """Return the CIF of a 2 x 2 x 2 supercell (more atoms than Carbon-24 allows)."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    s = Structure.from_str(cif, fmt="cif")
    s.make_supercell([2, 2, 2])
    return str(CifWriter(s))


def bad_rows(good: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Return one bad row per kind, made from a good one."""
    g = dict(good[3])
    cif = g["cif"]
    return {
        "malformed_cif": dict(g, material_id="bad-malformed", cif="data_C\n_cell_length_a 2.4\nthis is not a CIF"),
        "empty_cif": dict(g, material_id="bad-empty", cif=""),
        "unknown_element": dict(g, material_id="bad-element", cif=_first_site(cif, lambda p: ["Xx", "Xx0"] + p[2:])),
        "too_many_atoms": dict(g, material_id="bad-too-many", cif=_supercell(cif)),
        "zero_length": dict(g, material_id="bad-zero-length", cif=_replace_line(cif, "_cell_length_c", "_cell_length_c   0.0")),
        "negative_length": dict(g, material_id="bad-negative", cif=_replace_line(cif, "_cell_length_a", "_cell_length_a   -2.46")),
        "flat_cell": dict(g, material_id="bad-flat", cif=_replace_line(_replace_line(_replace_line(
            cif, "_cell_angle_alpha", "_cell_angle_alpha   120.0"), "_cell_angle_beta", "_cell_angle_beta   120.0"),
            "_cell_angle_gamma", "_cell_angle_gamma   120.0")),
        "nan_coordinate": dict(g, material_id="bad-nan", cif=_first_site(cif, lambda p: p[:4] + ["nan"] + p[5:])),
        "atoms_on_top": dict(g, material_id="bad-overlap", cif=_duplicate_site(cif)),
    }


def _duplicate_site(cif: str) -> str:
    """Return ``cif`` with its first atom written twice (two atoms at one place)."""
    lines = cif.rstrip("\n").splitlines()
    for line in lines:
        parts = line.split()
        if len(parts) >= 7 and parts[0] == "C" and parts[1].startswith("C"):
            return "\n".join(lines + ["  " + "  ".join(["C", "C99"] + parts[2:])]) + "\n"
    raise ValueError("no atom site")


def main(argv: list[str]) -> int:
    """Write the corpus; return the exit status."""
    shared = pathlib.Path(argv[0]) if argv else HERE.parents[3] / "shared" / "data"
    good = _rows(shared)
    ok = good[:3]
    _write(HERE / "root_ok" / "carbon_24" / "train.csv", good[:6])
    _write(HERE / "root_ok" / "carbon_24" / "val.csv", good[6:8])
    _write(HERE / "root_ok" / "carbon_24" / "test.csv", good[:4])
    (HERE / "root_ok" / "comp_scaler.json").write_bytes((shared / "comp_scaler.json").read_bytes())
    for kind, row in bad_rows(good).items():
        _write(HERE / "rows" / f"{kind}.csv", ok + [row])
    # Kept rows a user should hear about.
    _write(HERE / "rows" / "duplicate_ids.csv", ok + [dict(good[3], material_id=ok[0]["material_id"])])
    _write(HERE / "rows" / "missing_property.csv", ok + [dict(good[3], energy_per_atom="")])
    _write(HERE / "rows" / "non_numeric_property.csv", ok + [dict(good[3], energy_per_atom="high")])
    # Files that cannot be read as a dataset at all.
    files = HERE / "files"
    files.mkdir(exist_ok=True)
    (files / "empty.csv").write_bytes(b"")
    _write(files / "header_only.csv", [])
    _write(files / "no_cif_column.csv", ok, fields=["", "material_id", "energy_per_atom"])
    _write(files / "all_rows_bad.csv", [dict(r, cif="garbage") for r in ok])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(ok)
    (files / "not_utf8.csv").write_bytes(buf.getvalue().encode()[:400] + b"\xff\xfe\xfa" + buf.getvalue().encode()[400:])
    (files / "binary.csv").write_bytes(bytes(range(256)) * 4)
    with open(shared / "perov_5" / "test.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        perov = [row for _, row in zip(range(3), reader)]
    _write(files / "perov_reference.csv", perov, fields=list(reader.fieldnames))  # a reference of another dataset
    # Samples files (the CDVAE layout: num_atoms, atom_types, frac_coords, lengths, angles).
    rng = np.random.default_rng(0)
    n = np.array([4, 6])
    sample = dict(num_atoms=n, atom_types=np.full(10, 6), frac_coords=rng.random((10, 3)),
                  lengths=np.full((2, 3), 3.0), angles=np.full((2, 3), 90.0))
    np.savez(files / "samples_ok.npz", **sample)  # a good file, for misuses of good samples
    np.savez(files / "samples_missing_key.npz", **{k: v for k, v in sample.items() if k != "angles"})
    np.savez(files / "samples_float_types.npz", **dict(sample, atom_types=np.full(10, 6.5)))
    np.savez(files / "samples_unknown_element.npz", **dict(sample, atom_types=np.full(10, 140)))
    np.savez(files / "samples_zero_crystals.npz", num_atoms=np.zeros(0, int), atom_types=np.zeros(0, int),
             frac_coords=np.zeros((0, 3)), lengths=np.zeros((0, 3)), angles=np.zeros((0, 3)))
    np.savez(files / "samples_count_mismatch.npz", **dict(sample, num_atoms=np.array([4, 7])))
    full = io.BytesIO()
    np.savez(full, **sample)
    (files / "samples_truncated.npz").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (files / "samples_text.npz").write_text("these are not samples\n")
    (files / "empty.json").write_text("")
    (files / "not_a_scaler.json").write_text(json.dumps({"means": [1, 2]}))
    (files / "plain.txt").write_text("a file where a folder is expected\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
