"""Training of a pack: SGD with momentum and per-member coupled L2, read top to bottom.

Each member minimizes its own F_λ(θ) = (1/N) Σ_i ℓ(f(x_i), y_i) + (λ/2) Σ_l ||W_l||_F² with
its own learning rate (and lr schedule), weight decay and data order (from its seed). The
update is torch's SGD with coupled weight decay on weights only (biases are not decayed):
    d = ∇ℓ_batch + λ W;   buf = momentum · buf + d;   W ← W − lr_e · buf,
with lr_e = lr · factor(e) in epoch e (as torch's LambdaLR stepped once per epoch).
A member whose loss or weights stop being finite is frozen and flagged as diverged; a member
that `stop`s (its stop rule met at an evaluation) is frozen too. The others go on.

How it is made fast (bench/bench_pack.py measures it), the numbers staying those of torch's SGD:
- the gradient is the backward of `forward_layers` written out (`backward_deltas`), not autograd's:
  on CPU autograd's graph, its log-softmax and its strided activation backward cost about as
  much as the matrix products themselves; each layer is updated as soon as the backward has
  used its weights, while its delta and input are still in cache, and activations are computed
  in place, one tensor less per layer;
- only the active members train: each epoch copies their parameters and momenta out of the pack
  into a working pack and writes them back at its end, so frozen members cost nothing (their
  momenta stay as they were when they froze; nothing reads them);
- on CPU a step runs over small groups of the working pack that stay in cache
  (CPU_GROUP_BYTES_PER_THREAD).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nc_ray.config import LOSSES
from nc_ray.models import PackedNetwork, data_order_generator, forward_layers

LrFactor = Callable[[int], float]

# On CPU a step runs over groups of members small enough that one layer's activations of a group
# (batch x width, this many bytes per torch thread) stay in the cores' caches from the forward
# through the backward and the update: 1.3-1.9x faster than the whole pack at once on the digits
# shapes with one thread, about flat from 128 to 512 KiB.
CPU_GROUP_BYTES_PER_THREAD = 256 * 1024

# grad ⊙ act'(h) for the activations of models.ACTIVATIONS, from the activation's output a = act(h)
# (what the in-place forward keeps), with the kernels autograd itself uses: a > 0 exactly where
# h > 0 for relu and leaky_relu (at F.leaky_relu's default slope), and tanh' = 1 − a². A bool mask
# of a > 0 is several times slower on CPU.
_ACTIVATION_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda grad, a: torch.ops.aten.threshold_backward(grad, a, 0),
    "leaky_relu": lambda grad, a: torch.ops.aten.leaky_relu_backward(grad, a, 0.01, False),
    "tanh": lambda grad, a: torch.ops.aten.tanh_backward(grad, a),
}


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


def batch_loss_and_output_gradient(output: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For output (G, B, C): each member's mean `per_sample_loss` over its batch, and the gradient
    of their sum with respect to the output, in closed form: (softmax(f) − e_y) / B for "ce",
    (f − e_y) / B for "mse".

    Computed on the transpose (G, C, B): torch's (log-)softmax over a last dimension as short as
    a class count is 10-30x slower on CPU than over a middle one. The gradient is returned as a
    (G, B, C) view of that transpose, which bmm takes as it is.
    """
    output_t = output.transpose(1, 2).contiguous()
    target_t = torch.zeros_like(output_t).scatter_(1, y.unsqueeze(1), 1.0)  # e_y
    if loss == "ce":
        log_probabilities = torch.log_softmax(output_t, 1)
        per_sample = -log_probabilities.gather(1, y.unsqueeze(1)).squeeze(1)
        residual_t = log_probabilities.exp_() - target_t
    else:
        residual_t = output_t - target_t
        per_sample = 0.5 * residual_t.square().sum(1)
    return per_sample.mean(-1), (residual_t / output.shape[1]).transpose(1, 2)


