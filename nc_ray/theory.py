"""Forecast of the tail's singular values before training (reconstructed; see SCIENCE.md).

Reduced model: the tail of D layers acts on features collapsed to K class means of norm r;
every tail layer has k equal singular values s (k = K for MSE, K - 1 for CE), so the
end-to-end class-direction gain is a = r s^D and the per-sample objective is

    Phi(s) = l_red(r s^D) + (lam/2) * D * k * s^2,
    l_red(a) = (a - 1)^2 / 2                                      (mse)
    l_red(a) = log(1 + (K - 1) exp(-a sqrt(K / (K - 1))))         (ce).

These formulas are our own reconstruction (the paper body was not available), so every
output carries ``label = "reconstructed"``.

Facts used below (derivations in the docstrings, checked in tests/test_theory.py):
- l_red >= 0, so Phi(s) > Phi(0) = l_red(0) whenever (lam/2) D k s^2 > l_red(0): the global
  minimizer lies in [0, s_max], s_max = sqrt(2 l_red(0) / (lam D k)).
- Phi(s) - Phi(0) is strictly increasing in lam for every s > 0, so s* = 0 exactly on
  lam >= lam_crit: the phase boundary is a single threshold, found by bisection.
- Stationary points s > 0 solve lam k = psi(s) := -l_red'(a) r s^(D-2), a = r s^D; -l_red' is
  log-concave (1 - a, or a sigmoid in a), so psi is unimodal and Phi has at most one local
  minimum on s > 0: the grid only has to locate that one basin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

LABEL = "reconstructed"
LOSSES = ("mse", "ce")

# Geometric grid on s_max * [1e-12, 1] (steps of ~0.7%): resolves a positive minimizer down
# to 1e-12 s_max (for D = 2 that is within ~1e-24 relative of lam_crit, far below float noise).
_UNIT_GRID = np.geomspace(1e-12, 1.0, 4000)
# Each zoom keeps 2 of ZOOM_POINTS - 1 intervals: the ~1.4% bracket shrinks by (2/32)^7 to
# ~5e-11 relative, below the float resolution of a flat minimum (~1e-8).
ZOOM_POINTS = 33
ZOOM_LEVELS = 7
CHUNK = 512  # rows of the (elements x grid) matrix evaluated at once, bounds memory
RTOL_CRIT = 1e-8
MAX_EXPANSIONS = 64  # 10^64 in lam: a bracket that is still open means a bug, not data


@dataclass(frozen=True, eq=False)
class Forecast:
    """Forecast s* = argmin_{s >= 0} Phi(s), broadcast over (weight_decay, tail_depth).

    Array fields share one shape: ``s_star`` (global minimizer, 0 when the zero function
    wins), ``k`` (number of equal singular values), ``objective`` = Phi(s*), ``gain`` = r s*^D.
    """

    weight_decay: np.ndarray
    tail_depth: np.ndarray
    s_star: np.ndarray
    k: np.ndarray
    objective: np.ndarray
    gain: np.ndarray
    n_classes: int
    radius: float
    loss: str
    label: str = field(default=LABEL)

    _ARRAYS: ClassVar[tuple[str, ...]] = (
        "weight_decay", "tail_depth", "s_star", "k", "objective", "gain"
    )
    _SCALARS: ClassVar[tuple[str, ...]] = ("n_classes", "radius", "loss", "label")

    def to_dict(self) -> dict[str, Any]:
        """Columns as JSON-ready lists plus the scalar fields (``label`` included)."""
        out: dict[str, Any] = {name: getattr(self, name).tolist() for name in self._ARRAYS}
        out.update({name: getattr(self, name) for name in self._SCALARS})
        return out

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per broadcast element, each carrying ``label``."""
        columns = [getattr(self, name).ravel().tolist() for name in self._ARRAYS]
        scalars = {name: getattr(self, name) for name in self._SCALARS}
        return [dict(zip(self._ARRAYS, row), **scalars) for row in zip(*columns)]


# ----------------------------------------------------------------------------- validation


