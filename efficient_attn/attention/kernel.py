"""Linear (kernelized) attention machinery shared by ``favor`` and ``linear``.

out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)   (sums over visible keys j)

The normalizer rides along as an extra column of ones appended to v, so numerator and
denominator come out of the same matrix products.

Key features may come with a per-key log-scale g_j (true features φ̃(k_j)·e^{g_j}; FAVOR+ keys
span hundreds of nats at large norms, far outside float32). They are set against the largest
scale a row may see, which cancels in its ratio: non-causal, G = max over the unpadded keys of
each (batch, head), every one visible to every query; causal, the running maximum G_i over keys
0..i (``causal_linear``), as online softmax does. Both depend only on keys the row sees, so padded
and future keys cannot move an output, and every factor e^{g_j − G} is ≤ 1.

Training memory: with ``recompute`` (the default) the features are made again in backward from q and k
instead of being kept, so a layer keeps for backward q, k, v, the output and the normalizer (B, H, L, 1), what
softmax's fused kernel keeps (q, k, v, output, log-sum-exp; the ones column of [v, 1] is made again in backward),
(B, H, L, D)-sized tensors, not the (B, H, L, M) features (M ≫ D for FAVOR+, Hedgehog, Taylor) nor the map's own
intermediates. The products are not redone: backward runs the chunked (causal) or closed-form (non-causal)
gradient on re-made features (values only, no graph; the keys' gradient written over their features), drops
them, and then differentiates each map alone, made again with its graph: backward's working set is the features
and their gradients or one map's graph, never both. The cost is two more passes of the feature map.
The output is laid out as (B, L, H, Dv) in memory, so the heads' merge before the output projection
is a view and the tensor that projection keeps is this one, not a copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.causal_linear import causal_linear_attention, causal_linear_backward
from ..ops.differentiable import double_backward_by_recompute, recompute_active
from ..ops.numerics import PADDED_LOG_SCALE, normalize, scale_values, upcast, upcast_with_ones, with_ones
from .base import Attention, check_inputs, check_step, unsupported_use


class KernelAttention(Attention):
    """Base for attentions of the form φ(q)ᵀφ(k)-weighted averages; subclasses define ``feature_map``.

    Features and products are computed in float32 (float64 if the inputs are float64), also under
    bf16/fp16 autocast; the output comes back in v's dtype. Padded keys get a zero row in the
    value-and-normalizer matrix, so their features never reach any output.
    ``recompute`` (default True): in training, keep q, k instead of their features and make the features
    again in backward (same values, gradients equal up to rounding; see the module docstring). Needs a
    deterministic ``feature_map`` (a pure function of its input and the module's parameters and buffers);
    key log-scales are treated as constants, as the causal form always does.
    """

    def __init__(self, head_dim: int, num_heads: int, *, chunk_size: int = 64, recompute: bool = True) -> None:
        super().__init__(head_dim, num_heads)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
        self.chunk_size, self.recompute = chunk_size, bool(recompute)

    def feature_map(
        self, x: Tensor, is_query: bool, *, fresh_grad: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(B, H, N, D) -> features (B, H, N, M), non-negative (signed for trig features), and a
        per-row log-scale (B, H, N) or None: the true features are ``features · exp(log_scale)``.
        A query's log-scale is ignored (it cancels in its row's ratio).

        ``fresh_grad=True`` promises that the gradient reaching the features in backward is a
        buffer no one else holds, so a map may overwrite it (``attend`` guarantees this).
        """
        raise NotImplementedError

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = upcast(q, k, v)
            params = [p for p in self.parameters() if p.requires_grad]
            if self.remakes_features() and (q.requires_grad or k.requires_grad or params):
                out = _Recomputed.apply(self, key_padding_mask, causal, q, k, v, *params)  # (B, H, L, Dv)
            else:
                v1 = with_ones(v, key_padding_mask)  # (B, H, S, Dv+1), padded keys' rows zero
                out = normalize(self._contract(q, k, v1, key_padding_mask, causal))  # (B, H, L, Dv)
        return out.to(out_dtype)

    def remakes_features(self) -> bool:
        """Whether this forward keeps q, k for backward and makes the features again there: ``recompute``, in
        training, and not under ``torch.compile`` (its backward's ``autograd.grad`` would break the graph; the
        compiler plans the memory of a compiled step itself)."""
        return recompute_active(self.recompute)

    def _features(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """φ(q) (B, H, L, M), φ(k) (B, H, S, M) and the keys' log-scales (B, H, S) (padded keys lowest) or None."""
        phi_q, _ = self.feature_map(q, is_query=True, fresh_grad=True)  # (B, H, L, M)
        phi_k, log_scale = self.feature_map(k, is_query=False, fresh_grad=True)  # (B, H, S, M)
        return phi_q, phi_k, _mask_log_scale(log_scale, key_padding_mask)

    def _contract(self, q: Tensor, k: Tensor, v1: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
        """Unnormalised (numerators, normalizer) (B, H, L, Dv+1) from upcast q, k and v1, differentiable."""
        phi_q, phi_k, log_scale = self._features(q, k, key_padding_mask)
        return _products(phi_q, phi_k, v1, log_scale, causal, self.chunk_size)

    def decode_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One causal step in O(M·Dv), whatever t: the state is Σ_{j≤t} φ(k_j)[v_j, 1]ᵀ (B, H, M, Dv+1),
        held relative to the running maximum key log-scale G_t (state ``log_scale`` (B, H, 1, 1)) and
        rescaled when it grows, as the causal forward does. Features are never redrawn here, so a
        whole decode uses one projection. The given state is read, never written."""
        check_step(q, k, v)
        check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v1 = upcast_with_ones(q, k, v)  # v1 (B, H, 1, Dv+1)
            phi_q, phi_k, log_scale = self.step_features(q, k)  # (B, H, 1, M) twice, (B, H, 1) or None
            phi_k = phi_k.transpose(-1, -2)  # (B, H, M, 1)
            carried = None if state is None else state["kv"]  # (B, H, M, Dv+1)
            fresh = False  # whether ``carried`` is a copy this step made (then updated in place)
            new_state = {}
            if log_scale is not None:
                g = log_scale[..., None]  # (B, H, 1, 1)
                if carried is None:
                    run_max = g  # G_0 = g_0: the factor e^{g − G} is 1
                else:
                    before = state["log_scale"]  # G_{t−1} (B, H, 1, 1)
                    run_max = torch.maximum(before, g)  # G_t
                    # on CPU, where the test is cheap, a maximum that did not grow skips the factor e^0 = 1
                    if run_max.device.type != "cpu" or not torch.equal(run_max, before):
                        carried, fresh = carried * (before - run_max).exp(), True  # a copy: the state is not written
                    v1 = v1 * (g - run_max).exp()  # (B, H, 1, Dv+1), factor ≤ 1
                new_state["log_scale"] = run_max
            if carried is None:
                kv = phi_k * v1  # (B, H, M, Dv+1): the outer product φ(k_t)[v_t, 1]ᵀ
            elif fresh:
                kv = carried.addcmul_(phi_k, v1)
            else:
                kv = torch.addcmul(carried, phi_k, v1)  # (B, H, M, Dv+1)
            new_state["kv"] = kv
            out1 = phi_q @ kv  # (B, H, 1, Dv+1)
        return normalize(out1).to(out_dtype), new_state

    def step_features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """One decoding step's φ(q) (B, H, 1, M), φ(k) (B, H, 1, M) and the key's log-scale (B, H, 1) or None,
        from upcast q, k (B, H, 1, D): ``feature_map`` twice (variants may make both in one pass)."""
        phi_q, _ = self.feature_map(q, is_query=True)  # (B, H, 1, M)
        phi_k, log_scale = self.feature_map(k, is_query=False)  # (B, H, 1, M), (B, H, 1) or None
        return phi_q, phi_k, log_scale

    def prefill(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """The decoding state after keys 0..t−1 in one pass: ``kv`` = Σ_j φ(k_j)[v_j, 1]ᵀ relative to
        G = the largest key log-scale (``log_scale`` (B, H, 1, 1), the running maximum at t − 1)."""
        check_inputs(k, k, v, None, True, self.num_heads, self.head_dim)
        with torch.autocast(k.device.type, enabled=False):
            _, k, v1 = upcast_with_ones(k, k, v)  # v1 (B, H, t, Dv+1)
            phi_k, log_scale = self.prefix_features(k)  # (B, H, t, M), (B, H, t) or None
            state = {"kv": phi_k.transpose(-1, -2) @ scale_values(v1, log_scale)}  # (B, H, M, Dv+1)
            if log_scale is not None:
                state["log_scale"] = log_scale.amax(-1)[..., None, None]  # (B, H, 1, 1)
        return state

    def prefix_features(self, k: Tensor) -> tuple[Tensor, Tensor | None]:
        """Key features of positions 0..t−1 (variants whose features depend on position override)."""
        return self.feature_map(k, is_query=False)

    def cache_memory(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> dict[str, Tensor | None]:
        """Σ_j φ(k_j)[v_j, 1]ᵀ over the (unpadded) memory: (B, H, M, Dv+1), computed once."""
        problem = unsupported_use(type(self), causal=False, cross=True)
        if problem:
            raise ValueError(problem)
        check_inputs(k, k, v, key_padding_mask, False, self.num_heads, self.head_dim)
        with torch.autocast(k.device.type, enabled=False):
            _, k, v1 = upcast_with_ones(k, k, v)  # v1 (B, H, S, Dv+1)
            if key_padding_mask is not None:
                pad = key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
                k, v1 = k.masked_fill(pad, 0.0), v1.masked_fill(pad, 0.0)
            phi_k, log_scale = self.feature_map(k, is_query=False)  # (B, H, S, M), (B, H, S) or None
            v1 = scale_values(v1, _mask_log_scale(log_scale, key_padding_mask))
            kv = phi_k.transpose(-1, -2) @ v1  # (B, H, M, Dv+1)
        return {"kv": kv}

    def attend_memory(self, q: Tensor, memory: dict[str, Tensor | None]) -> Tensor:
        out_dtype = q.dtype
        with torch.autocast(q.device.type, enabled=False):
            kv = memory["kv"]  # (B, H, M, Dv+1)
            out1 = self.feature_map(q.to(kv.dtype), is_query=True)[0] @ kv  # (B, H, L, Dv+1)
        return normalize(out1).to(out_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"


def _mask_log_scale(log_scale: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
    """(B, H, S) key log-scales with padded keys set below every real one (they never set a max)."""
    if log_scale is None or key_padding_mask is None:
        return log_scale
    return log_scale.masked_fill(key_padding_mask[:, None, :], PADDED_LOG_SCALE)


class _Recomputed(torch.autograd.Function):
    """``KernelAttention._contract`` that keeps q, k, v for backward and makes the features again there.

    Inputs: the module, key padding mask, causal flag, q, k, v (B, H, S, Dv) and the module's trainable parameters
    (passed so that their gradients, from the re-made features' graph, reach them). Backward: the
    features again (values only), the products' gradient on them (``causal_linear_backward``, or the
    non-causal closed form); then, the features dropped, each feature map (queries', then keys') made again
    with autograd on and differentiated alone, so backward never holds both maps' graphs (for Hedgehog a
    second copy of the features, its softmax outputs) next to the features and their gradients. [v, 1] is made in
forward and again in backward, so the ones column is never kept (v's gradient is [v, 1]'s without it, zero on
padded keys, as autograd through ``with_ones`` gives). Second derivatives
    (``create_graph=True``) differentiate a plain re-computation (``double_backward_by_recompute``).
    """

    @staticmethod
    def forward(ctx, module, pad, causal, q, k, v, *params):
        v1 = with_ones(v, pad)  # (B, H, S, Dv+1)
        phi_q, phi_k, log_scale = module._features(q, k, pad)  # grad mode is off inside forward
        out1 = _products(phi_q, phi_k, v1, log_scale, causal, module.chunk_size)  # (B, H, L, Dv+1)
        b, h, length, e = out1.shape
        num, den = out1[..., :-1], out1[..., -1:]  # (B, H, L, Dv), (B, H, L, 1)
        den = torch.where(den == 0, 1.0, den)  # as ``normalize``: a row that sees no key gets 0
        out = out1.new_empty(b, length, h, e - 1).transpose(1, 2)  # (B, H, L, Dv) in (B, L, H, Dv) memory
        torch.div(num, den, out=out)
        ctx.module, ctx.pad, ctx.causal, ctx.num_params = module, pad, causal, len(params)
        ctx.save_for_backward(q, k, v, out, den)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, den = ctx.saved_tensors
        module, pad, causal = ctx.module, ctx.pad, ctx.causal
        params = [p for p in module.parameters() if p.requires_grad]
        if len(params) != ctx.num_params:
            raise RuntimeError("kernel attention: trainable parameters changed between forward and backward")
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            grads = double_backward_by_recompute(
                lambda a, b, c, *_: normalize(module._contract(a, b, with_ones(c, pad), pad, causal)),
                (q, k, v, *params), (grad_out,),
            )
            return (None, None, None, *grads)
        dot = (grad_out * out).sum(-1, keepdim=True).neg_()  # (B, H, L, 1): −Σ_e grad_e out_e
        grad_out1 = torch.cat([grad_out, dot], dim=-1).div_(den)  # (B, H, L, Dv+1): numerators, normalizer
        v1 = with_ones(v, pad)  # (B, H, S, Dv+1), as in forward
        phi_q, phi_k, log_scale = module._features(q, k, pad)  # grad mode is off here: values only, no graph
        owned = phi_k.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in (q, k, v, v1)}
        grad_phi_q, grad_phi_k, grad_v1 = _feature_grads(  # dφ(k) written into φ(k) when no input shares it,
            phi_q, phi_k, v1, log_scale, causal, module.chunk_size, grad_out1, overwrite_k=owned, overwrite_v=True
        )  # d[v, 1] into [v, 1] (made here)
        del phi_q, phi_k, grad_out1, v1  # before the maps' graphs: the features are not held twice
        grad_v = grad_v1[..., :-1]  # (B, H, S, Dv): the ones column is a constant
        if pad is not None:
            grad_v = grad_v.masked_fill(pad[:, None, :, None], 0.0)
        grad_q, *params_q = _map_grads(module, q, True, grad_phi_q, params)
        del grad_phi_q
        grad_k, *params_k = _map_grads(module, k, False, grad_phi_k, params)
        grad_params = [a if b is None else b if a is None else a + b for a, b in zip(params_q, params_k)]
        return (None, None, None, grad_q, grad_k, grad_v, *grad_params)


def _map_grads(
    module: KernelAttention, x: Tensor, is_query: bool, grad_phi: Tensor, params: list[Tensor]
) -> tuple[Tensor | None, ...]:
    """Gradients for x and ``params`` of ``feature_map(x)`` against ``grad_phi`` (a buffer the map may overwrite),
    through the map's graph made again here and dropped on return (the log-scale is a constant)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        phi, _ = module.feature_map(leaf, is_query=is_query, fresh_grad=True)  # (B, H, N, M)
    return torch.autograd.grad(phi, (leaf, *params), grad_phi, allow_unused=True)


def _products(
    phi_q: Tensor, phi_k: Tensor, v1: Tensor, log_scale: Tensor | None, causal: bool, chunk: int
) -> Tensor:
    """(B, H, L, M), (B, H, S, M), (B, H, S, E), log-scales (B, H, S) or None -> (B, H, L, E) unnormalised."""
    if causal:
        return causal_linear_attention(phi_q, phi_k, v1, chunk, log_scale)
    v1 = scale_values(v1, log_scale)  # (B, H, S, Dv+1): · e^{g_j − max g}
    kv_t = v1.transpose(-1, -2) @ phi_k  # (B, H, Dv+1, M); this order keeps dφ(k) contiguous
    return phi_q @ kv_t.transpose(-1, -2)  # (B, H, L, M) @ (B, H, M, Dv+1)


def _feature_grads(
    phi_q: Tensor, phi_k: Tensor, v1: Tensor, log_scale: Tensor | None, causal: bool, chunk: int, grad: Tensor,
    overwrite_k: bool = False, overwrite_v: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the unnormalised output (B, H, L, E) for φ(q), φ(k) and v1, from the output's ``grad``;
    ``overwrite_k`` (causal): φ(k) is the caller's own buffer, and its gradient is written into it; ``overwrite_v``
    (causal) likewise for v1."""
    b, h, length, m = phi_q.shape
    if causal:
        flat = [t.reshape(b * h, length, -1) for t in (phi_q, phi_k, v1, grad)]  # (BH, L, ·)
        g = None if log_scale is None else log_scale.reshape(b * h, length)  # (BH, L)
        run_max = None if g is None else g.cummax(-1).values  # (BH, L)
        grads = causal_linear_backward(*flat[:3], g, run_max, max(1, min(chunk, length)), flat[3].contiguous(),
                                       overwrite_k=overwrite_k, overwrite_v=overwrite_v)
        return tuple(t.reshape(b, h, length, -1) for t in grads)
    weights = None
    if log_scale is not None:
        weights = (log_scale - log_scale.amax(-1, keepdim=True)).exp()[..., None]  # (B, H, S, 1), ≤ 1
    v_in = v1 if weights is None else v1 * weights  # (B, H, S, E)
    kv = phi_k.transpose(-1, -2) @ v_in  # (B, H, M, E)
    grad_kv = phi_q.transpose(-1, -2) @ grad  # (B, H, M, E)
    grad_v1 = phi_k @ grad_kv  # (B, H, S, E)
    return grad @ kv.transpose(-1, -2), v_in @ grad_kv.transpose(-1, -2), (
        grad_v1 if weights is None else grad_v1.mul_(weights))
