"""The plain way to train one network, the benchmarks' baseline: torch.optim.SGD on one module.

Coupled L2 on the weight matrices only and the member's own data order, as nc_ray's packs train,
so that the baseline trains the very networks a pack does.
"""

from __future__ import annotations

import torch

from nc_ray.models import Network, data_order_generator
from nc_ray.train import per_sample_loss


def train_alone(
    model: Network, x: torch.Tensor, y: torch.Tensor, *,
    lr: float, momentum: float, weight_decay: float, batch_size: int, epochs: int, seed: int, loss: str,
) -> None:
    """`epochs` passes of mini-batch SGD over (x, y) in the order `seed` draws."""
    optimizer = torch.optim.SGD([{"params": model.weight_matrices(), "weight_decay": weight_decay}], lr=lr, momentum=momentum)
    order = data_order_generator(seed)
    for _ in range(epochs):
        permutation = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), batch_size):
            batch = permutation[start : start + batch_size]
            optimizer.zero_grad()
            per_sample_loss(model(x[batch]), y[batch], loss).mean().backward()
            optimizer.step()
