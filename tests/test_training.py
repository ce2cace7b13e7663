"""Packing is a contract: a pack trains to the same weights as its members trained alone."""

import pytest
import torch

from nc_ray.config import MemberConfig
from nc_ray.models import Architecture, PackedNetwork, build_model, data_order_generator, forward_layers
from nc_ray.train import PackTrainer, backward_deltas, batch_loss_and_output_gradient, per_sample_loss


def clusters(n_classes=4, dim=12, per_class=30, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=generator)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = centers[y] + 0.5 * torch.randn(len(y), dim, generator=generator)
    return x.to(dtype), y


def train_alone(spec, seed, x, y, *, lr, weight_decay, loss, batch_size, momentum, epochs, dtype, lr_factor=None):
    """Reference: a plain module, torch.optim.SGD with coupled L2 on weights only, and the lr
    schedule as torch's LambdaLR stepped once per epoch."""
    model = build_model(**vars(spec), seed=seed).to(dtype)
    groups = [{"params": model.weight_matrices(), "weight_decay": weight_decay}]
    if spec.bias:
        groups.append({"params": model.bias_vectors(), "weight_decay": 0.0})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor or (lambda epoch: 1.0))
    order = data_order_generator(seed)
    for _ in range(epochs):
        permutation = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), batch_size):
            batch = permutation[start : start + batch_size]
            optimizer.zero_grad()
            per_sample_loss(model(x[batch]), y[batch], loss).mean().backward()
            optimizer.step()
        scheduler.step()
    return model


def schedule(kind: str, **values) -> MemberConfig:
    """A member whose only role here is its lr schedule over 6 epochs (`MemberConfig.lr_factor`)."""
    from tests.test_spec import member

    return member(epochs=6, lr_schedule=kind, **values)


SCHEDULES = [
    schedule("constant"),
    schedule("step", lr_milestones=(1, 3), lr_gamma=0.5),
    schedule("cosine", lr_floor=0.1),
    schedule("cosine", lr_floor=0.0, lr_warmup_epochs=2),
]


CASES = [
    ("mlp", "relu", False, "ce", 0.9),
    ("mlp", "tanh", True, "mse", 0.0),
    ("resmlp", "relu", True, "ce", 0.5),
    ("resmlp", "leaky_relu", False, "mse", 0.9),
]


@pytest.mark.parametrize("group_size", [None, 3])  # the whole pack per step, or groups of 3 and 1
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("arch,activation,bias,loss,momentum", CASES)
def test_pack_equals_members_trained_alone(arch, activation, bias, loss, momentum, dtype, tolerance, group_size):
    x, y = clusters(dtype=dtype)
    spec = Architecture(arch, x.shape[1], 16, 4, 4, activation, bias)
    seeds, lrs, decays = [3, 3, 7, 11], [0.03, 0.01, 0.03, 0.02], [1e-3, 1e-2, 1e-1, 0.0]
    pack = PackedNetwork(spec, seeds).to(dtype)
    # Each member its own schedule: the schedule is per member, as lr is.
    factors = [m.lr_factor for m in SCHEDULES]
    trainer = PackTrainer(
        pack, x, y, learning_rates=lrs, weight_decays=decays, seeds=seeds, lr_factors=factors,
        loss=loss, batch_size=32, momentum=momentum, device="cpu", group_size=group_size,
    )
    for _ in range(4):
        trainer.train_epoch()
    assert not any(trainer.diverged)
    for index, seed in enumerate(seeds):
        alone = train_alone(
            spec, seed, x, y, lr=lrs[index], weight_decay=decays[index], loss=loss,
            batch_size=32, momentum=momentum, epochs=4, dtype=dtype, lr_factor=factors[index],
        )
        packed = pack.member(index)
        for w_alone, w_packed in zip(alone.parameters(), packed.parameters()):
            torch.testing.assert_close(w_packed.to(dtype), w_alone, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("arch", ["mlp", "resmlp"])
@pytest.mark.parametrize("depth,batch", [(2, 1), (4, 5)])
def test_hand_written_backward_matches_autograd(arch, activation, bias, loss, depth, batch):
    x, y = clusters(dtype=torch.float64)
    spec = Architecture(arch, x.shape[1], 16, depth, 4, activation, bias)
    pack = PackedNetwork(spec, [0, 1, 2]).to(torch.float64)
    with torch.no_grad():  # nonzero biases, so that their gradients flow through act' as well
        for b in pack.bias_vectors() or []:
            b.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
    rows = torch.stack([torch.randperm(len(x), generator=torch.Generator().manual_seed(m))[:batch] for m in range(3)])
    xb, yb = x[rows], y[rows]
    expected_losses = per_sample_loss(pack(xb), yb, loss).mean(1)
    expected = torch.autograd.grad(expected_losses.sum(), list(pack.parameters()))

    weights = pack.weight_matrices()
    with torch.no_grad():
        output, inputs, activations = forward_layers(xb, weights, pack.bias_vectors(), arch, activation, in_place=True)
        losses, output_gradient = batch_loss_and_output_gradient(output, yb, loss)
        layers_and_deltas = list(backward_deltas(output_gradient, weights, activations, arch=arch, activation=activation))
    assert [layer for layer, _ in layers_and_deltas] == list(range(depth - 1, -1, -1))
    deltas = [delta for _, delta in layers_and_deltas][::-1]
    gradients = [d.transpose(1, 2) @ z for d, z in zip(deltas, inputs)] + ([d.sum(1) for d in deltas] if bias else [])
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-12)
    for gradient, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(gradient, reference, rtol=1e-10, atol=1e-12)


