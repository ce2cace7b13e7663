"""Initialization of the residual MLP: trainable with MSE at the default lr at any depth."""

import math

import pytest
import torch

from nc_ray.data import load_dataset
from nc_ray.models import Architecture, PackedNetwork, forward_layers, initial_weights
from nc_ray.train import PackTrainer


def test_residual_init_scales():
    v1 = Architecture("resmlp", 64, 64, 8, 10, residual_init=None)
    assert v1.init_std(3) == pytest.approx(math.sqrt(2) / 8 / math.sqrt(6))  # nc_ray 0.1, unchanged
    assert v1.init_std(8) == pytest.approx(1 / 8)
    scaled = Architecture("resmlp", 64, 64, 8, 10, residual_init="depth")
    assert scaled.init_std(1) == pytest.approx(math.sqrt(2) / 8)
    assert scaled.init_std(3) == pytest.approx(math.sqrt(2) / 8 * 0.25 / 6)
    assert scaled.init_std(8) == pytest.approx(1 / 8 / math.sqrt(8))
    mlp = Architecture("mlp", 64, 64, 8, 10, residual_init="depth")
    assert mlp.init_std(3) == pytest.approx(math.sqrt(2) / 8) and mlp.init_std(8) == pytest.approx(1 / 8)


def test_scaled_resmlp_output_does_not_grow_with_depth():
    x = load_dataset("digits").x_train
    norms = {}
    for depth in (4, 16):
        spec = Architecture("resmlp", 64, 64, depth, 10, residual_init="depth")
        weights, _ = initial_weights(spec, seed=0)
        norms[depth] = forward_layers(x, weights, None, "resmlp", "relu")[0].norm(dim=-1).mean().item()
    assert norms[16] < 1.2 * norms[4] and norms[16] < 2.0


@pytest.mark.parametrize("depth", [8, 16])
def test_scaled_resmlp_trains_with_mse_at_the_default_lr(depth):
    """SGD lr 0.05, momentum 0.9, batch 128 on digits: 0.1's init diverged here at depth 8."""
    data = load_dataset("digits")
    seeds = list(range(6))
    spec = Architecture("resmlp", 64, 64, depth, 10, residual_init="depth")
    trainer = PackTrainer(PackedNetwork(spec, seeds), data.x_train, data.y_train, learning_rates=[0.05] * 6,
                          weight_decays=[1e-4, 1e-3, 1e-2] * 2, seeds=seeds, loss="mse", batch_size=128, momentum=0.9, device="cpu")
    for _ in range(15):
        trainer.train_epoch()
    assert not any(trainer.diverged)
    assert (trainer.last_epoch_loss < 0.2).all()
