"""Metrics on constructed cases with known answers, and against direct definitions."""

import math

import numpy as np
import pytest
import torch

from nc_ray.metrics import member_metrics, pack_metrics, spectrum_metrics
from nc_ray.schema import LAYER_METRICS, MEMBER_METRICS, PENULTIMATE_METRICS
from nc_ray.models import Architecture, PackedNetwork, build_model
from nc_ray.train import PackTrainer, per_sample_loss
from tests.test_training import clusters

SCIENCE_NAMES = {
    "singular_values", "sv_max", "stable_rank", "effective_rank", "rank_rel_1e1", "rank_rel_1e2",
    "rank_rel_1e3", "dist_k", "dist_k_rel", "dist_km1", "tcv", "tcv_sq", "tcv_rel", "nc1",
    "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "grad_norm", "b0", "b1", "b2", "bound_ok",
    "bound_ratio", "balance_gap",
    # version 2
    "weight_norm", "stationarity", "b0_grad", "b0_tcv", "tcv_perp_rel", "b0_perp", "bound_perp_ok",
    "bound_perp_ratio", "objective",
}


def test_every_science_name_is_produced():
    x, y = clusters()
    rows = member_metrics(build_model("mlp", 12, 16, 3, 4, seed=0), x, y, weight_decay=1e-3, loss="ce")
    assert len(rows) == 3
    assert SCIENCE_NAMES <= set(rows[0])
    assert set(LAYER_METRICS) | set(PENULTIMATE_METRICS) | set(MEMBER_METRICS) | {"singular_values"} == SCIENCE_NAMES
    assert all(rows[-1][name] is not None for name in PENULTIMATE_METRICS)
    assert all(rows[0][name] is None for name in PENULTIMATE_METRICS)
    assert rows[-1]["balance_gap"] is None and rows[0]["balance_gap"] is not None


def test_prescribed_spectrum():
    generator = torch.Generator().manual_seed(0)
    sigma = torch.tensor([5.0, 3.0, 1.0, 0.2, 0.02, 0.004], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(8, 6, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(7, 6, generator=generator, dtype=torch.float64))
    weight = (u * sigma) @ v.T  # 8 x 7, spectrum sigma
    metrics, sv = spectrum_metrics(weight[None], n_classes=3)
    torch.testing.assert_close(sv[0, :6], sigma)
    assert metrics["sv_max"].item() == pytest.approx(5.0)
    assert metrics["stable_rank"].item() == pytest.approx(float(sigma.square().sum()) / 25.0)
    p = sigma / sigma.sum()
    assert metrics["effective_rank"].item() == pytest.approx(math.exp(-float((p * p.log()).sum())))
    assert metrics["rank_rel_1e1"].item() == 3  # 5, 3 and 1 exceed 0.1 * 5
    assert metrics["rank_rel_1e2"].item() == 4
    assert metrics["rank_rel_1e3"].item() == 5
    assert metrics["dist_k"].item() == pytest.approx(math.sqrt(0.2**2 + 0.02**2 + 0.004**2))
    assert metrics["dist_km1"].item() == pytest.approx(math.sqrt(1.0 + 0.2**2 + 0.02**2 + 0.004**2))
    assert metrics["dist_k_rel"].item() == pytest.approx(metrics["dist_k"].item() / float(sigma.norm()))


def etf_network(n_classes=4, per_class=5):
    """Inputs e_y, W_1 = I, W_2 = M̃ᵀ: penultimate features are exactly a simplex ETF."""
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.eye(n_classes)[y]
    model = build_model("mlp", n_classes, n_classes, 2, n_classes).double()
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.eye(n_classes))
        model.layers[1].weight.copy_(torch.eye(n_classes) - 1.0 / n_classes)
    return model, x.double(), y


def test_collapsed_etf_configuration():
    model, x, y = etf_network()
    first, last = member_metrics(model, x, y, weight_decay=1e-2, loss="ce")
    for row in (first, last):  # both layers' inputs sit exactly on their class means
        assert row["tcv"] == pytest.approx(0, abs=1e-12)
        assert row["tcv_sq"] == pytest.approx(0, abs=1e-12)
        assert row["tcv_rel"] == pytest.approx(0, abs=1e-12)
        assert row["nc1"] == pytest.approx(0, abs=1e-12)
        assert row["bound_ok"]
    assert last["nc2_equinorm"] == pytest.approx(0, abs=1e-12)
    assert last["nc2_equiangular"] == pytest.approx(0, abs=1e-12)
    assert last["nc3"] == pytest.approx(0, abs=1e-12)
    assert last["nc4"] == 0
    assert last["accuracy"] == 1.0
    assert last["dist_km1"] == pytest.approx(0, abs=1e-12)  # centered W_2 has rank K-1
    assert last["rank_rel_1e3"] == 3


