"""Basis functions of SphereNet (SPEC 2) in JAX: radial, angular and torsional.

* radial: ``sin(n pi d / c)`` times the DimeNet envelope (or without it, as the
  score model's light network uses it);
* angular: normalised spherical Bessel functions ``j_l(z_ln d / c)`` times
  ``Y_l^0(angle)``, ``[num_spherical * num_radial]`` with the spherical index major;
* torsional: the same Bessel functions times the real spherical harmonics
  ``Y_l^m(angle, torsion)`` of every ``(l, m)``, arranged as the reference does
  (``[num_spherical, num_spherical, num_radial]`` flattened).

Bessel zeros and normalisers are computed once on the host with scipy; the
functions themselves are closed-form ``jnp`` (no sympy).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special

Array = jax.Array

# Power series of j_l below this argument, upward recurrence above it: the
# recurrence loses all precision at small arguments in float32.
_SERIES_TERMS = 14


def envelope(x: Array, exponent: int = 5) -> Array:
    """Return the DimeNet polynomial envelope ``u(x)`` (with its ``1/x`` term), zero for ``x >= 1``."""
    p = exponent + 1
    a = -(p + 1) * (p + 2) / 2.0
    b = p * (p + 2.0)
    c = -p * (p + 1) / 2.0
    safe = jnp.where(x > 0, x, 1.0)
    value = 1.0 / safe + a * safe ** (p - 1) + b * safe**p + c * safe ** (p + 1)
    return jnp.where((x < 1) & (x > 0), value, 0.0)


def radial_basis(dist: Array, num_radial: int, cutoff: float, envelope_exponent: int | None = 5) -> Array:
    """Return ``[..., num_radial]``: ``sin(n pi d / c)`` (n = 1..num_radial), times the envelope unless it is None."""
    x = dist / cutoff
    n = jnp.arange(1, num_radial + 1, dtype=jnp.result_type(dist, jnp.float32))
    out = jnp.sin(n * jnp.pi * x[..., None])
    if envelope_exponent is not None:
        out = out * envelope(x, envelope_exponent)[..., None]
    return out


@functools.lru_cache(maxsize=None)
def spherical_bessel_zeros(num_spherical: int, num_radial: int) -> np.ndarray:
    """Return ``[num_spherical, num_radial]`` first positive zeros ``z_ln`` of ``j_l`` (host-side, cached)."""
    # Zeros of j_l interlace those of j_{l-1}: search between consecutive ones.
    count = num_radial + num_spherical
    zeros = np.zeros((num_spherical, count))
    zeros[0] = np.arange(1, count + 1) * np.pi
    for l in range(1, num_spherical):
        f = functools.partial(scipy.special.spherical_jn, l)
        for i in range(count - l):
            zeros[l, i] = scipy.optimize.brentq(f, zeros[l - 1, i], zeros[l - 1, i + 1])
    return zeros[:, :num_radial]


@functools.lru_cache(maxsize=None)
def _bessel_normalizers(num_spherical: int, num_radial: int) -> np.ndarray:
    """Return ``[num_spherical, num_radial]`` ``sqrt(2) / |j_{l+1}(z_ln)|`` (unit norm on [0, 1] with weight x^2)."""
    z = spherical_bessel_zeros(num_spherical, num_radial)
    l = np.arange(num_spherical)[:, None]
    return np.sqrt(2.0) / np.abs(scipy.special.spherical_jn(l + 1, z))


def spherical_jn(num_spherical: int, x: Array) -> Array:
    """Return ``[num_spherical, ...]`` spherical Bessel functions ``j_l(x)``, l = 0..num_spherical-1, for ``x >= 0``."""
    x = jnp.asarray(x)
    small = x < max(2.0, float(num_spherical))
    safe = jnp.where(small, 1.0, x)
    # Upward recurrence for large arguments.
    j0 = jnp.sin(safe) / safe
    j1 = jnp.sin(safe) / safe**2 - jnp.cos(safe) / safe
    rec = [j0, j1]
    for l in range(1, num_spherical - 1):
        rec.append((2 * l + 1) / safe * rec[l] - rec[l - 1])
    # Power series for small arguments:
    # j_l(x) = x^l / (2l+1)!! * sum_k (-x^2/2)^k / (k! (2l+3)(2l+5)...(2l+2k+1)).
    xs = jnp.where(small, x, 0.0)
    y = -0.5 * xs**2
    series = []
    for l in range(num_spherical):
        term = jnp.ones_like(xs)
        total = term
        for k in range(1, _SERIES_TERMS):
            term = term * y / (k * (2 * l + 2 * k + 1))
            total = total + term
        double_fact = float(np.prod(np.arange(2 * l + 1, 0, -2)))
        series.append(xs**l / double_fact * total)
    return jnp.stack([jnp.where(small, s, r) for s, r in zip(series, rec[:num_spherical])])


def bessel_basis(dist: Array, num_spherical: int, num_radial: int, cutoff: float) -> Array:
    """Return ``[..., num_spherical, num_radial]`` normalised ``j_l(z_ln d / c)``."""
    z = jnp.asarray(spherical_bessel_zeros(num_spherical, num_radial), dtype=jnp.float32)
    norm = jnp.asarray(_bessel_normalizers(num_spherical, num_radial), dtype=jnp.float32)
    x = (dist / cutoff)[..., None, None] * z  # [..., L, N]
    # Evaluate j_l at the arguments of row l only.
    allj = spherical_jn(num_spherical, x)  # [L(order), ..., L, N]
    diag = jnp.diagonal(allj, axis1=0, axis2=-2)  # [..., N, L]: order l at row l's arguments
    return jnp.swapaxes(diag, -1, -2) * norm


def _legendre_all(num_spherical: int, z: Array) -> dict[tuple[int, int], Array]:
    """Return ``{(l, m): P_l^m(z) / (1 - z^2)^(m/2)}`` for 0 <= m <= l < num_spherical, Condon-Shortley phase included."""
    p: dict[tuple[int, int], Array] = {(0, 0): jnp.ones_like(z)}
    for m in range(num_spherical):
        if m > 0:
            p[(m, m)] = -(2 * m - 1) * p[(m - 1, m - 1)]
        if m + 1 < num_spherical:
            p[(m + 1, m)] = (2 * m + 1) * z * p[(m, m)]
        for l in range(m + 2, num_spherical):
            p[(l, m)] = ((2 * l - 1) * z * p[(l - 1, m)] - (l + m - 1) * p[(l - 2, m)]) / (l - m)
    return p


def _sph_prefactor(l: int, m: int) -> float:
    """Return the normalisation ``sqrt((2l+1)/(4 pi) (l-|m|)!/(l+|m|)!)``."""
    m = abs(m)
    return math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))


def real_sph_harm(num_spherical: int, theta: Array, phi: Array | None = None) -> Array:
    """Return real spherical harmonics ``[..., count]`` at polar angle ``theta`` and azimuth ``phi``.

    With ``phi`` None only ``m = 0`` (count = num_spherical). Otherwise all
    ``(l, m)`` (count = num_spherical^2), per ``l`` in the reference's order
    ``m = 0, cos 1..l, sin l..1`` (``sqrt 2 K P_l^m cos(m phi)`` and ``sin``).
    """
    z = jnp.cos(theta)
    sin_t = jnp.sin(theta)
    p = _legendre_all(num_spherical, z)
    out = []
    for l in range(num_spherical):
        out.append(_sph_prefactor(l, 0) * p[(l, 0)] + jnp.zeros_like(theta))
        if phi is None:
            continue
        cos_terms, sin_terms = [], []
        for m in range(1, l + 1):
            radial = math.sqrt(2.0) * _sph_prefactor(l, m) * p[(l, m)] * sin_t**m
            cos_terms.append(radial * jnp.cos(m * phi))
            sin_terms.append(radial * jnp.sin(m * phi))
        out.extend(cos_terms + sin_terms[::-1])
    return jnp.stack(out, axis=-1)


def angular_basis(dist: Array, angle: Array, num_spherical: int, num_radial: int, cutoff: float) -> Array:
    """Return ``[..., num_spherical * num_radial]``: ``j_l(z_ln d / c) Y_l^0(angle)``, spherical index major."""
    rbf = bessel_basis(dist, num_spherical, num_radial, cutoff)  # [..., L, N]
    cbf = real_sph_harm(num_spherical, angle)  # [..., L]
    return (rbf * cbf[..., None]).reshape(*rbf.shape[:-2], -1)


def torsional_basis(
    dist: Array, angle: Array, torsion: Array, num_spherical: int, num_radial: int, cutoff: float
) -> Array:
    """Return ``[..., num_spherical^2 * num_radial]``: Bessel ``[l, n]`` times real harmonics, the reference's layout.

    The reference views its ``num_spherical^2`` harmonics as a
    ``[num_spherical, num_spherical]`` grid and multiplies grid entry ``(a, b)``
    with the Bessel row ``b``; this keeps that arrangement exactly.
    """
    rbf = bessel_basis(dist, num_spherical, num_radial, cutoff)  # [..., L, N]
    cbf = real_sph_harm(num_spherical, angle, torsion)  # [..., L*L]
    cbf = cbf.reshape(*cbf.shape[:-1], num_spherical, num_spherical, 1)
    return (rbf[..., None, :, :] * cbf).reshape(*rbf.shape[:-2], -1)
