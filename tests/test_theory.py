"""Tests for the reconstructed singular-value forecast (nc_ray.theory)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nc_ray.theory import (
    LABEL,
    Forecast,
    class_mean_radius,
    critical_weight_decay,
    forecast,
    reduced_objective,
)

LOSSES = ("mse", "ce")


def _k(n_classes: int, loss: str) -> int:
    return n_classes if loss == "mse" else n_classes - 1


def _loss0(n_classes: int, loss: str) -> float:
    return 0.5 if loss == "mse" else float(np.log(n_classes))


def _bound(lam: float, depth: int, n_classes: int, loss: str) -> float:
    return float(np.sqrt(2 * _loss0(n_classes, loss) / (lam * depth * _k(n_classes, loss))))


def _sup_critical(depth, n_classes: int, radius: float, loss: str) -> np.ndarray:
    """lam_crit = sup_{s>0} 2 (l(0) - l(r s^D)) / (D k s^2) on a log grid, with l written
    out independently of nc_ray.theory (D = 2's sup is the s -> 0 limit: grid error ~1e-8)."""
    depth = np.asarray(depth)
    s = np.geomspace(1e-4, 1e2, 200_001)[:, None]
    with np.errstate(over="ignore"):
        a = radius * s**depth
    if loss == "mse":
        drop = a - a**2 / 2
    else:
        c = np.sqrt(n_classes / (n_classes - 1))
        drop = np.log(n_classes) - np.log1p((n_classes - 1) * np.exp(-a * c))
    ratio = 2 * drop / (depth * _k(n_classes, loss) * s**2)
    return np.where(depth == 1, np.inf, ratio.max(axis=0))


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("n_classes, radius", [(2, 1.0), (10, 1.0), (10, 3.0), (100, 0.5)])
@pytest.mark.parametrize("frac", [0.01, 0.3, 0.9, 0.999, 1.001, 2.0, 50.0])
def test_mse_depth2_closed_form(n_classes, radius, frac):
    # Phi = (r t - 1)^2 / 2 + lam K t with t = s^2 is convex in t: t* = max(0, (1 - lam K / r) / r).
    lam = frac * radius / n_classes
    s = forecast(lam, 2, n_classes, radius, "mse").s_star.item()
    expected = max(0.0, (1 - lam * n_classes / radius) / radius)
    if expected == 0.0:
        assert s == 0.0
    else:
        assert s**2 == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n_classes, radius", [(2, 1.0), (10, 0.2), (50, 4.0)])
def test_mse_depth1_closed_form(n_classes, radius):
    # One tail layer: Phi = (r s - 1)^2 / 2 + lam K s^2 / 2, minimizer r / (r^2 + lam K) > 0.
    lam = np.geomspace(1e-4, 1e2, 9)
    s = forecast(lam, 1, n_classes, radius, "mse").s_star
    np.testing.assert_allclose(s, radius / (radius**2 + lam * n_classes), rtol=1e-6)


@pytest.mark.parametrize("n_classes, radius", [(2, 1.0), (10, 1.0), (10, 0.01), (37, 7.0)])
def test_critical_depth2_closed_forms_and_depth1_infinite(n_classes, radius):
    crit = critical_weight_decay([1, 2], n_classes, radius, "mse")
    assert crit[0] == np.inf
    assert crit[1] == pytest.approx(radius / n_classes, rel=1e-7)
    crit = critical_weight_decay([1, 2], n_classes, radius, "ce")
    assert crit[0] == np.inf
    # r |l'(0)| / k with |l'(0)| = sqrt(K/(K-1)) (K-1)/K and k = K - 1.
    assert crit[1] == pytest.approx(radius / np.sqrt(n_classes * (n_classes - 1)), rel=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n_classes, radius", [(10, 1.0), (3, 0.3)])
def test_phase_boundary_is_sharp(loss, n_classes, radius):
    depth = np.array([2, 3, 4, 6])
    crit = critical_weight_decay(depth, n_classes, radius, loss)
    assert np.all(np.isfinite(crit) & (crit > 0))
    below = forecast(crit * (1 - 1e-6), depth, n_classes, radius, loss).s_star
    above = forecast(crit * (1 + 1e-6), depth, n_classes, radius, loss).s_star
    assert np.all(below > 0)
    assert np.all(above == 0)


@pytest.mark.parametrize("loss", LOSSES)
def test_critical_matches_sup_characterization(loss):
    # Independent of the forecast machinery:
    # Phi(s) <= Phi(0)  iff  lam <= 2 (l(0) - l(r s^D)) / (D k s^2).
    depth = np.array([1, 2, 3, 4, 6, 8])
    crit = critical_weight_decay(depth, 10, 1.3, loss)
    np.testing.assert_allclose(crit, _sup_critical(depth, 10, 1.3, loss), rtol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_critical_radius_scaling(loss):
    # a = r s^D: substituting s -> s r^(-1/D) gives lam_crit(D, r) = r^(2/D) lam_crit(D, 1).
    depth = np.arange(2, 9)
    base = critical_weight_decay(depth, 10, 1.0, loss)
    for radius in (0.05, 4.0):
        scaled = critical_weight_decay(depth, 10, radius, loss)
        np.testing.assert_allclose(scaled, radius ** (2 / depth) * base, rtol=1e-7)


# ---------------------------------------------------------------------- direction in depth


@pytest.mark.parametrize(
    "loss, n_classes", [("mse", 2), ("mse", 10), ("mse", 1000), ("ce", 2), ("ce", 10), ("ce", 100)]
)
def test_critical_decreasing_in_depth_at_unit_radius(loss, n_classes):
    crit = critical_weight_decay(np.arange(2, 13), n_classes, 1.0, loss)
    assert np.all(np.diff(crit) < 0)


def test_critical_not_monotone_in_depth_in_general():
    # The r^(2/D) factor grows with D when the threshold gain exceeds r: small radius, or CE
    # with many classes (threshold gain ~ log K), makes lam_crit rise before the 1/D decay.
    small_r = critical_weight_decay(np.arange(2, 9), 10, 0.01, "mse")
    assert np.all(np.diff(small_r) > 0)
    many_classes = critical_weight_decay(np.arange(2, 13), 1000, 1.0, "ce")
    assert many_classes[1] > many_classes[0]
    assert many_classes[-1] < many_classes[2]


# ----------------------------------------------------------------------------- brute force


def test_forecast_agrees_with_brute_force_grid():
    rng = np.random.default_rng(0)
    for _ in range(30):
        loss = LOSSES[rng.integers(2)]
        depth = int(rng.integers(1, 9))
        n_classes = int(rng.integers(2, 21))
        radius = float(10 ** rng.uniform(-1, 1))
        crit = _sup_critical(depth, n_classes, radius, loss).item()
        if np.isfinite(crit):
            lam = crit * 10 ** rng.uniform(-1.5, 1.0)
        else:
            lam = 10 ** rng.uniform(-4, 0)
        fc = forecast(lam, depth, n_classes, radius, loss)
        bound = _bound(lam, depth, n_classes, loss)
        grid = np.linspace(0.0, bound, 200_000)
        phi = reduced_objective(grid, lam, depth, n_classes, radius, loss)
        assert fc.objective.item() <= phi.min() + 1e-9
        # Away from the phase boundary the minimizer is unique: s* is at the grid argmin.
        if not np.isfinite(crit) or abs(np.log(lam / crit)) > 1e-2:
            tol = 2 * (grid[1] - grid[0]) + 1e-6 * (1 + fc.s_star.item())
            assert abs(fc.s_star.item() - grid[np.argmin(phi)]) <= tol


# --------------------------------------------------------------------- vectorization/output


@pytest.mark.parametrize("loss", LOSSES)
def test_forecast_broadcast_equals_scalar_calls(loss):
    lam = np.array([1e-4, 3e-3, 0.02, 0.08, 0.5])
    depth = np.array([1, 2, 3, 5])[:, None]
    fc = forecast(lam, depth, 10, 1.5, loss)
    assert fc.s_star.shape == fc.objective.shape == fc.gain.shape == fc.k.shape == (4, 5)
    assert np.all(fc.k == _k(10, loss))
    for i in range(4):
        for j in range(5):
            one = forecast(lam[j], int(depth[i, 0]), 10, 1.5, loss)
            assert fc.s_star[i, j] == pytest.approx(one.s_star.item(), rel=1e-12, abs=0)
            assert fc.objective[i, j] == pytest.approx(one.objective.item(), rel=1e-12)
            assert fc.gain[i, j] == pytest.approx(1.5 * one.s_star.item() ** depth[i, 0], rel=1e-12)
            assert fc.weight_decay[i, j] == lam[j] and fc.tail_depth[i, j] == depth[i, 0]


def test_every_output_carries_label():
    assert LABEL == "reconstructed"
    fc = forecast([0.01, 0.1], [[2], [3]], 5, 1.0, "ce")
    assert isinstance(fc, Forecast) and fc.label == LABEL
    columns = fc.to_dict()
    assert columns["label"] == LABEL and columns["loss"] == "ce"
    assert np.shape(columns["s_star"]) == (2, 2)
    records = fc.to_records()
    assert len(records) == 4
    assert all(rec["label"] == LABEL for rec in records)
    assert {"weight_decay", "tail_depth", "s_star", "k", "objective", "gain"} <= set(records[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        fc.label = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        fc.s_star[0, 0] = 1.0


GOOD = {"weight_decay": 0.01, "tail_depth": 3, "n_classes": 10, "radius": 1.0, "loss": "mse"}
BAD = [
    ("weight_decay", 0.0),
    ("weight_decay", -1e-3),
    ("weight_decay", np.nan),
    ("weight_decay", [0.1, 0.0]),
    ("tail_depth", 0),
    ("tail_depth", 1.5),
    ("tail_depth", [2, -1]),
    ("n_classes", 1),
    ("n_classes", 2.5),
    ("radius", 0.0),
    ("radius", -1.0),
    ("radius", np.inf),
    ("loss", "hinge"),
]


@pytest.mark.parametrize("name, value", BAD)
def test_bad_inputs_raise_naming_the_argument(name, value):
    args = dict(GOOD, **{name: value})
    with pytest.raises(ValueError, match=name):
        forecast(**args)
    with pytest.raises(ValueError, match=name):
        reduced_objective(0.5, **args)
    if name != "weight_decay":
        args.pop("weight_decay")
        with pytest.raises(ValueError, match=name):
            critical_weight_decay(**args)


# ---------------------------------------------------------------------------------- radius


def test_class_mean_radius_centered_and_uncentered():
    # Orthogonal frame r e_c with +-noise that cancels per class: uncentered radius is r,
    # centered (balanced classes, mu_G = r/K 1) is r sqrt((K - 1)/K).
    n_classes, radius, dim = 4, 2.5, 6
    means = radius * np.eye(n_classes, dim)
    noise = np.random.default_rng(1).normal(size=(n_classes, 3, dim))
    features = np.concatenate([means[:, None] + noise, means[:, None] - noise], axis=1)
    labels = np.repeat(np.arange(n_classes), 6)
    features = features.reshape(-1, dim)
    assert class_mean_radius(features, labels, centered=False) == pytest.approx(radius)
    expected = radius * np.sqrt((n_classes - 1) / n_classes)
    assert class_mean_radius(features, labels, centered=True) == pytest.approx(expected)


def test_class_mean_radius_uses_sample_global_mean_and_validates():
    features = np.array([[0.0], [0.0], [0.0], [4.0]])
    labels = np.array([0, 0, 0, 1])
    # mu_0 = 0, mu_1 = 4, mu_G = 1 (sample mean): radii 1 and 3.
    assert class_mean_radius(features, labels, centered=True) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="labels"):
        class_mean_radius(features, labels[:3], centered=True)
    with pytest.raises(ValueError, match="features"):
        class_mean_radius(features.ravel(), labels, centered=True)