def test_packed_forward_matches_member_modules():
    spec = Architecture("resmlp", 12, 16, 5, 4, "relu", True)
    pack = PackedNetwork(spec, [1, 2, 3])
    x, _ = clusters()
    with torch.no_grad():
        packed = pack(x)
        for index, seed in enumerate([1, 2, 3]):
            torch.testing.assert_close(packed[index], build_model(**vars(spec), seed=seed)(x))
            torch.testing.assert_close(packed[index], pack.member(index)(x))


def test_weight_matrices_are_in_layer_order():
    model = build_model("mlp", in_dim=12, width=16, depth=4, n_classes=3)
    assert [tuple(w.shape) for w in model.weight_matrices()] == [(16, 12), (16, 16), (16, 16), (3, 16)]


@pytest.mark.parametrize("group_size", [None, 2])  # the diverging member alone in its group or not
def test_divergence_freezes_only_that_member(group_size):
    x, y = clusters()
    spec = Architecture("mlp", x.shape[1], 16, 3, 4)
    kwargs = dict(loss="mse", batch_size=32, momentum=0.9, device="cpu")
    with_bad = PackedNetwork(spec, [0, 1, 2])
    trainer = PackTrainer(with_bad, x, y, learning_rates=[0.05, 1e3, 0.05], weight_decays=[1e-3] * 3, seeds=[0, 1, 2],
                          group_size=group_size, **kwargs)
    healthy = PackedNetwork(spec, [0, 2])
    reference = PackTrainer(healthy, x, y, learning_rates=[0.05, 0.05], weight_decays=[1e-3] * 2, seeds=[0, 2], **kwargs)
    for _ in range(5):
        trainer.train_epoch()
        reference.train_epoch()
    assert trainer.diverged == [False, True, False]
    assert int(trainer.diverged_epoch[1]) >= 0
    for layer in range(spec.depth):
        torch.testing.assert_close(with_bad.weights[layer][[0, 2]], healthy.weights[layer])
    assert torch.isfinite(trainer.last_epoch_loss[[0, 2]]).all() and trainer.last_epoch_loss[1].isnan()
    frozen = [w[1].clone() for w in with_bad.weights]
    trainer.train_epoch()
    assert all(torch.equal(w[1], f) for w, f in zip(with_bad.weights, frozen))