def test_collapse_metrics_match_definitions():
    """tcv, tcv_sq, tcv_rel and nc1 against their textbook forms (n x n pseudo-inverse)."""
    x, y = clusters(n_classes=3, dim=5, per_class=20, seed=1, dtype=torch.float64)
    y = y[:-7]  # unequal class sizes
    x = x[:-7]
    model = build_model("mlp", 5, 6, 2, 3, seed=0).double()
    first = member_metrics(model, x, y, weight_decay=1e-3, loss="mse")[0]
    z = x.numpy()
    labels = y.numpy()
    means = np.stack([z[labels == c].mean(0) for c in range(3)])
    global_mean = z.mean(0)
    deviation = z - means[labels]
    assert first["tcv"] == pytest.approx(np.linalg.norm(deviation, axis=1).mean())
    assert first["tcv_sq"] == pytest.approx((deviation**2).sum(1).mean())
    assert first["tcv_rel"] == pytest.approx((deviation**2).sum() / ((z - global_mean) ** 2).sum())
    sigma_w = deviation.T @ deviation / len(z)
    centered = means - global_mean
    sigma_b = centered.T @ centered / 3
    expected_nc1 = np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10)) / 3
    assert first["nc1"] == pytest.approx(expected_nc1, rel=1e-8)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("bias", [False, True])
