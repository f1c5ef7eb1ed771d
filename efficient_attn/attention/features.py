"""Random features for FAVOR+ (Choromanski et al. 2021): projection matrices and feature maps.

Inputs x are already scaled by D^(-1/4), so that φ(q)·φ(k) estimates exp(qᵀk/√D).
Constant factors that cancel between numerator and denominator (1/√m, h(q)) are left out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

KERNELS = ("softmax", "softmax_trig", "relu")
_MAX_KEY_LOG_SCALE = 40.0


def gaussian_projection(
    num_features: int, dim: int, *, orthogonal: bool, generator: torch.Generator | None = None
) -> Tensor:
    """(m, d) matrix of Gaussian rows; orthogonal=True stacks Haar-random orthogonal d×d blocks whose
    rows are rescaled by chi_d-distributed norms (so each row is marginally N(0, I_d))."""
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gauss = torch.randn(dim, dim, generator=generator)
        q, r = torch.linalg.qr(gauss)  # q (d, d) orthogonal
        q = q * torch.sign(torch.diagonal(r))  # sign fix: makes q Haar-distributed
        blocks.append(q.T)  # rows orthonormal
    rows = torch.cat(blocks)[:num_features]  # (m, d)
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1)  # (m,) ~ chi_d
    return rows * norms[:, None]


def positive_features(x: Tensor, w: Tensor, is_query: bool, *, fresh_grad: bool = False) -> Tensor:
    """Positive softmax-kernel features exp(wᵢᵀx − ‖x‖²/2), stabilized without any cross-key statistic.

    Keys:    exp(c − ‖x − wᵢ‖²/2)  = exp(wᵢᵀx − ‖x‖²/2) · exp(c − ‖wᵢ‖²/2)   ≤ e^c for every input
    Queries: exp(wᵢᵀx + ‖wᵢ‖²/2 − c − r_x), r_x = max_i(wᵢᵀx + ‖wᵢ‖²/2 − c)  ≤ 1
    The per-feature factors exp(±(‖wᵢ‖²/2 − c)) cancel in the product; exp(−‖q‖²/2 − r_q) is one
    factor per query row and cancels in the row's ratio. No future or padded key can move the
    scale of another key, so causal and padded outputs are exact (no leak through a global max).
    c = min(d/4, 40) keeps typical products well inside fp32 range for d ≤ 128 (tested at 4× norms
    for d = 64); around d = 256 the smallest useful products approach fp32 underflow.
    x (B, H, N, d), w (m, d) -> (B, H, N, m). ``fresh_grad``: see ``KernelAttention.feature_map``.
    """
    return _PositiveFeatures.apply(x, w, is_query, fresh_grad)


class _PositiveFeatures(torch.autograd.Function):
    """exp of one matrix product. With ``fresh_grad`` the backward allocates no (N, m) buffer (on
    CPU, fresh buffers of that size cost as much as the arithmetic): it overwrites the incoming
    gradient, which the caller promises no one else holds."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, is_query: bool, fresh_grad: bool) -> Tensor:
        c = min(w.shape[1] / 4.0, _MAX_KEY_LOG_SCALE)
        bias = w.square().sum(-1) / 2.0 - c  # (m,): ‖wᵢ‖²/2 − c
        if is_query:
            logits = torch.matmul(x, w.T).add_(bias)  # (B, H, N, m)
            logits.sub_(logits.amax(-1, keepdim=True))  # r_x; cancels in the ratio, so no gradient
        else:  # one product gives wᵢᵀx − ‖x‖²/2: x gains a column ‖x‖²/2, w a column −1
            w = torch.cat([w, -torch.ones_like(w[:, :1])], dim=-1)  # (m, d+1)
            x_aug = torch.cat([x, x.square().sum(-1, keepdim=True) / 2.0], dim=-1)  # (B, H, N, d+1)
            logits = torch.matmul(x_aug, w.T).sub_(bias)  # (B, H, N, m)
        phi = logits.exp_()
        ctx.save_for_backward(phi, x, w)
        ctx.is_query, ctx.fresh_grad = is_query, fresh_grad
        return phi

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_phi: Tensor):
        phi, x, w = ctx.saved_tensors
        reuse = ctx.fresh_grad and grad_phi.is_contiguous()
        grad_logits = grad_phi.mul_(phi) if reuse else grad_phi * phi  # (B, H, N, m): dφ/dlogits = φ
        grad_x = torch.matmul(grad_logits, w)  # (B, H, N, d) or (B, H, N, d+1)
        if not ctx.is_query:  # d(‖x‖²/2)/dx = x
            grad_x = grad_x[..., :-1].addcmul_(x, grad_x[..., -1:])  # (B, H, N, d)
        return grad_x, None, None, None


def trig_features(x: Tensor, w: Tensor, is_query: bool) -> Tensor:
    """Trigonometric features h(x)[sin(Wx), cos(Wx)], h(x) = exp(‖x‖²/2) (2m features).

    Unbiased but not positive: the normalizer can be near zero or negative (the paper's point).
    h(q) is one factor per query row and cancels, so queries use h = 1.
    x (B, H, N, d), w (m, d) -> (B, H, N, 2m).
    """
    logits = x @ w.T  # (B, H, N, m)
    feats = torch.cat([torch.sin(logits), torch.cos(logits)], dim=-1)  # (B, H, N, 2m)
    if is_query:
        return feats
    return feats * torch.exp(x.square().sum(-1, keepdim=True) / 2.0)  # (B, H, N, 2m)


def relu_features(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """Generalized-attention features relu(Wx) + eps (Performer's ReLU kernel). -> (B, H, N, m)."""
    return torch.relu(x @ w.T) + eps  # (B, H, N, m)