def backward_deltas(
    output_gradient: torch.Tensor, weights: Sequence[torch.Tensor], activations: Sequence[torch.Tensor], *, arch: str, activation: str,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(l, D_l), D_l = ∂loss/∂h_l (G, B, out_l), for l = L−1 down to 0 (0-based), from D_L = ∂loss/∂f
    and the third list of `forward_layers(..., in_place=True)` (act(h_l) of the hidden layers):
    the backward of `forward_layers`, no autograd. ∂/∂Z_{l-1} = D_l W_l, plus ∂/∂Z_l when layer l is
    a residual block (Z_l = Z_{l-1} + act(h_l)); then D_{l-1} = act'(h_{l-1}) ⊙ ∂/∂Z_{l-1}.

    Each D_l is yielded after W_l has served the backward, so the consumer may update W_l in
    place right away, while D_l and the layer's input are still in cache."""
    activation_backward = _ACTIVATION_BACKWARD[activation]
    depth = len(weights)
    delta = output_gradient
    grad_skip = None  # ∂/∂(output of the block above), carried down its skip connection
    for layer in range(depth - 1, 0, -1):  # 0-based: weights[layer] is W_{layer+1}
        residual_block = arch == "resmlp" and layer < depth - 1
        grad_z = torch.baddbmm(grad_skip, delta, weights[layer]) if residual_block else torch.bmm(delta, weights[layer])
        yield layer, delta
        delta = activation_backward(grad_z, activations[layer - 1])
        grad_skip = grad_z
    yield 0, delta


@dataclass
class WorkingPack:
    """The members that train (`members`: their indices in the pack), with copies of their
    parameters (weights, then biases), momenta, learning rates and weight decays, member first.
    Sliced, a group of it whose tensors are views: steps on a group update the working pack."""

    members: torch.Tensor
    parameters: list[torch.Tensor]
    momenta: list[torch.Tensor]
    learning_rates: torch.Tensor  # (G, 1, 1)
    weight_decays: torch.Tensor  # (G, 1, 1)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, group: slice) -> WorkingPack:
        return WorkingPack(
            self.members[group], [p[group] for p in self.parameters], [m[group] for m in self.momenta],
            self.learning_rates[group], self.weight_decays[group],
        )


class PackTrainer:
    """Trains every member of `model` on (x, y); state round-trips through `state_dict`.

    `batch_size=None` means full batch. Data and parameters live on `device`. A step runs over
    groups of `group_size` members (by default, on CPU, as many as CPU_GROUP_BYTES_PER_THREAD fit
    per thread; elsewhere the whole pack): members are independent, grouping only changes the speed.
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
        group_size: int | None = None,
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
        # Weights W_1..W_L, then biases: the order of model.parameters() and of saved states.
        self.parameters = list(model.parameters())
        self.momentum_buffers = [torch.zeros_like(p) for p in self.parameters]
        self.active = torch.ones(size, dtype=torch.bool, device=self.device)
        self.diverged_epoch = torch.full((size,), -1, dtype=torch.long, device=self.device)
        self.stopped_epoch = torch.full((size,), -1, dtype=torch.long, device=self.device)
        self.epoch = 0
        self.last_epoch_loss = torch.full((size,), float("nan"), dtype=dtype, device=self.device)
        if group_size is None and self.device.type == "cpu":
            widest = max(max(shape) for shape in model.spec.layer_shapes())
            budget = CPU_GROUP_BYTES_PER_THREAD * torch.get_num_threads()
            group_size = max(1, budget // (self.batch_size * widest * dtype.itemsize))
        self.group_size = group_size or size

    @torch.no_grad()  # the gradient is written out (backward_deltas); parameters change in place
    def train_epoch(self) -> None:
        """One pass over the data in each member's own order, at each member's lr of this epoch.

        `last_epoch_loss` is the mean batch loss of the members that trained the whole epoch,
        NaN for the others."""
        rates = [lr * factor(self.epoch) for lr, factor in zip(self.base_learning_rates, self.lr_factors)]
        self.learning_rates.copy_(torch.tensor(rates, dtype=self.learning_rates.dtype))
        n = len(self.x)
        # Frozen members draw their order too: each generator's state stays a function of the epoch.
        order = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)
        loss_sum = torch.zeros_like(self.learning_rates)
        working = self._copy_out()
        for start in range(0, n, self.batch_size):
            if len(working) == 0:
                break
            batch = order[working.members, start : start + self.batch_size]
            rows = batch.flatten()  # index_select of flat rows: 5x faster than x[batch] on CPU
            x = self.x.index_select(0, rows).view(*batch.shape, *self.x.shape[1:])
            y = self.y.index_select(0, rows).view(batch.shape)
            groups = [slice(first, first + self.group_size) for first in range(0, len(working), self.group_size)]
            losses = torch.cat([self._step(working[group], x[group], y[group]) for group in groups])
            loss_sum[working.members] += losses * batch.shape[1]
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                # Frozen at its weights before this step, and out of the working pack from the next.
                self._write_back(working)
                self._freeze(self._mask(working.members[~finite]))
                working = self._copy_out()
        weights_finite = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in working.parameters]).all(0)
        self._write_back(working)
        self.last_epoch_loss = torch.where(self._mask(working.members), loss_sum / n, float("nan"))
        self.epoch += 1
        self._freeze(self._mask(working.members[~weights_finite]))

    def _copy_out(self) -> WorkingPack:
        """The active members as a working pack, so that frozen members cost nothing."""
        members = torch.nonzero(self.active).flatten()
        return WorkingPack(
            members, [p.detach()[members] for p in self.parameters], [b[members] for b in self.momentum_buffers],
            self.learning_rates[members].view(-1, 1, 1), self.weight_decays[members].view(-1, 1, 1),
        )

    def _write_back(self, working: WorkingPack) -> None:
        trained = [*working.parameters, *working.momenta]
        for pack_tensor, copy in zip([*self.parameters, *self.momentum_buffers], trained):
            pack_tensor.detach().index_copy_(0, working.members, copy)

    def _step(self, group: WorkingPack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One SGD step of a `group` of the working pack on its batch (x, y), in place; its batch
        losses. A member whose loss is not finite keeps its parameters and momenta as they were.

        torch.optim.SGD's step for each member, layer by layer as the backward reaches it:
        buf = m·buf + ∇ℓ + λW (λ on weights only), p −= lr·buf. The weight gradient D_lᵀ Z_{l-1}
        goes straight into the momentum with one baddbmm (beta = m; beta = 0 ignores the buffer,
        as SGD without momentum)."""
        spec = self.model.spec
        depth = spec.depth
        weights, biases = group.parameters[:depth], group.parameters[depth:] or None
        output, inputs, activations = forward_layers(x, weights, biases, spec.arch, spec.activation, in_place=True)
        losses, output_gradient = batch_loss_and_output_gradient(output, y, self.loss)
        failed = ~torch.isfinite(losses)
        state = [*group.parameters, *group.momenta]
        kept = [t[failed] for t in state] if bool(failed.any()) else []
        rates, decays = group.learning_rates, group.weight_decays
        for layer, delta in backward_deltas(output_gradient, weights, activations, arch=spec.arch, activation=spec.activation):
            weight, momentum = weights[layer], group.momenta[layer]
            momentum.baddbmm_(delta.transpose(1, 2), inputs[layer], beta=self.momentum)
            momentum.addcmul_(weight, decays)
            weight.addcmul_(momentum, rates, value=-1)
            if biases is not None:
                bias, bias_momentum = biases[layer], group.momenta[depth + layer]
                bias_momentum.mul_(self.momentum).add_(delta.sum(1))
                bias.addcmul_(bias_momentum, rates.view(-1, 1), value=-1)
        for tensor, saved in zip(state, kept):
            tensor[failed] = saved
        return losses

    def _freeze(self, failed: torch.Tensor) -> None:
        newly = failed & self.active
        self.diverged_epoch = torch.where(newly, self.epoch, self.diverged_epoch)
        self.active &= ~failed

    def _mask(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        return torch.zeros_like(self.active).index_fill_(0, indices, True)

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
