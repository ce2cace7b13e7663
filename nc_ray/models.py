"""MLP and residual MLP exactly as SCIENCE.md defines them, in two forms of one definition.

`Network` is a plain single-member `torch.nn.Module`; `PackedNetwork` holds G members with
stacked weights (G x out x in) and runs them in one batched forward. Both call the same
`forward_layers`, so a packed member computes exactly what its single-member module computes.

Layer l multiplies its input: h_l = W_l z_{l-1} (+ b_l).
  mlp:    z_l = act(h_l) for l < L, output h_L.
  resmlp: z_1 = act(h_1); z_l = z_{l-1} + act(h_l) for l = 2..L-1; output h_L.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("mlp", "resmlp")
ACTIVATIONS = {
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
}
# The same functions computed in the storage of their argument (forward_layers(in_place=True)).
_ACTIVATIONS_IN_PLACE = {
    "relu": torch.relu_,
    "leaky_relu": F.leaky_relu_,
    "tanh": torch.tanh_,
}
# He-style gains: keep the forward signal's scale constant through the nonlinearity.
_GAINS = {"relu": math.sqrt(2.0), "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2)), "tanh": 5.0 / 3.0}


@dataclass(frozen=True)
class Architecture:
    """The shape-defining part of a network; members of one pack share it."""

    arch: str
    in_dim: int
    width: int
    depth: int
    n_classes: int
    activation: str = "relu"
    bias: bool = False
    residual_init: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r}: expected one of {list(ARCHITECTURES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {list(ACTIVATIONS)}")
        if self.depth < 2:
            raise ValueError(f"depth={self.depth}: must be >= 2 (input layer and output layer)")
        for name in ("in_dim", "width", "n_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of W_1 .. W_L."""
        hidden = [(self.width, self.width)] * (self.depth - 2)
        return [(self.width, self.in_dim), *hidden, (self.n_classes, self.width)]

    def init_std(self, layer: int) -> float:
        """Std of the normal init of W_layer (1-based).

        Layers feeding the nonlinearity get gain/sqrt(fan_in), the output layer 1/sqrt(fan_in).
        A resmlp's residual branches (layers 2..L-1) and output layer are scaled further:
          residual_init "depth" (the default of new specs): branches x 1/(4 (L-2)), output x 1/sqrt(L);
          residual_init "sqrt_depth" or None (nc_ray 0.1): branches x 1/sqrt(L-2).
        Why: ReLU branches add features of positive mean to the stream, so with 1/sqrt(L-2) the
        stream, the initial outputs (norm 6-10 at depth 8 on digits) and the curvature grow with
        depth, and SGD with momentum diverges at lr 0.05 with MSE. With "depth" the branches
        together add about a quarter of the first layer's features whatever L, and lr 0.05,
        momentum 0.9 trains depths 4-16 with MSE and CE (tests/test_training.py).
        """
        fan_in = self.layer_shapes()[layer - 1][1]
        scaled = self.arch == "resmlp" and self.residual_init == "depth"
        if layer == self.depth:
            return (1.0 / math.sqrt(self.depth) if scaled else 1.0) / math.sqrt(fan_in)
        std = _GAINS[self.activation] / math.sqrt(fan_in)
        if self.arch == "resmlp" and layer > 1:
            std *= 0.25 / (self.depth - 2) if scaled else 1.0 / math.sqrt(self.depth - 2)
        return std


def _member_generator(seed: int, stream: int) -> torch.Generator:
    """Independent CPU generator for one member: stream 0 = initialization, 1 = data order."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def data_order_generator(seed: int) -> torch.Generator:
    """The generator whose successive `randperm` calls give a member's epoch-by-epoch data order."""
    return _member_generator(seed, 1)


