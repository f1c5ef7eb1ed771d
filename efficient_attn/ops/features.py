"""Random features for FAVOR+ (Choromanski et al. 2021): projection matrices and feature maps.

Inputs x are already scaled by D^(-1/4), so that φ(q)·φ(k) estimates exp(qᵀk/√D).
Constant factors that cancel between numerator and denominator (1/√m, h(q)) are left out.

Every map returns ``(features, log_scale)``: the true features are ``features · exp(log_scale)``,
with ``log_scale`` (B, H, N) one number per row (None when the features are exact as returned).
Keys carry their scale apart, so that the attention can set it against the largest key it may
see (the whole unpadded set, or the causal prefix) — see ``KernelAttention``. A query's scale is
one factor per output row and cancels in the row's ratio, so queries only divide it out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .differentiable import double_backward_by_recompute

KERNELS = ("softmax", "softmax_hyp", "softmax_trig", "relu")
PROJECTIONS = ("iid", "orthogonal", "simplex")

Features = tuple[Tensor, "Tensor | None"]


def random_projection(
    num_features: int, dim: int, kind: str = "orthogonal", generator: torch.Generator | None = None,
    *, dtype: torch.dtype | None = None,
) -> Tensor:
    """(m, d) matrix whose rows are each marginally N(0, I_d), drawn from ``generator``.

    kind="iid": independent Gaussian rows.
    kind="orthogonal" (ORFs, Choromanski et al. 2021): blocks of d rows, the d directions of each
    block orthonormal (one Haar-random d×d rotation per block).
    kind="simplex" (SimRFs, Reid et al. 2023, "Simplex Random Features"): in each block the d
    directions are the vertices of a regular simplex centred at 0 (pairwise cosine −1/(d−1)) under
    one Haar-random rotation: the rows of ``_simplex(d)`` times the same rotation the orthogonal
    block would use.
    Both block kinds then scale every row by an independent chi_d norm (the norm of a fresh Gaussian
    row), so each row is marginally N(0, I_d) and the estimators stay unbiased; the last block is
    cut to m rows. With the same generator state the two block kinds share rotations and norms.
    d = 1 has no simplex: it falls back to orthogonal (a single ±1 direction per block).
    ``dtype``: of the draws (torch's default dtype if None).
    """
    if kind not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
    if kind == "iid":
        return torch.randn(num_features, dim, generator=generator, dtype=dtype)
    simplex = _simplex(dim, dtype) if kind == "simplex" and dim > 1 else None  # (d, d) or None
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gauss = torch.randn(dim, dim, generator=generator, dtype=dtype)
        q, r = torch.linalg.qr(gauss)  # q (d, d) orthogonal
        q = q * torch.sign(torch.diagonal(r))  # sign fix: makes q Haar-distributed
        blocks.append(q.T if simplex is None else simplex @ q.T)  # rows: unit directions, rotated
    rows = torch.cat(blocks)[:num_features]  # (m, d)
    norms = torch.randn(num_features, dim, generator=generator, dtype=dtype).norm(dim=1)  # (m,) ~ chi_d
    return rows * norms[:, None]


def _simplex(dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """(d, d): the d vertices of a regular simplex centred at 0, as unit rows in R^d.

    Row i is e_i − 1/d·𝟙 normalised (norm² (d−1)/d): the rows sum to 0 and span the d−1 dimensions
    orthogonal to 𝟙, with pairwise dot products (−1/d)/((d−1)/d) = −1/(d−1).
    """
    centred = torch.eye(dim, dtype=torch.float64) - 1.0 / dim  # (d, d)
    return (centred * math.sqrt(dim / (dim - 1))).to(dtype or torch.get_default_dtype())


def gaussian_projection(
    num_features: int, dim: int, *, orthogonal: bool, generator: torch.Generator | None = None
) -> Tensor:
    """``random_projection`` with kind "orthogonal" or "iid", chosen by a boolean."""
    return random_projection(num_features, dim, "orthogonal" if orthogonal else "iid", generator)


def positive_features(x: Tensor, w: Tensor, is_query: bool, *, fresh_grad: bool = False) -> Features:
    """Positive softmax-kernel features exp(wᵢᵀx − ‖x‖²/2), returned as (exp(wᵢᵀx − r_x), log_scale).

    r_x = maxᵢ wᵢᵀx, so every returned feature lies in (0, 1] and the largest is exactly 1:
    nothing overflows and a row's own dominant feature never underflows, whatever ‖x‖.
    Keys: log_scale = r_x − ‖x‖²/2, applied by the attention against the largest visible key.
    Queries: log_scale = None (exp(r_x − ‖x‖²/2) is one factor per output row and cancels).
    Gradients treat r_x as a constant (it cancels), and include the −‖x‖²/2 of keys.
    x (B, H, N, d), w (m, d) -> features (B, H, N, m), log_scale (B, H, N) or None.
    ``fresh_grad``: see ``KernelAttention.feature_map``.
    """
    phi, row_max = _PositiveFeatures.apply(x, w, is_query, fresh_grad)
    if is_query:
        return phi, None
    return phi, row_max - x.detach().square().sum(-1) / 2.0  # (B, H, N)


class _PositiveFeatures(torch.autograd.Function):
    """exp(xWᵀ − r_x) with r_x its row maximum (a constant for autograd). With ``fresh_grad`` the
    backward allocates no (N, m) buffer (on CPU, fresh buffers of that size cost as much as the
    arithmetic): it overwrites the incoming gradient, which the caller promises no one else holds.
    Second derivatives (``create_graph=True``) are exact: the backward then re-runs a plain autograd
    version of the same function."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, is_query: bool, fresh_grad: bool) -> tuple[Tensor, Tensor]:
        logits = torch.matmul(x, w.T)  # (B, H, N, m)
        row_max = logits.amax(-1)  # (B, H, N)
        phi = logits.sub_(row_max[..., None]).exp_()  # (B, H, N, m), in (0, 1]
        ctx.save_for_backward(phi, x, w)
        ctx.is_query, ctx.fresh_grad = is_query, fresh_grad
        ctx.mark_non_differentiable(row_max)
        return phi, row_max

    @staticmethod
    def backward(ctx, grad_phi: Tensor, _grad_row_max: Tensor | None):
        phi, x, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            (grad_x,) = double_backward_by_recompute(
                lambda t: positive_features_plain(t, w, ctx.is_query), (x,), (grad_phi,)
            )
            return grad_x, None, None, None
        reuse = ctx.fresh_grad and grad_phi.is_contiguous()
        grad_logits = grad_phi.mul_(phi) if reuse else grad_phi * phi  # (B, H, N, m): dφ/dlogits = φ
        if ctx.is_query:
            return torch.matmul(grad_logits, w), None, None, None  # (B, H, N, d)
        # keys' features carry −‖x‖²/2, whose gradient is −x·Σᵢ grad_logitsᵢ: a column of −1 appended
        # to w makes the same product return that sum, so no extra pass over (N, m)
        w_aug = torch.cat([w, -torch.ones_like(w[:, :1])], dim=-1)  # (m, d+1)
        grad_aug = torch.matmul(grad_logits, w_aug)  # (B, H, N, d+1)
        return grad_aug[..., :-1].addcmul_(x, grad_aug[..., -1:]), None, None, None  # (B, H, N, d)


def positive_features_plain(x: Tensor, w: Tensor, is_query: bool) -> Tensor:
    """The forward of ``_PositiveFeatures`` in plain autograd ops (same value, same constant r_x)."""
    logits = x @ w.T  # (B, H, N, m)
    phi = torch.exp(logits - logits.detach().amax(-1, keepdim=True))
    if is_query:
        return phi
    half_sq = x.square().sum(-1, keepdim=True) / 2.0  # (B, H, N, 1)
    return phi * torch.exp(half_sq.detach() - half_sq)  # value unchanged; gradient of −‖x‖²/2


def hyperbolic_features(x: Tensor, w: Tensor, is_query: bool, *, fresh_grad: bool = False) -> Features:
    """Hyperbolic positive features exp(−‖x‖²/2)[exp(wᵢᵀx), exp(−wᵢᵀx)] (2m features; Performer
    paper, Lemma 1: φ(x)·φ(y) averages exp(−(‖x‖²+‖y‖²)/2)·cosh(wᵢᵀ(x+y)), unbiased for exp(xᵀy),
    with lower variance than ``positive_features`` with the same m projections).

    These are exactly the positive features of the 2m rows [w; −w], so this is
    ``positive_features(x, [w; −w])`` with the same stabilisation: r_x = maxᵢ |wᵢᵀx| over the 2m
    logits ±wᵢᵀx, features in (0, 1], a key's log_scale r_x − ‖x‖²/2, queries' scale dropped; the
    constant 1/√(2m) cancels and is left out. x (B, H, N, d), w (m, d) -> (B, H, N, 2m), log_scale.
    """
    return positive_features(x, torch.cat([w, -w]), is_query, fresh_grad=fresh_grad)  # w: (2m, d)


def trig_features(x: Tensor, w: Tensor, is_query: bool) -> Features:
    """Trigonometric features h(x)[sin(Wx), cos(Wx)], h(x) = exp(‖x‖²/2) (2m features).

    Unbiased but not positive: the normalizer can be near zero or negative (the paper's point).
    Keys return h in log form (log_scale = ‖x‖²/2), so it cannot overflow; h(q) is one factor per
    query row and cancels, so queries use h = 1.
    x (B, H, N, d), w (m, d) -> features (B, H, N, 2m), log_scale (B, H, N) or None.
    """
    logits = x @ w.T  # (B, H, N, m)
    feats = torch.cat([torch.sin(logits), torch.cos(logits)], dim=-1)  # (B, H, N, 2m)
    if is_query:
        return feats, None
    half_sq = x.square().sum(-1, keepdim=True) / 2.0  # (B, H, N, 1)
    feats = feats * torch.exp(half_sq - half_sq.detach())  # value unchanged; gradient of h(x)
    return feats, half_sq.detach().squeeze(-1)


def relu_features(x: Tensor, w: Tensor, eps: float) -> Features:
    """Generalized-attention features relu(Wx) + eps (Performer's ReLU kernel). -> (B, H, N, m), None."""
    return torch.relu(x @ w.T) + eps, None  # (B, H, N, m)
