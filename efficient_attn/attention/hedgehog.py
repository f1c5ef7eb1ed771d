"""Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax
Mimicry", ICLR 2024): linear attention with a learned feature map trained to mimic softmax attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register_attention
from .base import allowed_pairs, masked_softmax
from .kernel import KernelAttention


@register_attention("hedgehog")
class HedgehogAttention(KernelAttention):
    """Hedgehog linear attention: learned per-head affine maps, then a softmax over their outputs.

    x̃ = x W_h + b_h with W_h (D, d') and b_h (d') per head (d' = ``feature_dim``, default D), and
    φ(x) = [softmax(x̃), softmax(−x̃)]  (M = 2d' features, softmax over the feature axis),
    out_i = φ_q(q_i)ᵀ Σ_j φ_k(k_j) v_jᵀ / φ_q(q_i)ᵀ Σ_j φ_k(k_j).
    Queries and keys have maps of their own (φ_q: ``weight``, ``bias``; φ_k: ``k_weight``, ``k_bias``), as
    the paper and its code (``feature_map_q``, ``feature_map_k``) do; ``tied=True`` shares one map
    (``weight``, ``bias``; ``k_weight`` and ``k_bias`` are None), half the parameters.
    Each map is applied to q and k as they come (no D^{-1/4}, as in the paper's code): W_h learns any
    temperature. Every feature is in (0, 1] and each half sums to 1, so nothing overflows and no
    log-scale is needed (softmax is shift-invariant per row), and φ(q)·φ(k) > 0: every row that sees a
    key has a positive normalizer. Each W_h starts as the identity when d' = D (the paper's init, so the
    first features are softmax(±x)), else with N(0, 1/D) entries (the query map's, then the key map's);
    b_h starts at 0 (drawn by ``reset_parameters``, on the module's private stream inside a model).
    O(L·d'·Dv) time, O(L·d') memory; causal by chunked prefix sums (``chunk_size``), decoding with a
    constant (B, H, 2d', Dv+1) state. Masks: key padding yes; causal yes; cross-attention yes.

    Distillation (``distill`` = λ > 0, the paper's attention-weight mimicry): in training mode each
    forward also sets ``aux_loss`` = λ · mean over (batch, head, query rows that see a key) of
    −Σ_j p_ij log p̂_ij, p = masked softmax(q kᵀ/√D) (the teacher: detached, a fixed target),
    p̂_ij = φ_q(q_i)·φ_k(k_j) / Σ_{visible j'} φ_q(q_i)·φ_k(k_j') (the student: its gradient reaches both
    maps' W_h, b_h, q and k), both under the same causal and padding masks. This builds the (B, H, L, S) weights:
    O(L·S·(D + d')) time and O(L·S) memory, at training time only; log p̂ is floored at the dtype's
    smallest normal (a pair whose kernel underflows costs ≤ 87 nats in float32 and passes no
    gradient). Otherwise (eval mode, λ = 0, decoding) ``aux_loss`` is None.
    :func:`~efficient_attn.attention_aux_loss` sums and clears it for the training loss.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        feature_dim: int | None = None,
        distill: float = 0.0,
        tied: bool = False,
        chunk_size: int = 64,
        recompute: bool = True,
    ) -> None:
        super().__init__(head_dim, num_heads, chunk_size=chunk_size, recompute=recompute)
        feature_dim = head_dim if feature_dim is None else feature_dim
        if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int (or None = head_dim), got {feature_dim!r}")
        if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not distill >= 0.0:
            raise ValueError(f"distill must be a float ≥ 0 (the distillation loss weight), got {distill!r}")
        if not isinstance(tied, bool):
            raise ValueError(f"tied must be a bool (one feature map for queries and keys), got {tied!r}")
        self.feature_dim = feature_dim
        self.distill = float(distill)
        self.tied = tied
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))  # (H, D, d'): φ_q (shared if tied)
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim))  # (H, d')
        # φ_k: (H, D, d') and (H, d'), None if tied
        self.k_weight = None if tied else nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.k_bias = None if tied else nn.Parameter(torch.empty(num_heads, feature_dim))
        self.aux_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for weight, bias in self.maps():
                if self.feature_dim == self.head_dim:
                    weight.copy_(torch.eye(self.head_dim).expand_as(weight))  # (H, D, D): identity
                else:
                    weight.normal_(0.0, self.head_dim**-0.5)  # x̃ entries have x's mean square
                bias.zero_()

    def maps(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The (weight, bias) of each feature map: the query map's, then the key map's (one if tied)."""
        return [(self.weight, self.bias)] + ([] if self.tied else [(self.k_weight, self.k_bias)])

    def project(self, x: Tensor, is_query: bool = True) -> Tensor:
        """(B, H, N, D) -> x̃ = x W_h + b_h (B, H, N, d'), with the query map or the key map."""
        weight, bias = self.maps()[0 if is_query or self.tied else 1]
        xp = torch.einsum("bhnd,hde->bhne", x, weight.to(x.dtype))  # (B, H, N, d')
        return xp + bias.to(x.dtype)[:, None, :]  # (B, H, N, d') + (H, 1, d')

    def feature_map(self, x: Tensor, is_query: bool, *, fresh_grad: bool = False) -> tuple[Tensor, None]:
        xp = self.project(x, is_query)  # (B, H, N, d')
        # one softmax over the pair, whose output is the features: the graph keeps them once, not a copy besides
        pair = torch.stack([xp, -xp], dim=-2)  # (B, H, N, 2, d')
        return pair.softmax(-1).flatten(-2), None  # (B, H, N, 2d'): [softmax(x̃), softmax(−x̃)], exact

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        self.aux_loss = None
        if self.training and self.distill > 0:
            self.aux_loss = self.distill * self.distill_loss(q, k, key_padding_mask, causal)
        return super().attend(q, k, v, key_padding_mask, causal)

    def distill_loss(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
        """Unweighted cross-entropy of the Hedgehog weights against the (detached) softmax weights:
        a scalar, the mean over (batch, head, query rows that see a key); 0 if no row sees a key.

        q (B, H, L, D), k (B, H, S, D) with padded keys already zeroed (``forward`` does that)."""
        with torch.autocast(q.device.type, enabled=False):
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            q, k = q.to(dtype), k.to(dtype)
            b, h, length, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            if key_padding_mask is None:
                key_padding_mask = torch.zeros(b, s, dtype=torch.bool, device=q.device)
            allowed, empty = allowed_pairs(key_padding_mask, length, causal)  # (B, 1, L, S), (B, 1, L, 1)
            visible = allowed & ~empty  # (B, 1, L, S): the pairs a row that sees a key attends
            with torch.no_grad():  # the teacher is a target, not trained by this loss
                scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5  # (B, H, L, S)
                teacher = masked_softmax(scores, key_padding_mask, causal)  # (B, H, L, S); empty rows 0
            phi_q, _ = self.feature_map(q, is_query=True)  # (B, H, L, 2d')
            phi_k, _ = self.feature_map(k, is_query=False)  # (B, H, S, 2d')
            kernel = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~visible, 0.0)  # (B, H, L, S)
            tiny = torch.finfo(dtype).tiny
            log_student = kernel.clamp_min(tiny).log() - kernel.sum(-1, keepdim=True).clamp_min(tiny).log()
            cross_entropy = -(teacher * log_student).sum(-1)  # (B, H, L); 0 on empty rows
            rows = (~empty).sum() * h  # query rows (over batch and heads) that see a key
        return cross_entropy.sum() / rows.clamp_min(1)

    def __getstate__(self) -> dict:
        """Copies and pickles leave a pending ``aux_loss`` (a graph, which deepcopy refuses) behind."""
        return super().__getstate__() | {"aux_loss": None}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}, distill={self.distill}, tied={self.tied}"