def test_grad_norm_is_the_full_batch_gradient(loss, bias):
    """grad_norm must be ||∇_{W_l} F_λ||_F, checked against autograd of F_λ itself."""
    x, y = clusters(dtype=torch.float64)
    decay = 3e-3
    model = build_model("resmlp", 12, 10, 4, 4, bias=bias, seed=2).double()
    rows = member_metrics(model, x, y, weight_decay=decay, loss=loss)
    objective = per_sample_loss(model(x), y, loss).mean() + decay / 2 * sum(w.square().sum() for w in model.weight_matrices())
    gradients = torch.autograd.grad(objective, model.weight_matrices())
    for row, gradient in zip(rows, gradients):
        assert row["grad_norm"] == pytest.approx(float(gradient.norm()), rel=1e-10)
    assert rows[0]["loss"] == pytest.approx(float(per_sample_loss(model(x), y, loss).mean().detach()), rel=1e-10)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_chunked_statistics_equal_one_chunk(dtype, tolerance):
    """Streaming changes nothing but float rounding (the forward runs in the network's dtype)."""
    x, y = clusters(dtype=dtype)
    spec = Architecture("mlp", 12, 16, 4, 4, bias=True)
    pack = PackedNetwork(spec, [0, 1, 2]).to(dtype)
    kwargs = dict(weight_decays=[1e-3, 1e-2, 1e-1], loss="ce", n_classes=4)
    whole = pack_metrics(pack, x, y, chunk_size=len(x), **kwargs)
    chunked = pack_metrics(pack, x, y, chunk_size=7, **kwargs)
    for name, values in {**whole.layer, **whole.penultimate}.items():
        np.testing.assert_allclose({**chunked.layer, **chunked.penultimate}[name], values, rtol=tolerance, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("arch,loss,bias", [("mlp", "ce", False), ("mlp", "mse", True), ("resmlp", "ce", True), ("resmlp", "mse", False)])
def test_bound_holds_on_trained_networks_at_every_stage(arch, loss, bias):
    x, y = clusters()
    decays = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    spec = Architecture(arch, 12, 16, 4, 4, bias=bias)
    pack = PackedNetwork(spec, list(range(len(decays))))
    trainer = PackTrainer(
        pack, x, y, learning_rates=[0.02] * len(decays), weight_decays=decays, seeds=list(range(len(decays))),
        loss=loss, batch_size=30, momentum=0.9, device="cpu",
    )
    for epoch in range(12):
        if epoch in (0, 1, 11):  # untrained, barely trained, further along: never at a critical point
            result = pack_metrics(pack, x, y, weight_decays=decays, loss=loss, n_classes=4)
            assert np.isfinite(result.member["loss"]).all()
            assert result.layer["bound_ok"].all()
            assert (result.layer["bound_ratio"] <= 1 + 1e-9).all()
            assert (result.layer["b0"] <= result.layer["b1"] * (1 + 1e-12)).all()
            assert (result.layer["b0"] <= result.layer["b2"] * (1 + 1e-12)).all()
            assert_certificate_invariants(result.layer)
        trainer.train_epoch()


def assert_certificate_invariants(layer: dict[str, np.ndarray]) -> None:
    """dist_k <= b0_perp <= b0 (up to the certificate's tolerance) and the split b0 = b0_grad + b0_tcv."""
    slack = 1e-9 * layer["weight_norm"]
    assert (layer["dist_k"] <= layer["b0_perp"] + slack).all()
    assert (layer["b0_perp"] <= layer["b0"] * (1 + 1e-12)).all()
    assert layer["bound_perp_ok"].all() and layer["bound_ok"].all()
    np.testing.assert_allclose(layer["b0"], layer["b0_grad"] + layer["b0_tcv"], rtol=1e-12)
    assert (layer["b0_perp"] >= layer["b0_grad"] * (1 - 1e-12)).all()


# ---------------------------------------------------------------- version 2: an independent float64 reference

SPAN_RTOL = 1e-10


def reference_v2(model, x: torch.Tensor, y: torch.Tensor, decay: float, loss: str) -> list[dict]:
    """The version-2 columns from their definitions: numpy float64 matrices (Z is n x N), δ by
    autograd of the summed per-sample losses, Q from numpy's SVD of the class-mean matrix."""
    from nc_ray.models import forward_layers

    weights = [w.detach().clone().requires_grad_() for w in model.weight_matrices()]
    output, inputs, pre_activations = forward_layers(x, weights, None, model.spec.arch, model.spec.activation)
    losses = per_sample_loss(output, y, loss)
    deltas = torch.autograd.grad(losses.sum(), pre_activations)
    labels = y.numpy()
    classes = np.unique(labels)
    n_samples = len(labels)
    objective = float(losses.detach().mean()) + decay / 2 * sum(float(w.detach().square().sum()) for w in weights)
    rows = []
    for w, z_in, delta in zip(weights, inputs, deltas):
        w, z, d = w.detach().numpy(), z_in.detach().numpy().T, delta.detach().numpy().T
        means = np.stack([z[:, labels == c].mean(1) for c in classes], 1)  # n x K
        m = means[:, np.searchsorted(classes, labels)]
        u, sv, _ = np.linalg.svd(means, full_matrices=False)
        basis = u[:, sv > SPAN_RTOL * sv[0]] if sv[0] > 0 else u[:, :0]
        outside = np.eye(len(z)) - basis @ basis.T
        gradient = d @ z.T / n_samples + decay * w
        b0_grad = np.linalg.norm(gradient) / decay
        b0_tcv = np.linalg.norm(d @ (z - m).T) / (n_samples * decay)
        b0_perp = b0_grad + np.linalg.norm(d @ (outside @ (z - m)).T) / (n_samples * decay)
        spectrum = np.linalg.svd(w, compute_uv=False)
        dist_k = float(np.sqrt(np.sum(spectrum[len(classes):] ** 2)))
        zero = spectrum[0] < 1e-10
        total = np.sum((z - z.mean(1, keepdims=True)) ** 2)
        rows.append({
            "weight_norm": np.linalg.norm(w),
            "stationarity": None if zero else np.linalg.norm(gradient) / (decay * np.linalg.norm(w)),
            "b0_grad": b0_grad, "b0_tcv": b0_tcv, "b0": b0_grad + b0_tcv, "b0_perp": b0_perp,
            "tcv_perp_rel": np.sum((outside @ (z - m)) ** 2) / total if total > 0 else None,
            "bound_perp_ok": dist_k <= b0_perp, "bound_perp_ratio": None if zero else dist_k / b0_perp,
            "objective": objective,
        })
    return rows


V2_COLUMNS = ("weight_norm", "stationarity", "b0_grad", "b0_tcv", "b0", "b0_perp", "tcv_perp_rel",
              "bound_perp_ok", "bound_perp_ratio", "objective")


def assert_matches_reference(rows: list[dict], expected: list[dict]) -> None:
    for row, reference in zip(rows, expected, strict=True):
        for name in V2_COLUMNS:
            if reference[name] is None or isinstance(reference[name], (bool, np.bool_)):
                assert row[name] == reference[name], (row["layer"], name)
            else:
                assert row[name] == pytest.approx(float(reference[name]), rel=1e-6, abs=1e-12), (row["layer"], name)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_v2_columns_match_the_definitions_on_a_generic_network(loss):
    x, y = clusters(dtype=torch.float64)
    model = build_model("resmlp", 12, 10, 4, 4, seed=5).double()
    rows = member_metrics(model, x, y, weight_decay=2e-3, loss=loss)
    assert_matches_reference(rows, reference_v2(model, x, y, 2e-3, loss))
    assert all(r["dist_k"] <= r["b0_perp"] <= r["b0"] for r in rows)


def test_features_on_their_class_means_give_no_tcv_term():
    """Inputs e_y: every layer's input sits exactly on its class means, so b0_tcv = 0 and
    b0_perp = b0_grad = b0."""
    model, x, y = etf_network()
    rows = member_metrics(model, x, y, weight_decay=1e-2, loss="mse")
    assert_matches_reference(rows, reference_v2(model, x, y, 1e-2, "mse"))
    for row in rows:
        assert row["b0_tcv"] == pytest.approx(0, abs=1e-12)
        assert row["b0_perp"] - row["b0_grad"] == pytest.approx(0, abs=1e-12)
        assert row["tcv_rel"] == pytest.approx(0, abs=1e-12) and row["tcv_perp_rel"] == pytest.approx(0, abs=1e-12)


def test_deviation_inside_the_class_mean_span_is_not_counted_by_the_perp_terms():
    """Class means e_1..e_3 of R^5 and within-class deviations along e_1 + e_2 + e_3 (inside their
    span): layer 1's input has tcv_rel > 0 but tcv_perp_rel = 0, and b0_perp = b0_grad < b0."""
    per_class, n_classes = 4, 3
    y = torch.arange(n_classes).repeat_interleave(per_class)
    offsets = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64).repeat(n_classes)  # zero mean per class
    x = torch.zeros(len(y), 5, dtype=torch.float64)
    x[torch.arange(len(y)), y] = 1.0
    x[:, :3] += 0.2 * offsets[:, None]
    model = build_model("mlp", 5, 6, 3, n_classes, seed=1).double()
    rows = member_metrics(model, x, y, weight_decay=1e-2, loss="ce")
    assert_matches_reference(rows, reference_v2(model, x, y, 1e-2, "ce"))
    first = rows[0]
    assert first["tcv_rel"] > 0.01
    assert first["tcv_perp_rel"] == pytest.approx(0, abs=1e-12)
    assert first["b0_perp"] == pytest.approx(first["b0_grad"], rel=1e-12)
    assert first["b0_perp"] < first["b0"]


