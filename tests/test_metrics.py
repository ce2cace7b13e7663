"""Metrics on constructed cases with known answers, and against direct definitions."""

import math

import numpy as np
import pytest
import torch

from nc_ray.metrics import LAYER_METRICS, PENULTIMATE_METRICS, member_metrics, pack_metrics, spectrum_metrics
from nc_ray.models import Architecture, PackedNetwork, build_model
from nc_ray.train import PackTrainer, per_sample_loss
from tests.test_training import clusters

SCIENCE_NAMES = {
    "singular_values", "sv_max", "stable_rank", "effective_rank", "rank_rel_1e1", "rank_rel_1e2",
    "rank_rel_1e3", "dist_k", "dist_k_rel", "dist_km1", "tcv", "tcv_sq", "tcv_rel", "nc1",
    "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "grad_norm", "b0", "b1", "b2", "bound_ok",
    "bound_ratio", "balance_gap",
}


def test_every_science_name_is_produced():
    x, y = clusters()
    rows = member_metrics(build_model("mlp", 12, 16, 3, 4, seed=0), x, y, weight_decay=1e-3, loss="ce")
    assert len(rows) == 3
    assert SCIENCE_NAMES <= set(rows[0])
    assert set(LAYER_METRICS) | set(PENULTIMATE_METRICS) | {"singular_values"} == SCIENCE_NAMES
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
        trainer.train_epoch()