def initial_weights(spec: Architecture, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Deterministic float32 initial weights (and zero biases) of the member with this seed."""
    generator = _member_generator(seed, 0)
    weights = [
        torch.randn(out_dim, in_dim, generator=generator) * spec.init_std(layer)
        for layer, (out_dim, in_dim) in enumerate(spec.layer_shapes(), start=1)
    ]
    biases = [torch.zeros(out_dim) for out_dim, _ in spec.layer_shapes()] if spec.bias else None
    return weights, biases


def _linear(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # matmul broadcasting covers (B,in)@(in,out), (G,B,in)@(G,in,out) and shared (B,in)@(G,in,out).
    h = torch.matmul(z, weight.transpose(-1, -2))
    return h if bias is None else h + bias.unsqueeze(-2)


def forward_layers(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    arch: str,
    activation: str,
    *,
    in_place: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run the network; return (output, layer inputs [Z_0 .. Z_{L-1}], pre-activations [h_1 .. h_L]).

    `x` is (B, in) shared by all members, or (G, B, in) per member; weights are (out, in) for one
    member or (G, out, in) for a pack.

    With `in_place` (no autograd), each hidden layer's activation is computed in the storage of
    its pre-activation, and the third list holds act(h_1) .. act(h_{L-1}), then h_L: one tensor
    less per layer, what `nc_ray.train.backward_deltas` takes.
    """
    act = (_ACTIVATIONS_IN_PLACE if in_place else ACTIVATIONS)[activation]
    depth = len(weights)
    inputs: list[torch.Tensor] = []
    pre_activations: list[torch.Tensor] = []
    z = x
    for index, weight in enumerate(weights):
        inputs.append(z)
        h = _linear(z, weight, None if biases is None else biases[index])
        pre_activations.append(h)
        if index == depth - 1:
            z = h
        elif arch == "resmlp" and 0 < index:
            z = z + act(h)
        else:
            z = act(h)
    return z, inputs, pre_activations


class Network(nn.Module):
    """One member: `layers[l-1]` is an `nn.Linear` holding W_l (and b_l if bias)."""

    def __init__(self, spec: Architecture):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(
            nn.Linear(in_dim, out_dim, bias=spec.bias) for out_dim, in_dim in spec.layer_shapes()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_layers(x, self.weight_matrices(), self.bias_vectors(), self.spec.arch, self.spec.activation)[0]

    def weight_matrices(self) -> list[torch.Tensor]:
        """[W_1, ..., W_L] in layer order."""
        return [layer.weight for layer in self.layers]

    def bias_vectors(self) -> list[torch.Tensor] | None:
        return [layer.bias for layer in self.layers] if self.spec.bias else None


def build_model(
    arch: str,
    in_dim: int,
    width: int,
    depth: int,
    n_classes: int,
    activation: str = "relu",
    bias: bool = False,
    seed: int | None = None,
    residual_init: str | None = None,
) -> Network:
    """A single-member network; with `seed`, initialized exactly as that seed's packed member."""
    spec = Architecture(arch, in_dim, width, depth, n_classes, activation, bias, residual_init)
    model = Network(spec)
    if seed is not None:
        weights, biases = initial_weights(spec, seed)
        with torch.no_grad():
            for index, layer in enumerate(model.layers):
                layer.weight.copy_(weights[index])
                if biases is not None:
                    layer.bias.copy_(biases[index])
    return model


class PackedNetwork(nn.Module):
    """G members of one architecture with stacked parameters: weights[l] is (G, out, in)."""

    def __init__(self, spec: Architecture, seeds: Sequence[int]):
        super().__init__()
        if len(seeds) < 1:
            raise ValueError("a pack needs at least one member (seeds is empty)")
        initial = [initial_weights(spec, seed) for seed in seeds]
        self._hold(
            spec,
            [torch.stack([w[layer] for w, _ in initial]) for layer in range(spec.depth)],
            [torch.stack([b[layer] for _, b in initial]) for layer in range(spec.depth)] if spec.bias else None,
        )

    def _hold(self, spec: Architecture, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None) -> None:
        self.spec = spec
        self.weights = nn.ParameterList(nn.Parameter(w) for w in weights)
        self.biases = nn.ParameterList(nn.Parameter(b) for b in biases) if biases is not None else None

    @classmethod
    def from_tensors(cls, spec: Architecture, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None) -> PackedNetwork:
        """A pack whose parameters are these stacked tensors (G, out, in) and (G, out), not copied."""
        pack = cls.__new__(cls)
        nn.Module.__init__(pack)
        pack._hold(spec, weights, biases)
        return pack

    @property
    def size(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) or (G, B, in) -> (G, B, n_classes)."""
        return forward_layers(x, list(self.weights), self.bias_vectors(), self.spec.arch, self.spec.activation)[0]

    def weight_matrices(self) -> list[torch.Tensor]:
        return list(self.weights)

    def bias_vectors(self) -> list[torch.Tensor] | None:
        return list(self.biases) if self.biases is not None else None

    def member(self, index: int) -> Network:
        """A detached single-member copy of member `index` (on CPU, same dtype)."""
        model = Network(self.spec).to(self.weights[0].dtype)
        with torch.no_grad():
            for layer_index, layer in enumerate(model.layers):
                layer.weight.copy_(self.weights[layer_index][index])
                if self.biases is not None:
                    layer.bias.copy_(self.biases[layer_index][index])
        return model

    def select(self, indices: Sequence[int]) -> PackedNetwork:
        """A new pack holding copies of the members at `indices`, in that order."""
        index = list(indices)  # indexing with a list copies
        return PackedNetwork.from_tensors(
            self.spec, [w.detach()[index] for w in self.weights], [b.detach()[index] for b in self.biases] if self.biases is not None else None
        )

    @classmethod
    def from_members(cls, members: Sequence[Network]) -> PackedNetwork:
        """Stack single-member networks of one architecture into a pack (copies, same dtype and device)."""
        spec = members[0].spec
        if any(m.spec != spec for m in members):
            raise ValueError("all members of a pack must share one architecture")

        def stacked(name: str) -> list[torch.Tensor]:
            return [torch.stack([getattr(m.layers[layer], name).detach() for m in members]) for layer in range(spec.depth)]

        return cls.from_tensors(spec, stacked("weight"), stacked("bias") if spec.bias else None)
