"""Random features for FAVOR+ (Choromanski et al. 2021): projection matrices and feature maps.

Inputs x are already scaled by D^(-1/4), so that φ(q)·φ(k) estimates exp(qᵀk/√D).
Constant factors that cancel between numerator and denominator (1/√m, h(q)) are left out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def positive_features(x: Tensor, w: Tensor, is_query: bool) -> Tensor:
    """Positive softmax-kernel features exp(wᵢᵀx − ‖x‖²/2), stabilized without any cross-key statistic.

    Keys:    exp(c − ‖x − wᵢ‖²/2)  = exp(wᵢᵀx − ‖x‖²/2) · exp(c − ‖wᵢ‖²/2)   ≤ e^c for every input
    Queries: exp(wᵢᵀx + ‖wᵢ‖²/2 − c − r_x), r_x = max_i(wᵢᵀx + ‖wᵢ‖²/2 − c)  ≤ 1
    The per-feature factors exp(±(‖wᵢ‖²/2 − c)) cancel in the product; exp(−‖q‖²/2 − r_q) is one
    factor per query row and cancels in the row's ratio. No future or padded key can move the
    scale of another key, so causal and padded outputs are exact (no leak through a global max).
    c = min(d/4, 40) keeps typical products far from fp32 underflow for d up to ~256.
    x (B, H, N, d), w (m, d) -> (B, H, N, m).
    """
    c = min(w.shape[1] / 4.0, _MAX_KEY_LOG_SCALE)
    w_half_sq = w.square().sum(-1) / 2.0  # (m,)
    logits = x @ w.T  # (B, H, N, m)
    if is_query:
        logits = logits + (w_half_sq - c)
        return torch.exp(logits - logits.amax(-1, keepdim=True).detach())
    x_half_sq = x.square().sum(-1, keepdim=True) / 2.0  # (B, H, N, 1)
    return torch.exp(logits - x_half_sq - (w_half_sq - c))


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