@pytest.mark.parametrize("group_size", [1, 2])
def test_a_member_diverging_mid_epoch_keeps_its_weights_from_before_that_step(group_size):
    x, y = clusters(dtype=torch.float64)
    spec = Architecture("mlp", x.shape[1], 16, 3, 4, "leaky_relu")
    kwargs = dict(weight_decays=[0.0, 0.0], seeds=[0, 1], loss="mse", batch_size=8, momentum=0.0, device="cpu", group_size=group_size)
    trainer = PackTrainer(PackedNetwork(spec, [0, 1]).to(torch.float64), x, y, learning_rates=[0.01, 100.0], **kwargs)
    trainer.train_epoch()  # 15 steps
    assert trainer.diverged == [False, True] and trainer.diverged_epoch.tolist() == [-1, 0]
    frozen = trainer.model.member(1)
    assert all(torch.isfinite(w).all() for w in frozen.weight_matrices())  # frozen by its loss, before a step could overflow it
    # The same member alone, step by step: its weights are those of its last finite step.
    alone = build_model(**vars(spec), seed=1).to(torch.float64)
    optimizer = torch.optim.SGD(alone.parameters(), lr=100.0)
    permutation = torch.randperm(len(x), generator=data_order_generator(1))
    steps = 0
    for start in range(0, len(x), 8):
        batch = permutation[start : start + 8]
        loss = per_sample_loss(alone(x[batch]), y[batch], "mse").mean()
        if not torch.isfinite(loss):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    assert 0 < steps < 14  # mid-epoch, with steps of the healthy member after it
    for w_alone, w_frozen in zip(alone.weight_matrices(), frozen.weight_matrices()):
        torch.testing.assert_close(w_frozen, w_alone, rtol=1e-10, atol=1e-10)


