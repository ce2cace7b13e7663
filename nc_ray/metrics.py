"""Per-layer collapse, rank and bound-certificate metrics, every name and formula as in docs/science.md.

Computed for all G members of a pack at once: batched SVDs of W_l, and class statistics of each
layer's input Z_{l-1} streamed over the metric set in chunks, in two passes (class means first,
then deviations from them), so the metric set never has to fit in memory as a whole. The
certificate uses the per-sample output gradients δ_i = ∂ℓ_i/∂h_i, from one backward pass per chunk.

Precision: the forward and backward passes run in the network's own dtype (the function it was
trained as); everything after them (class means, deviations, sums, Δ Zᵀ, SVDs, norms, the
certificate) in float64. The certificate is an identity between the Z and Δ it is given,
λW = G − (1/N)ΔZᵀ with G := (1/N)ΔZᵀ + λW, so it holds to float64 rounding whatever their
precision; a float32 network's grad_norm carries its forward pass's float32 rounding (~1e-7
relative to ||ΔZᵀ||/N). A float64 network is measured in float64 throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nc_ray.models import Network, PackedNetwork, forward_layers
from nc_ray.schema import MEMBER_METRICS, UNDEFINED_ON_ZERO_MATRIX
from nc_ray.train import per_sample_loss

RANK_THRESHOLDS = {"rank_rel_1e1": 1e-1, "rank_rel_1e2": 1e-2, "rank_rel_1e3": 1e-3}
# A layer with sv_max below this is numerically the zero map: its spectrum is floating-point
# noise, so relative quantities (ranks, ratios, stationarity) are not defined on it.
ZERO_SV_MAX = 1e-10
# Relative tolerance of the certificate checks: dist_k and b0 are float64 results of different
# computations (an SVD versus matrix products), which agree to ~1e-13 of ||W||_F.
BOUND_TOLERANCE = 1e-9
# Singular values of M̃ below this fraction of the largest are treated as zero by the pseudo-inverse
# (M̃ has rank <= K-1 by construction, and its null direction comes out at ~1e-16 relative).
PINV_RTOL = 1e-10
# Directions of the class-mean span Q kept by its projector: singular values of the (uncentered)
# class-mean matrix above this fraction of the largest. A smaller span only loosens b0_perp; the
# projector is exactly orthogonal (orthonormal SVD columns) whatever is cut.
SPAN_RTOL = 1e-10
# Chunks whose (members x samples x width) float64 tensors stay near this size keep the
# elementwise passes in cache: on digits (32 members, width 64) 256-sample chunks make a whole
# evaluation ~35% faster than one chunk, despite the second forward pass. Below 128 samples the
# per-chunk Python overhead dominates.
_CHUNK_TENSOR_BYTES = 4 * 2**20
_MIN_CHUNK = 128


@dataclass(frozen=True)
class PackMetrics:
    """Metrics of a pack on one metric set.

    `layer[name]` is (G, L); `penultimate[name]` and `member[name]` are (G,) (penultimate ones
    belong to layer L, whose input is the penultimate features; member ones are `loss`,
    `accuracy` and `objective`); `singular_values[l]` is (G, min(out, in)) for layer l+1, descending.
    """

    layer: dict[str, np.ndarray]
    penultimate: dict[str, np.ndarray]
    member: dict[str, np.ndarray]
    singular_values: list[np.ndarray]
    n_samples: int

    def rows(self, index: int) -> list[dict]:
        """One dict per layer (1..L) for member `index`, with exactly the table's column names
        (the per-member `objective` repeated on each)."""
        depth = len(self.singular_values)
        per_member = {name: _scalar(self.member[name][index]) for name in MEMBER_METRICS}
        rows = []
        for layer in range(depth):
            row = {"layer": layer + 1}
            row.update({name: _scalar(values[index, layer]) for name, values in self.layer.items()})
            row.update({name: _scalar(values[index]) if layer == depth - 1 else None for name, values in self.penultimate.items()})
            row.update(per_member)
            row["singular_values"] = self.singular_values[layer][index].tolist()
            rows.append(row)
        return rows


def _scalar(value: np.generic) -> float | int | bool | None:
    value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def spectrum_metrics(weights: torch.Tensor, n_classes: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Spectral metrics of a batch of matrices (G, out, in), and their singular values (G, r).

    On a numerically zero matrix (sv_max < ZERO_SV_MAX) the rank_rel_* are 0 and the relative
    quantities (stable_rank, effective_rank, dist_k_rel) are NaN (stored null).
    """
    sv = torch.linalg.svdvals(weights)
    sv_max = sv[:, 0]
    frobenius_sq = sv.square().sum(1)
    zero = sv_max < ZERO_SV_MAX
    p = sv / sv.sum(1, keepdim=True).clamp_min(torch.finfo(sv.dtype).tiny)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(sv.dtype).tiny))).sum(1)
    out = {
        "sv_max": sv_max,
        "weight_norm": frobenius_sq.sqrt(),
        "stable_rank": frobenius_sq / sv_max.square(),
        "effective_rank": torch.exp(entropy),
        **{name: torch.where(zero, 0, (sv > eps * sv_max[:, None]).sum(1)) for name, eps in RANK_THRESHOLDS.items()},
        "dist_k": sv[:, n_classes:].square().sum(1).sqrt(),
        "dist_km1": sv[:, n_classes - 1 :].square().sum(1).sqrt(),
    }
    out["dist_k_rel"] = out["dist_k"] / frobenius_sq.sqrt()
    for name in ("stable_rank", "effective_rank", "dist_k_rel"):
        out[name] = torch.where(zero, math.nan, out[name])
    return out, sv


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _span_basis(class_means: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns (..., n, K) spanning the class means (..., K, n), directions below
    SPAN_RTOL of the largest singular value zeroed: U Uᵀ is the orthogonal projector Q."""
    u, sv, _ = torch.linalg.svd(class_means.transpose(-1, -2), full_matrices=False)
    keep = sv > SPAN_RTOL * sv[..., :1]
    return u * keep.unsqueeze(-2)


def _remove_span(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """a (I − Q) = a − (a U) Uᵀ: the part of a's rows outside the span of U's columns."""
    return a - (a @ basis) @ basis.transpose(-1, -2)


@torch.no_grad()
def evaluate(model: PackedNetwork, x: torch.Tensor, y: torch.Tensor, loss: str, chunk_size: int = 8192) -> dict[str, np.ndarray]:
    """Mean loss and accuracy of every member on (x, y): {"loss": (G,), "accuracy": (G,)}."""
    device = model.weights[0].device
    total_loss = torch.zeros(model.size, dtype=torch.float64, device=device)
    correct = torch.zeros(model.size, dtype=torch.float64, device=device)
    for part in _chunks(len(x), chunk_size):
        xb, yb = x[part].to(device), y[part].to(device)
        output = model(xb)
        total_loss += per_sample_loss(output, yb, loss).double().sum(1)
        correct += (output.argmax(-1) == yb).double().sum(1)
    return {"loss": (total_loss / len(x)).cpu().numpy(), "accuracy": (correct / len(x)).cpu().numpy()}


def pack_metrics(
    model: PackedNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weight_decays: Sequence[float] | torch.Tensor,
    loss: str,
    n_classes: int,
    chunk_size: int | None = None,
) -> PackMetrics:
    """All metrics of docs/science.md for every member and layer, on the metric set (x, y).

    The certificate is for the objective F_λ on exactly this set: G_l = (1/N) Δ Zᵀ + λ W_l,
    b0 = b0_grad + b0_tcv = ||G_l||_F / λ + ||Δ(Z − M)ᵀ||_F / (Nλ), and b0_perp with the
    within-class deviation inside the class-mean span removed: ||Δ((I − Q)(Z − M))ᵀ||_F.
    With λ = 0 the b-bounds are +inf (vacuous) and stationarity is undefined.
    """
    device = model.weights[0].device
    forward_dtype = model.weights[0].dtype
    weights = [w.detach().to(torch.float64) for w in model.weights]
    biases = [b.detach() for b in model.biases] if model.biases is not None else None
    arch, activation = model.spec.arch, model.spec.activation
    decay = torch.as_tensor(weight_decays, dtype=torch.float64, device=device)
    size, depth, n = model.size, len(weights), len(x)
    x = x.to(device=device, dtype=forward_dtype)
    y = y.to(device)
    if chunk_size is None:
        widest = max(max(w.shape[1:]) for w in weights)
        chunk_size = max(_MIN_CHUNK, _CHUNK_TENSOR_BYTES // (8 * size * widest))
    parts = _chunks(n, chunk_size)
    counts = torch.bincount(y, minlength=n_classes).to(torch.float64)
    present = counts > 0

    # Leaves that require grad give the pre-activations a graph, through which δ = ∂ℓ/∂h flows.
    graph_weights = [w.detach().clone().requires_grad_() for w in model.weights]

    def forward_with_graph(part: slice) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        with torch.enable_grad():
            return forward_layers(x[part], graph_weights, biases, arch, activation)

    def as_float64(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [z.detach().double() for z in inputs]

    # A metric set that fits in one chunk is run forward (and cast) once and serves both passes.
    single = forward_with_graph(parts[0]) if len(parts) == 1 else None
    single_inputs = as_float64(single[1]) if single else None

    # Pass 1: class means μ_c and global mean μ_G of every layer's input. Layer 1's input is
    # the data, shared by the pack: its statistics are computed once, without a member axis.
    class_sums = [0.0] * depth
    with torch.no_grad():
        for part in parts:
            onehot = torch.nn.functional.one_hot(y[part], n_classes).to(torch.float64).T
            inputs = single_inputs or as_float64(forward_layers(x[part], list(model.weights), biases, arch, activation)[1])
            for layer, z in enumerate(inputs):
                class_sums[layer] = class_sums[layer] + onehot @ z
    means, centered_means, between_sq, span, projections = [], [], [], [], []
    for sums in class_sums:
        mean = sums / counts.clamp_min(1)[:, None]
        global_mean = sums.sum(-2) / n
        centered = mean - global_mean.unsqueeze(-2)
        m_tilde = centered[..., present, :].transpose(-1, -2)  # (G,) n x K_present
        means.append(mean)
        centered_means.append(m_tilde)
        pinv = torch.linalg.pinv(m_tilde, rtol=PINV_RTOL)
        between_sq.append((centered.square().sum(-1) * counts).sum(-1))  # Σ_c n_c ||μ_c − μ_G||²
        span.append(_span_basis(mean[..., present, :]))  # Q of the uncentered class means
        # [U | M̃⁺ᵀ]: a deviation times it gives, in one product, its coordinates in the class-mean
        # span (tcv_perp) and in the between-class directions (nc1).
        projections.append(torch.cat([span[-1], pinv.transpose(-1, -2)], -1))

    # Pass 2: deviations z_i − μ_c(i) (and their part outside the class-mean span), and δ_i by
    # one backward pass per chunk. Δ(Z − M)ᵀ is accumulated directly, not as ΔZᵀ − ΔMᵀ, so that
    # it keeps its precision when the features are nearly collapsed.
    zeros = lambda: torch.zeros(size, depth, dtype=torch.float64, device=device)  # noqa: E731
    tcv, tcv_sq, tcv_in_span_sq, nc1_sum, delta_max, delta_sq = zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
    delta_deviation = [torch.zeros(size, *w.shape[1:], dtype=torch.float64, device=device) for w in weights]
    delta_class = [torch.zeros(size, n_classes, w.shape[1], dtype=torch.float64, device=device) for w in weights]
    loss_sum = torch.zeros(size, dtype=torch.float64, device=device)
    correct = torch.zeros_like(loss_sum)
    ncc_mismatch = torch.zeros_like(loss_sum)
    for part in parts:
        yb = y[part]
        onehot = torch.nn.functional.one_hot(yb, n_classes).to(torch.float64)
        output, inputs, pre_activations = single or forward_with_graph(part)
        inputs = single_inputs or as_float64(inputs)
        with torch.enable_grad():
            sample_losses = per_sample_loss(output, yb, loss)
            deltas = torch.autograd.grad(sample_losses.sum(), pre_activations)
        with torch.no_grad():
            loss_sum += sample_losses.detach().double().sum(1)
            prediction = output.detach().argmax(-1)
            correct += (prediction == yb).double().sum(1)
            for layer in range(depth):
                z, delta = inputs[layer], deltas[layer].double()
                deviation = z - means[layer][..., yb, :]
                deviation_norm = torch.linalg.vector_norm(deviation, dim=-1)
                tcv[:, layer] += deviation_norm.sum(-1)
                tcv_sq[:, layer] += deviation_norm.square().sum(-1)
                coordinates = (deviation @ projections[layer]).square()
                in_span = span[layer].shape[-1]
                tcv_in_span_sq[:, layer] += coordinates[..., :in_span].sum((-2, -1))
                nc1_sum[:, layer] += coordinates[..., in_span:].sum((-2, -1))
                delta_norm = torch.linalg.vector_norm(delta, dim=-1)
                delta_max[:, layer] = torch.maximum(delta_max[:, layer], delta_norm.max(1).values)
                delta_sq[:, layer] += delta_norm.square().sum(1)
                delta_deviation[layer] += delta.transpose(1, 2) @ deviation
                delta_class[layer] += onehot.T @ delta
            distances = torch.cdist(inputs[-1], means[-1][:, present])
            nearest = torch.nonzero(present).flatten()[distances.argmin(-1)]
            ncc_mismatch += (nearest != prediction).double().sum(1)

    spectra = [spectrum_metrics(w, n_classes) for w in weights]
    layer = {name: torch.stack([s[0][name] for s in spectra], 1).to(torch.float64) for name in spectra[0][0]}
    for name in RANK_THRESHOLDS:
        layer[name] = layer[name].to(torch.int64)
    zero = layer["sv_max"] < ZERO_SV_MAX
    layer["tcv"] = tcv / n
    layer["tcv_sq"] = tcv_sq / n
    # Σ_i ||z_i − μ_G||² = Σ_i ||z_i − μ_c(i)||² + Σ_c n_c ||μ_c − μ_G||²; 0/0 (all inputs equal) is NaN, stored null.
    total_sq = tcv_sq + torch.stack(torch.broadcast_tensors(*between_sq), 1)
    layer["tcv_rel"] = tcv_sq / total_sq
    # ||(I − Q)d||² = ||d||² − ||Uᵀd||² (U orthonormal): its rounding is ~1e-16 of tcv_sq, so of the
    # relative measure too; clamped at 0 against it.
    layer["tcv_perp_rel"] = (tcv_sq - tcv_in_span_sq).clamp_min(0) / total_sq
    layer["nc1"] = nc1_sum / n
    grad_norm, deviation_norm, deviation_perp_norm = zeros(), zeros(), zeros()
    for index in range(depth):
        # Δ Zᵀ = Δ(Z − M)ᵀ + Δ Mᵀ, with Δ Mᵀ = Σ_c (Σ_{i in c} δ_i) μ_cᵀ.
        delta_z = delta_deviation[index] + delta_class[index].transpose(1, 2) @ means[index]
        grad_norm[:, index] = torch.linalg.matrix_norm(delta_z / n + decay[:, None, None] * weights[index])
        deviation_norm[:, index] = torch.linalg.matrix_norm(delta_deviation[index]) / n
        perp = torch.linalg.matrix_norm(_remove_span(delta_deviation[index], span[index])) / n
        # ||A(I − Q)||_F <= ||A||_F exactly; the min only removes rounding above it.
        deviation_perp_norm[:, index] = torch.minimum(perp, deviation_norm[:, index])
    decay_col = decay[:, None].expand(size, depth)
    regularized = decay_col > 0

    def per_decay(numerator: torch.Tensor) -> torch.Tensor:
        return torch.where(regularized, numerator / torch.where(regularized, decay_col, 1.0), math.inf)

    layer["grad_norm"] = grad_norm
    layer["stationarity"] = torch.where(regularized & ~zero, grad_norm / (decay_col * layer["weight_norm"]), math.nan)
    layer["b0_grad"] = per_decay(grad_norm)
    layer["b0_tcv"] = per_decay(deviation_norm)
    layer["b0"] = layer["b0_grad"] + layer["b0_tcv"]
    layer["b0_perp"] = layer["b0_grad"] + per_decay(deviation_perp_norm)
    layer["b1"] = per_decay(delta_max * layer["tcv"] + grad_norm)
    layer["b2"] = per_decay((delta_sq / n).sqrt() * layer["tcv_sq"].sqrt() + grad_norm)
    slack = BOUND_TOLERANCE * layer["weight_norm"]
    for bound, flag, ratio in (("b0", "bound_ok", "bound_ratio"), ("b0_perp", "bound_perp_ok", "bound_perp_ratio")):
        layer[flag] = layer["dist_k"] <= layer[bound] + slack
        layer[ratio] = torch.where(layer[bound] > 0, layer["dist_k"] / layer[bound], torch.zeros_like(layer[bound]))
    for name in ("bound_ratio", "bound_perp_ratio"):
        layer[name] = torch.where(zero, math.nan, layer[name])
    frobenius_sq = layer["weight_norm"].square()
    balance = torch.full_like(frobenius_sq, math.nan)
    balance[:, :-1] = (frobenius_sq[:, 1:] - frobenius_sq[:, :-1]).abs() / frobenius_sq[:, :-1]
    layer["balance_gap"] = balance

    penultimate = _penultimate_metrics(centered_means[-1], weights[-1][:, present])
    penultimate["nc4"] = ncc_mismatch / n
    member = {"loss": loss_sum / n, "accuracy": correct / n}
    member["objective"] = member["loss"] + decay / 2 * frobenius_sq.sum(1)
    to_numpy = lambda d: {k: v.cpu().numpy() for k, v in d.items()}  # noqa: E731
    return PackMetrics(
        layer=to_numpy(layer),
        penultimate=to_numpy(penultimate),
        member=to_numpy(member),
        singular_values=[s[1].cpu().numpy() for s in spectra],
        n_samples=n,
    )


def _penultimate_metrics(m_tilde: torch.Tensor, last_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """NC2 (equinorm, equiangularity) and NC3 (self-duality) from M̃ (G, n, K) and W_L (G, K, n)."""
    n_classes = m_tilde.shape[-1]
    norms = m_tilde.norm(dim=1)
    equinorm = norms.std(1, correction=0) / norms.mean(1)
    unit = m_tilde / norms[:, None, :].clamp_min(torch.finfo(m_tilde.dtype).tiny)
    cosines = unit.transpose(1, 2) @ unit
    off_diagonal = ~torch.eye(n_classes, dtype=torch.bool, device=m_tilde.device)
    equiangular = (cosines[:, off_diagonal] + 1.0 / (n_classes - 1)).abs().mean(1)
    weight_t = last_weight.transpose(1, 2)
    nc3 = (
        weight_t / torch.linalg.matrix_norm(weight_t)[:, None, None]
        - m_tilde / torch.linalg.matrix_norm(m_tilde)[:, None, None]
    )
    return {"nc2_equinorm": equinorm, "nc2_equiangular": equiangular, "nc3": torch.linalg.matrix_norm(nc3)}


def member_metrics(model: Network, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float, loss: str) -> list[dict]:
    """Every metric of one network (yours or a sweep's) on a metric set, one dict per layer.

    Args:
        model: a `build_model` network (`nc_ray.load_member` gives a sweep's members as one).
        x, y: the metric set: inputs (N, in) in the network's dtype and integer labels (N,).
            For the certificate to be about the trained objective, pass the training set.
        weight_decay: λ of the objective F_λ the certificate is for.
        loss: "ce" or "mse".

    Returns:
        One dict per layer l = 1..L with the metric columns of docs/science.md (the penultimate
        ones filled on layer L only), `objective` = F_λ on (x, y), and also the member's `loss`
        and `accuracy` on (x, y); `singular_values` is a list.

    Example::

        model = nc_ray.models.build_model("mlp", in_dim=12, width=16, depth=3, n_classes=4, seed=0)
        rows = member_metrics(model, x, y, weight_decay=1e-3, loss="ce")
        assert all(r["dist_k"] <= r["b0_perp"] <= r["b0"] for r in rows)
    """
    pack = PackedNetwork.from_members([model]).to(model.layers[0].weight.device)
    result = pack_metrics(pack, x, y, weight_decays=[weight_decay], loss=loss, n_classes=model.spec.n_classes)
    rows = result.rows(0)
    for row in rows:
        row.update({name: float(result.member[name][0]) for name in ("loss", "accuracy")})
    return rows
