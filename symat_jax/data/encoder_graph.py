"""The CrystalNN bond graph of a clean crystal, input of the SphereNet encoder (SPEC 1 step 4)."""

from __future__ import annotations

import warnings

import numpy as np
from pymatgen.analysis.graphs import StructureGraph
from pymatgen.analysis.local_env import CrystalNN
from pymatgen.core import Structure

_CRYSTAL_NN = None


def _crystal_nn() -> CrystalNN:
    """Return the process-wide CrystalNN with the reference settings."""
    global _CRYSTAL_NN
    if _CRYSTAL_NN is None:
        _CRYSTAL_NN = CrystalNN(distance_cutoffs=None, x_diff_weight=-1, porous_adjustment=False)
    return _CRYSTAL_NN


def crystalnn_edges(structure: Structure) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(edge_index [e, 2] rows (sender, receiver), offsets [e, 3])`` of the CrystalNN graph.

    Every bond appears in both directions; the edge vector is
    ``x_receiver - x_sender - offset @ L`` (the neighbour-list convention).
    """
    with warnings.catch_warnings():
        # CrystalNN warns about missing electronegativities/radii on every call.
        warnings.simplefilter("ignore")
        graph = StructureGraph.from_local_env_strategy(structure, _crystal_nn())
    index, offsets = [], []
    for u, v, image in graph.graph.edges(data="to_jimage"):
        image = tuple(int(x) for x in image)
        # pymatgen: site v in cell `image` neighbours site u in cell 0.
        index.append((v, u))
        offsets.append(image)
        index.append((u, v))
        offsets.append(tuple(-x for x in image))
    edge_index = np.asarray(index, dtype=np.int32).reshape(-1, 2)
    edge_offsets = np.asarray(offsets, dtype=np.int32).reshape(-1, 3)
    return edge_index, edge_offsets
