"""symat-jax: a functional JAX reimplementation of SyMat, a symmetry-aware generative model for crystals.

Modules, one concept each: ``geometry`` (lattices, coordinates, wrapping),
``neighbors`` (padded periodic neighbour lists), ``graphs`` (jraph batches),
``data`` (datasets, canonical form, caching). This top level imports nothing
heavy so that data worker processes start quickly.
"""

__version__ = "0.1.0"