def test_a_zero_matrix_has_no_relative_quantities():
    """W_2 = 0: the zero map. Its ranks are 0 and its ratios and stationarity null; dist_k and
    the b-bounds are still stored and the certificate still holds."""
    x, y = clusters(dtype=torch.float64)
    model = build_model("mlp", 12, 8, 3, 4, seed=0).double()
    with torch.no_grad():
        model.layers[1].weight.zero_()
    rows = member_metrics(model, x, y, weight_decay=1e-2, loss="mse")
    assert_matches_reference(rows, reference_v2(model, x, y, 1e-2, "mse"))
    zero = rows[1]
    assert zero["sv_max"] == 0 and zero["dist_k"] == 0
    assert (zero["rank_rel_1e1"], zero["rank_rel_1e2"], zero["rank_rel_1e3"]) == (0, 0, 0)
    for name in ("stable_rank", "effective_rank", "dist_k_rel", "bound_ratio", "bound_perp_ratio", "stationarity"):
        assert zero[name] is None, name
    assert zero["b0"] is not None and zero["b0_perp"] is not None and zero["bound_ok"] and zero["bound_perp_ok"]
    assert rows[0]["stationarity"] is not None  # the other layers keep theirs


def test_no_weight_decay_gives_vacuous_bounds_and_no_stationarity():
    x, y = clusters(dtype=torch.float64)
    rows = member_metrics(build_model("mlp", 12, 8, 3, 4, seed=0).double(), x, y, weight_decay=0.0, loss="ce")
    for row in rows:
        assert row["b0"] == math.inf and row["b0_perp"] == math.inf and row["bound_ok"] and row["bound_perp_ok"]
        assert row["stationarity"] is None
        assert row["objective"] == pytest.approx(row["loss"])