def _check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def _check_positive(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.size == 0 or not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return arr


def _check_depth(tail_depth: Any) -> np.ndarray:
    arr = np.asarray(tail_depth)
    ok = arr.size > 0 and np.issubdtype(arr.dtype, np.number) and not np.issubdtype(
        arr.dtype, np.bool_
    )
    if not ok or not np.all((arr >= 1) & (arr == np.round(arr))):
        raise ValueError(f"tail_depth must be an integer >= 1, got {tail_depth!r}")
    return arr.astype(np.int64)


def _check_classes(n_classes: Any) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    return int(n_classes)


def _check_scalar_radius(radius: Any) -> float:
    arr = _check_positive("radius", radius)
    if arr.ndim != 0:
        raise ValueError(f"radius must be a scalar, got {radius!r}")
    return float(arr)


def _n_values(n_classes: int, loss: str) -> int:
    """k: K singular values for MSE's orthogonal frame, K - 1 for CE's simplex ETF."""
    return n_classes if loss == "mse" else n_classes - 1


def _loss_at_zero(n_classes: int, loss: str) -> float:
    return 0.5 if loss == "mse" else float(np.log(n_classes))


# ------------------------------------------------------------------------------ objective


def _reduced_loss(a: np.ndarray, n_classes: int, loss: str) -> np.ndarray:
    if loss == "mse":
        return 0.5 * (a - 1.0) ** 2
    c = math.sqrt(n_classes / (n_classes - 1))
    return np.logaddexp(0.0, math.log(n_classes - 1) - a * c)  # log(1 + e^x) without overflow


def _excess_fn(lam, depth, n_classes: int, radius: float, loss: str) -> Callable:
    """s -> Phi(s) - Phi(0); l_red(a) - l_red(0) is formed without cancellation so that the
    shallow basins near s = 0 (D = 2 just below lam_crit) are resolved. Scalars are hoisted
    out of the closure because it is called ~50 times per forecast."""
    reg = 0.5 * lam * depth * _n_values(n_classes, loss)
    if loss == "mse":

        def excess(s):
            a = radius * s**depth
            return a * (0.5 * a - 1.0) + reg * s * s

    else:
        c = math.sqrt(n_classes / (n_classes - 1)) * radius
        w = (n_classes - 1) / n_classes

        def excess(s):
            return np.log1p(w * np.expm1(-c * s**depth)) + reg * s * s

    return excess


def reduced_objective(
    s: Any, weight_decay: Any, tail_depth: Any, n_classes: int, radius: float, loss: str
) -> np.ndarray:
    """Phi(s) = l_red(r s^D) + (lam/2) D k s^2, broadcast over s, weight_decay, tail_depth."""
    loss = _check_loss(loss)
    n_classes = _check_classes(n_classes)
    radius = _check_scalar_radius(radius)
    lam = _check_positive("weight_decay", weight_decay)
    depth = _check_depth(tail_depth)
    s = np.asarray(s, dtype=float)
    if not np.all(s >= 0):
        raise ValueError(f"s must be >= 0, got {s!r}")
    k = _n_values(n_classes, loss)
    with np.errstate(over="ignore"):  # s^D -> inf gives Phi = inf (mse) or the reg term (ce)
        return _reduced_loss(radius * s**depth, n_classes, loss) + 0.5 * lam * depth * k * s**2


# ------------------------------------------------------------------------------- forecast


def _positive_minimizer(lam, depth, n_classes, radius, loss):
    """Best s > 0 and Phi(s) - Phi(0) there, for 1-D arrays lam, depth (same length).

    Grid on [1e-12 s_max, s_max], take the lowest interior grid local minimum (there is at
    most one positive basin), refine it by zoom grids between its grid neighbours.
    Rows without an interior local minimum return (nan, +inf): no positive candidate.
    """
    s_max = np.sqrt(2 * _loss_at_zero(n_classes, loss) / (lam * depth * _n_values(n_classes, loss)))
    s_best = np.full(lam.shape, np.nan)
    d_best = np.full(lam.shape, np.inf)
    zoom = np.linspace(0.0, 1.0, ZOOM_POINTS)
    for start in range(0, lam.size, CHUNK):
        rows = slice(start, start + CHUNK)
        excess = _excess_fn(lam[rows, None], depth[rows, None], n_classes, radius, loss)
        grid = s_max[rows, None] * _UNIT_GRID
        d = excess(grid)
        mid = d[:, 1:-1]
        local = (mid <= d[:, :-2]) & (mid <= d[:, 2:]) & np.isfinite(mid)
        i = np.argmin(np.where(local, mid, np.inf), axis=1) + 1
        row = np.arange(grid.shape[0])
        lo, hi = grid[row, i - 1], grid[row, i + 1]
        # Refine by repeated zoom grids on the bracket around the current best point.
        for _ in range(ZOOM_LEVELS):
            grid = lo[:, None] + (hi - lo)[:, None] * zoom
            j = np.clip(np.argmin(excess(grid), axis=1), 1, ZOOM_POINTS - 2)
            lo, hi = grid[row, j - 1], grid[row, j + 1]
        s = 0.5 * (lo + hi)
        found = local.any(axis=1)
        s_best[rows] = np.where(found, s, np.nan)
        d_best[rows] = np.where(found, excess(s[:, None])[:, 0], np.inf)
    return s_best, d_best


def forecast(
    weight_decay: Any, tail_depth: Any, n_classes: int, radius: float, loss: str
) -> Forecast:
    """Global minimizer s* of Phi over s >= 0, broadcast over weight_decay and tail_depth.

    s* = 0 whenever Phi(0) <= Phi(best positive candidate) (the zero function wins ties).
    The search interval is [0, s_max], s_max = sqrt(2 l_red(0) / (lam D k)), because
    l_red >= 0 makes Phi(s) > Phi(0) beyond it.
    """
    loss = _check_loss(loss)
    n_classes = _check_classes(n_classes)
    radius = _check_scalar_radius(radius)
    lam, depth = np.broadcast_arrays(
        _check_positive("weight_decay", weight_decay), _check_depth(tail_depth)
    )
    with np.errstate(over="ignore"):  # s^D -> inf only where Phi is far above Phi(0) anyway
        s_pos, d_pos = _positive_minimizer(lam.ravel(), depth.ravel(), n_classes, radius, loss)
    s_star = np.where(d_pos < 0, s_pos, 0.0).reshape(lam.shape)
    arrays = {
        "weight_decay": lam.astype(float),
        "tail_depth": depth.astype(np.int64),
        "s_star": s_star,
        "k": np.full(lam.shape, _n_values(n_classes, loss), dtype=np.int64),
        "objective": reduced_objective(s_star, lam, depth, n_classes, radius, loss),
        "gain": radius * s_star**depth,
    }
    for arr in arrays.values():
        arr.setflags(write=False)  # the dataclass is frozen; keep its arrays so too
    return Forecast(**arrays, n_classes=n_classes, radius=radius, loss=loss)


# ------------------------------------------------------------------------------- lam_crit


def critical_weight_decay(
    tail_depth: Any, n_classes: int, radius: float, loss: str
) -> np.ndarray:
    """lam_crit(D): s* = 0 for lam >= lam_crit and s* > 0 below it (relative tol 1e-8).

    Equivalently lam_crit = sup_{s>0} 2 (l_red(0) - l_red(r s^D)) / (D k s^2), whence
    lam_crit(D, r) = r^(2/D) lam_crit(D, 1). Closed forms: D = 1 -> inf (Phi is convex with
    Phi'(0) = r l_red'(0) < 0, so s* > 0 for every lam); D = 2 -> r |l_red'(0)| / k, i.e.
    r / K (mse) and r / sqrt(K (K - 1)) (ce), because Phi is convex in t = s^2. For D >= 3
    the transition is first order; all D are found alike, by log-space bisection on the
    decision rule ``forecast`` uses, so the two can never disagree beyond the tolerance.
    """
    loss = _check_loss(loss)
    n_classes = _check_classes(n_classes)
    radius = _check_scalar_radius(radius)
    depth = _check_depth(tail_depth).ravel()
    out = np.full(depth.shape, np.inf)
    deep = depth >= 2
    if deep.any():
        out[deep] = _bisect_critical(depth[deep], n_classes, radius, loss)
    return out.reshape(np.shape(tail_depth))


def _bisect_critical(depth: np.ndarray, n_classes: int, radius: float, loss: str) -> np.ndarray:
    def is_zero(lam: np.ndarray) -> np.ndarray:
        return forecast(lam, depth, n_classes, radius, loss).s_star == 0.0

    # Expand by decades from lam = 1 until the decision flips (it flips exactly once).
    lam = np.ones(depth.shape)
    start_zero = is_zero(lam)
    step = np.where(start_zero, 0.1, 10.0)
    lo, hi = lam.copy(), lam.copy()
    still_open = np.ones(depth.shape, dtype=bool)
    for _ in range(MAX_EXPANSIONS):
        nxt = lam * step
        flipped = still_open & (is_zero(nxt) != start_zero)
        lo = np.where(flipped, np.minimum(lam, nxt), lo)
        hi = np.where(flipped, np.maximum(lam, nxt), hi)
        still_open &= ~flipped
        if not still_open.any():
            break
        lam = nxt
    else:
        raise RuntimeError(f"no bracket for lam_crit at tail_depth={depth[still_open]}")
    while np.max(hi / lo) - 1.0 > RTOL_CRIT:
        mid = np.sqrt(lo * hi)
        zero = is_zero(mid)
        lo, hi = np.where(zero, lo, mid), np.where(zero, mid, hi)
    return hi


# --------------------------------------------------------------------------------- radius


def class_mean_radius(features: Any, labels: Any, centered: bool) -> float:
    """r = mean_c ||mu_c - mu_G|| (centered) or mean_c ||mu_c|| (uncentered).

    features: (N, n); labels: (N,). mu_G is the mean over all samples. CE's collapsed means
    form a simplex ETF, which is centered; MSE's form an orthogonal frame, which is not, so
    callers pass centered=(loss == "ce") and record where r came from ("data" or "layer m").
    """
    z = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, n) array, got shape {z.shape}")
    if y.shape != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},), got {y.shape}")
    classes, index = np.unique(y, return_inverse=True)
    counts = np.bincount(index, minlength=classes.size)
    sums = np.zeros((classes.size, z.shape[1]))
    np.add.at(sums, index, z)
    means = sums / counts[:, None]
    if centered:
        means = means - z.mean(axis=0)
    return float(np.linalg.norm(means, axis=1).mean())
