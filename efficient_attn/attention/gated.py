"""Shared machinery of the causal linear attentions whose state the tokens gate (GLA, Mamba-2's decay) or
rewrite (DeltaNet, Gated DeltaNet): gates from the token, padding, precision, decoding.

A subclass says how its gates come from the token (:meth:`GatedRecurrentAttention.gates`) and which
recurrence it runs (``delta_rule``); everything else is here. Padded positions leave the state as it
was (gate 1, β = 0, zero key and value), so a left-padded sequence gives the outputs of the unpadded one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.delta import chunked_delta_with_state, delta_recurrence_with_state
from ..ops.gated import chunked_gated_with_state, gated_recurrence_with_state
from ..ops.numerics import upcast
from .base import Attention, check_inputs, check_step, check_token_input, tokens_or_keys


class GatedRecurrentAttention(Attention):
    """Base: causal self-attention through a gated recurrence S_t (B, H, D, Dv) computed in chunks.

    A subclass sets ``delta_rule`` (β_t = σ(x_t w_h) per head, parameter ``beta_proj``; q and k L2-normalised:
    the rule needs ‖k‖ = 1) and ``mamba2_gate`` (Mamba-2's decay per head: ``dt_proj``, ``dt_bias``,
    ``a_log``), or overrides :meth:`gates` with its own parameters (GLA). Computed in float32 (float64 stays
    float64), also under autocast; the output comes in v's dtype.
    """

    supports_noncausal = False
    supports_cross_attention = False
    token_input = True
    delta_rule: bool = False
    mamba2_gate: bool = False

    def __init__(
        self, head_dim: int, num_heads: int, *, model_dim: int | None = None, chunk_size: int = 64,
        scale: float | None = None,
    ) -> None:
        super().__init__(head_dim, num_heads)
        model_dim = num_heads * head_dim if model_dim is None else model_dim
        for name, value in (("model_dim", model_dim), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.model_dim, self.chunk_size = model_dim, chunk_size
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        if self.delta_rule:
            self.beta_proj = nn.Parameter(torch.empty(num_heads, model_dim))  # w (H, model_dim)
        if self.mamba2_gate:
            self.dt_proj = nn.Parameter(torch.empty(num_heads, model_dim))  # u (H, model_dim)
            self.dt_bias = nn.Parameter(torch.empty(num_heads))  # (H,)
            self.a_log = nn.Parameter(torch.empty(num_heads))  # log A (H,)
        self._reset_gates()

    def reset_parameters(self) -> None:
        self._reset_gates()

    def _reset_gates(self) -> None:
        """β and decay projections as nn.Linear's default; Mamba-2's decay as :func:`init_mamba2_decay`."""
        if self.delta_rule:
            nn.init.kaiming_uniform_(self.beta_proj, a=math.sqrt(5))
        if self.mamba2_gate:
            nn.init.kaiming_uniform_(self.dt_proj, a=math.sqrt(5))
            init_mamba2_decay(self.dt_bias, self.a_log)

    def gates(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """x (B, L, model_dim) -> (log gate (B, H, L, D) or (B, H, L, 1) or None, β (B, H, L) or None)."""
        beta = linear(x, self.beta_proj).sigmoid().transpose(1, 2) if self.delta_rule else None  # (B, H, L)
        decay = mamba2_decay(x, self.dt_proj, self.dt_bias, self.a_log) if self.mamba2_gate else None
        return decay, beta  # (B, H, L, 1) or None, (B, H, L) or None

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, *, x: Tensor
    ) -> Tensor:
        # causal=False and S ≠ L were refused by the base class; padded k, v and x are zero already
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v, log_gate, beta = self._inputs(q, k, v, x, key_padding_mask)
            out, _ = self._chunked(q, k, v, log_gate, beta)
        return out.to(out_dtype)

    def decode_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor] | None = None, *, x: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One step of the recurrence, O(D·Dv) whatever t: state ``S`` (B, H, D, Dv); x (B, 1, model_dim) or
        None (the keys, as in ``forward``)."""
        check_step(q, k, v)
        check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)
        check_token_input(self, x, q)
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v, log_gate, beta = self._inputs(q, k, v, tokens_or_keys(x, k), None)
            s = None if state is None else state["S"]
            if self.delta_rule:
                out, s = delta_recurrence_with_state(q, k, v, beta, _squeeze(log_gate), s)
            else:
                out, s = gated_recurrence_with_state(q, k, v, log_gate, s)
        return out.to(out_dtype), {"S": s}

    def prefill(self, k: Tensor, v: Tensor, *, x: Tensor | None = None) -> dict[str, Tensor]:
        """The :meth:`decode_step` state after positions 0..t−1, by the chunked form: x (B, t, model_dim)."""
        check_inputs(k, k, v, None, True, self.num_heads, self.head_dim)
        check_token_input(self, x, k)
        with torch.autocast(k.device.type, enabled=False):
            _, k, v, log_gate, beta = self._inputs(k, k, v, tokens_or_keys(x, k), None)
            _, s = self._chunked(k, k, v, log_gate, beta)
        return {"S": s}

    def _inputs(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Upcast q, k, v; scale (and normalise) q, k; gates from x, set to "no change" at padded positions."""
        q, k, v = upcast(q, k, v)
        if self.delta_rule:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        log_gate, beta = self.gates(x.to(q.dtype))
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, :]  # (B, 1, L)
            log_gate = None if log_gate is None else log_gate.masked_fill(pad[..., None], 0.0)
            beta = None if beta is None else beta.masked_fill(pad, 0.0)
        return q * self.scale, k, v, log_gate, beta

    def _chunked(
        self, q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None, beta: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if self.delta_rule:
            return chunked_delta_with_state(q, k, v, beta, _squeeze(log_gate), self.chunk_size)
        return chunked_gated_with_state(q, k, v, log_gate, self.chunk_size)

    def extra_repr(self) -> str:
        options = f"model_dim={self.model_dim}, chunk_size={self.chunk_size}, scale={self.scale:.4g}"
        return f"{super().extra_repr()}, {options}"


def _squeeze(log_gate: Tensor | None) -> Tensor | None:
    """A scalar gate (B, H, L, 1) as the delta rule takes it, (B, H, L)."""
    return None if log_gate is None else log_gate[..., 0]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with the parameters cast to x's dtype (gates are computed in the working precision)."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def mamba2_decay(x: Tensor, weight: Tensor, dt_bias: Tensor, a_log: Tensor) -> Tensor:
    """Mamba-2's per-head log decay: −exp(A_log) · softplus(x W + dt_bias), x (B, L, model_dim) -> (B, H, L, 1)."""
    dt = F.softplus(linear(x, weight) + dt_bias.to(x.dtype))  # (B, L, H)
    return (-a_log.to(x.dtype).exp() * dt).transpose(1, 2)[..., None]  # (B, H, L, 1)


def init_mamba2_decay(dt_bias: Tensor, a_log: Tensor, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba-2's initialisation: A ~ U[1, 16] (stored as log A); dt_bias = softplus⁻¹(dt),
    log dt ~ U[log dt_min, log dt_max]."""
    with torch.no_grad():
        a_log.copy_(torch.empty_like(a_log).uniform_(1.0, 16.0).log())
        dt = torch.empty_like(dt_bias).uniform_(math.log(dt_min), math.log(dt_max)).exp()
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
