"""Known datasets (the CDVAE benchmarks) and where their files live."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import urllib.error
import urllib.request

SPLITS = ("train", "val", "test")
DATA_ROOT_ENV = "SYMAT_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"
CACHE_DIR_ENV = "SYMAT_CACHE_DIR"
# Public CDVAE repository; overridable for mirrors and for offline tests.
DOWNLOAD_URL_ENV = "SYMAT_DOWNLOAD_URL"
DEFAULT_DOWNLOAD_URL = "https://raw.githubusercontent.com/txie-93/cdvae/main/data"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one benchmark dataset (SPEC 3 and 7)."""

    name: str
    max_atoms: int
    property_column: str
    score_cutoff: float  # A; the coordinate score model's graph cut-off
    max_neighbors: int = 5  # K nearest senders per receiver in the score graph


DATASETS: dict[str, DatasetInfo] = {
    "carbon_24": DatasetInfo("carbon_24", 24, "energy_per_atom", 3.0),
    "perov_5": DatasetInfo("perov_5", 5, "heat_ref", 4.0),
    "mp_20": DatasetInfo("mp_20", 20, "formation_energy_per_atom", 5.0),
}


class DatasetNotFoundError(FileNotFoundError):
    """A split is neither on disk nor downloadable; the message says where to put it."""


def get_info(dataset: str) -> DatasetInfo:
    """Return the registry entry of ``dataset`` (ValueError naming the known ones otherwise)."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}") from None


def resolve_data_root(data_root: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the data root: ``data_root``, else ``$SYMAT_DATA_ROOT``, else ``./data``."""
    if data_root is not None:
        return pathlib.Path(data_root)
    return pathlib.Path(os.environ.get(DATA_ROOT_ENV, DEFAULT_DATA_ROOT))


def split_path(
    dataset: str,
    split: str,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    timeout: float = 30.0,
) -> pathlib.Path:
    """Return the path of ``<root>/<dataset>/<split>.csv``, downloading it first when missing."""
    get_info(dataset)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = resolve_data_root(data_root)
    if root.is_file():
        raise DatasetNotFoundError(f"the data root {root} is a file; give the folder holding {dataset}/{split}.csv")
    path = root / dataset / f"{split}.csv"
    if path.exists():
        return path
    where = (
        f"Put the CDVAE file {dataset}/{split}.csv at {path} "
        f"(or point --data-root / ${DATA_ROOT_ENV} at a folder holding {dataset}/{split}.csv)."
    )
    if not download:
        raise DatasetNotFoundError(f"{path} does not exist. {where}")
    url = f"{os.environ.get(DOWNLOAD_URL_ENV, DEFAULT_DOWNLOAD_URL).rstrip('/')}/{dataset}/{split}.csv"
    tmp = path.with_suffix(".csv.part")
    made = [p for p in (root, path.parent) if not p.exists()]
    try:
        # Folders are made only once the file is in hand: a failed download leaves nothing behind.
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, ValueError) as err:
        tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise DatasetNotFoundError(
            f"{path} does not exist and downloading {url} failed ({err}). {where}"
        ) from err
    return path


def cache_folder(explicit: str | os.PathLike | None = None, beside: str | os.PathLike | None = None) -> pathlib.Path:
    """Return where derived files (parsed datasets, fingerprints) are cached: the one cache-folder policy.

    In order: ``explicit``, ``$SYMAT_CACHE_DIR``, ``.symat_cache/`` in
    ``beside`` (the data's own folder) when that is writable, else
    ``~/.cache/symat_jax``.
    """
    if explicit is not None:
        return pathlib.Path(explicit)
    if os.environ.get(CACHE_DIR_ENV):
        return pathlib.Path(os.environ[CACHE_DIR_ENV])
    if beside is not None:
        folder = pathlib.Path(beside) / ".symat_cache"
        if os.access(folder if folder.exists() else folder.parent, os.W_OK):
            return folder
    return pathlib.Path.home() / ".cache" / "symat_jax"