def test_lr_factors_of_the_schedules():
    constant, step, cosine, warm = SCHEDULES
    assert [constant.lr_factor(e) for e in range(6)] == [1.0] * 6
    assert [step.lr_factor(e) for e in range(6)] == [1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert cosine.lr_factor(0) == 1.0 and cosine.lr_factor(3) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine.lr_factor(6) == pytest.approx(0.1)  # the floor, reached after the last epoch
    assert [warm.lr_factor(e) for e in range(3)] == [0.5, 1.0, 1.0]  # warm-up, then the cosine from its top
    assert warm.lr_factor(4) == pytest.approx(0.5)


def test_stopped_members_are_frozen_and_the_rest_train_on():
    x, y = clusters()
    spec = Architecture("mlp", x.shape[1], 16, 3, 4)
    trainer = PackTrainer(PackedNetwork(spec, [0, 1, 2]), x, y, learning_rates=[0.05] * 3, weight_decays=[1e-3] * 3,
                          seeds=[0, 1, 2], loss="ce", batch_size=32, momentum=0.9, device="cpu")
    trainer.train_epoch()
    trainer.stop([1])
    frozen = [w[1].clone() for w in trainer.model.weights]
    moving = [w[0].clone() for w in trainer.model.weights]
    trainer.train_epoch()
    assert all(torch.equal(w[1], f) for w, f in zip(trainer.model.weights, frozen))
    assert not torch.equal(trainer.model.weights[0][0], moving[0])
    assert trainer.stopped_epoch.tolist() == [-1, 1, -1] and trainer.diverged == [False] * 3 and not trainer.done
    trainer.stop([0, 2])
    assert trainer.done


def test_frozen_members_leave_the_pack_and_the_rest_train_as_alone_through_a_state_round_trip():
    """Stopped members drop out of the computation; the others still match torch.optim.SGD."""
    x, y = clusters(dtype=torch.float64)
    spec = Architecture("resmlp", x.shape[1], 16, 4, 4, "tanh", True)
    seeds, lrs, decays = [3, 7, 11], [0.03, 0.01, 0.02], [1e-3, 1e-2, 0.0]
    kwargs = dict(learning_rates=lrs, weight_decays=decays, seeds=seeds, loss="ce", batch_size=32, momentum=0.9, device="cpu", group_size=1)
    first = PackTrainer(PackedNetwork(spec, seeds).to(torch.float64), x, y, **kwargs)
    first.train_epoch()
    first.stop([1])
    saved = first.state_dict()
    resumed = PackTrainer(PackedNetwork(spec, [0, 0, 0]).to(torch.float64), x, y, **kwargs)
    resumed.load_state_dict(saved)
    for _ in range(3):
        resumed.train_epoch()
    assert resumed.stopped_epoch.tolist() == [-1, 1, -1]
    assert resumed.last_epoch_loss[1].isnan() and torch.isfinite(resumed.last_epoch_loss[[0, 2]]).all()
    for index, epochs in ((0, 4), (1, 1), (2, 4)):
        alone = train_alone(spec, seeds[index], x, y, lr=lrs[index], weight_decay=decays[index], loss="ce",
                            batch_size=32, momentum=0.9, epochs=epochs, dtype=torch.float64)
        for w_alone, w_packed in zip(alone.parameters(), resumed.model.member(index).parameters()):
            torch.testing.assert_close(w_packed, w_alone, rtol=1e-10, atol=1e-10)


def test_a_version_1_state_without_stop_rule_loads():
    x, y = clusters()
    spec = Architecture("mlp", x.shape[1], 16, 3, 4)
    kwargs = dict(learning_rates=[0.05, 0.1], weight_decays=[1e-3, 1e-2], seeds=[4, 5], loss="ce", batch_size=16, momentum=0.9, device="cpu")
    trainer = PackTrainer(PackedNetwork(spec, [4, 5]), x, y, **kwargs)
    trainer.train_epoch()
    saved = trainer.state_dict()
    del saved["stopped_epoch"]
    resumed = PackTrainer(PackedNetwork(spec, [4, 5]), x, y, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.stopped_epoch.tolist() == [-1, -1] and resumed.epoch == 1
    trainer.train_epoch()
    resumed.train_epoch()
    assert all(torch.equal(a, b) for a, b in zip(trainer.parameters, resumed.parameters))


def test_state_round_trip_continues_exactly():
    x, y = clusters()
    spec = Architecture("mlp", x.shape[1], 16, 3, 4, bias=True)
    kwargs = dict(learning_rates=[0.05, 0.1], weight_decays=[1e-3, 1e-2], seeds=[4, 5], loss="ce", batch_size=16, momentum=0.9, device="cpu",
                  lr_factors=[SCHEDULES[1].lr_factor, SCHEDULES[3].lr_factor])
    straight = PackTrainer(PackedNetwork(spec, [4, 5]), x, y, **kwargs)
    for _ in range(5):
        straight.train_epoch()

    first = PackTrainer(PackedNetwork(spec, [4, 5]), x, y, **kwargs)
    for _ in range(2):
        first.train_epoch()
    saved = first.state_dict()
    resumed = PackTrainer(PackedNetwork(spec, [9, 9]), x, y, **kwargs)
    resumed.load_state_dict(saved)
    for _ in range(3):
        resumed.train_epoch()
    assert resumed.epoch == 5
    for a, b in zip(straight.parameters, resumed.parameters):
        assert torch.equal(a, b)


def test_bad_pack_arguments_are_named():
    spec = Architecture("mlp", 4, 8, 2, 2)
    x, y = torch.zeros(4, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="learning_rates"):
        PackTrainer(PackedNetwork(spec, [0, 1]), x, y, learning_rates=[0.1], weight_decays=[0, 0], seeds=[0, 1], loss="ce", batch_size=2)
    with pytest.raises(ValueError, match="loss='hinge'"):
        PackTrainer(PackedNetwork(spec, [0]), x, y, learning_rates=[0.1], weight_decays=[0], seeds=[0], loss="hinge", batch_size=2)
    with pytest.raises(ValueError, match="depth=1"):
        Architecture("mlp", 4, 8, 1, 2)
