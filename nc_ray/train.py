"""Training of a pack: SGD with momentum and per-member coupled L2, read top to bottom.

Each member minimizes its own F_λ(θ) = (1/N) Σ_i ℓ(f(x_i), y_i) + (λ/2) Σ_l ||W_l||_F² with
its own learning rate (and lr schedule), weight decay and data order (from its seed). The
update is torch's SGD with coupled weight decay on weights only (biases are not decayed):
    d = ∇ℓ_batch + λ W;   buf = momentum · buf + d;   W ← W − lr_e · buf,
with lr_e = lr · factor(e) in epoch e (as torch's LambdaLR stepped once per epoch).
A member whose loss or weights stop being finite is frozen and flagged as diverged; a member
that `stop`s (its stop rule met at an evaluation) is frozen too. The others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nc_ray.config import LOSSES
from nc_ray.models import PackedNetwork, data_order_generator

LrFactor = Callable[[int], float]


def _constant(epoch: int) -> float:
    return 1.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def per_sample_loss(output: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """ℓ per sample, shape output.shape[:-1]: cross-entropy, or ½||f − e_y||² for "mse"."""
    if loss == "ce":
        flat = F.cross_entropy(output.reshape(-1, output.shape[-1]), y.expand(output.shape[:-1]).reshape(-1), reduction="none")
        return flat.view(output.shape[:-1])
    if loss == "mse":
        target = F.one_hot(y, output.shape[-1]).to(output.dtype)
        return 0.5 * (output - target).square().sum(-1)
    raise ValueError(f"loss={loss!r}: expected one of {list(LOSSES)}")


class PackTrainer:
    """Trains every member of `model` on (x, y); state round-trips through `state_dict`.

    `batch_size=None` means full batch. Data and parameters live on `device`.
    """

    def __init__(
        self,
        model: PackedNetwork,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        learning_rates: Sequence[float],
        weight_decays: Sequence[float],
        seeds: Sequence[int],
        loss: str,
        batch_size: int | None,
        momentum: float = 0.0,
        lr_factors: Sequence[LrFactor] | None = None,
        device: torch.device | str | None = None,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: expected one of {list(LOSSES)}")
        size = model.size
        lr_factors = list(lr_factors) if lr_factors is not None else [_constant] * size
        for name, values in (("learning_rates", learning_rates), ("weight_decays", weight_decays), ("seeds", seeds), ("lr_factors", lr_factors)):
            if len(values) != size:
                raise ValueError(f"{name} has {len(values)} entries for a pack of {size} members")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.loss = loss
        self.batch_size = batch_size or len(x)
        self.momentum = momentum
        dtype = model.weights[0].dtype
        self.base_learning_rates = list(learning_rates)
        self.lr_factors = lr_factors
        self.learning_rates = torch.tensor(learning_rates, dtype=dtype, device=self.device)
        self.weight_decays = torch.tensor(weight_decays, dtype=dtype, device=self.device)
        self.generators = [data_order_generator(seed) for seed in seeds]
        self.parameters = list(model.parameters())
        self.decayed = [any(p is w for w in model.weights) for p in self.parameters]
        self.momentum_buffers = [torch.zeros_like(p) for p in self.parameters]
        self.active = torch.ones(size, dtype=torch.bool, device=self.device)
        self.diverged_epoch = torch.full((size,), -1, dtype=torch.long, device=self.device)
        self.stopped_epoch = torch.full((size,), -1, dtype=torch.long, device=self.device)
        self.epoch = 0
        self.last_epoch_loss = torch.full((size,), float("nan"), dtype=dtype, device=self.device)

    def train_epoch(self) -> None:
        """One pass over the data in each member's own order, at each member's lr of this epoch."""
        rates = [lr * factor(self.epoch) for lr, factor in zip(self.base_learning_rates, self.lr_factors)]
        self.learning_rates.copy_(torch.tensor(rates, dtype=self.learning_rates.dtype))
        n = len(self.x)
        order = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)
        loss_sum = torch.zeros_like(self.learning_rates)
        for start in range(0, n, self.batch_size):
            batch = order[:, start : start + self.batch_size]
            losses = self._step(self.x[batch], self.y[batch])
            loss_sum += losses.detach() * batch.shape[1]
        self.last_epoch_loss = loss_sum / n
        self.epoch += 1
        weights_finite = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in self.parameters]).all(0)
        self._freeze(~weights_finite)

    def _step(self, x_batch: torch.Tensor, y_batch: torch.Tensor) -> torch.Tensor:
        losses = per_sample_loss(self.model(x_batch), y_batch, self.loss).mean(1)
        self._freeze(~torch.isfinite(losses))
        gradients = torch.autograd.grad(losses.sum(), self.parameters)
        with torch.no_grad():
            for parameter, gradient, buffer, decayed in zip(
                self.parameters, gradients, self.momentum_buffers, self.decayed
            ):
                shape = (-1,) + (1,) * (parameter.dim() - 1)
                if decayed:
                    gradient = gradient + self.weight_decays.view(shape) * parameter
                buffer.mul_(self.momentum).add_(gradient)
                updated = parameter - self.learning_rates.view(shape) * buffer
                parameter.copy_(torch.where(self.active.view(shape), updated, parameter))
        return losses

    def _freeze(self, failed: torch.Tensor) -> None:
        newly = failed & self.active
        self.diverged_epoch = torch.where(newly, self.epoch, self.diverged_epoch)
        self.active &= ~failed

    def _mask(self, indices: Sequence[int]) -> torch.Tensor:
        mask = torch.zeros_like(self.active)
        mask[list(indices)] = True
        return mask

    def mark_diverged(self, indices: Sequence[int]) -> None:
        """Freeze members found non-finite outside training (e.g. by an evaluation)."""
        self._freeze(self._mask(indices))

    def stop(self, indices: Sequence[int]) -> None:
        """Freeze members that are done (their stop rule met): their weights stay as they are now."""
        newly = self._mask(indices) & self.active
        self.stopped_epoch = torch.where(newly, self.epoch, self.stopped_epoch)
        self.active &= ~newly

    @property
    def diverged(self) -> list[bool]:
        return (self.diverged_epoch >= 0).tolist()

    @property
    def done(self) -> bool:
        """No member is still training."""
        return not bool(self.active.any())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: parameters, momentum, data-order RNG, epoch."""
        return {
            "parameters": [p.detach().cpu() for p in self.parameters],
            "momentum_buffers": [b.cpu() for b in self.momentum_buffers],
            "generators": [g.get_state() for g in self.generators],
            "active": self.active.cpu(),
            "diverged_epoch": self.diverged_epoch.cpu(),
            "stopped_epoch": self.stopped_epoch.cpu(),
            "last_epoch_loss": self.last_epoch_loss.cpu(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, state["parameters"], strict=True):
                parameter.copy_(saved)
            for buffer, saved in zip(self.momentum_buffers, state["momentum_buffers"], strict=True):
                buffer.copy_(saved)
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)
        self.active = state["active"].to(self.device)
        self.diverged_epoch = state["diverged_epoch"].to(self.device)
        # States saved by version 1 have no stop rule: no member was stopped.
        self.stopped_epoch = state.get("stopped_epoch", torch.full_like(self.diverged_epoch, -1)).to(self.device)
        self.last_epoch_loss = state["last_epoch_loss"].to(self.device)
        self.epoch = int(state["epoch"])
