"""FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers")."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.favor_fused import favor_positive_attention
from ..ops.features import (
    KERNELS,
    PROJECTIONS,
    hyperbolic_features,
    positive_features,
    random_projection,
    relu_features,
    trig_features,
)
from ..ops.numerics import normalize, upcast, upcast_with_ones
from ..registry import register_attention
from .base import check_inputs, check_step
from .kernel import KernelAttention


@register_attention("favor")
class FavorAttention(KernelAttention):
    """FAVOR+: softmax (or ReLU) kernel attention via random features.

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j),  φ(q)·φ(k) ≈ exp(qᵀk/√d);
    kernel="softmax": positive features exp(wᵀx − ‖x‖²/2)/√m (FAVOR+),
    kernel="softmax_hyp": hyperbolic positive features exp(−‖x‖²/2)[exp(wᵀx), exp(−wᵀx)]/√(2m)
    (2m features from m projections; unbiased, lower variance than "softmax": Performer Lemma 1),
    kernel="softmax_trig": exp(‖x‖²/2)[sin wᵀx, cos wᵀx] (2m features), kernel="relu": relu(wᵀx) + eps.
    Projection rows w (each marginally N(0, I)): ``projection`` "iid", "orthogonal" (blocks of d
    orthogonal directions, ORFs) or "simplex" (blocks of d directions on a regular simplex, pairwise
    cosine −1/(d−1): SimRFs, Reid et al. 2023, lower kernel-estimate MSE than orthogonal); both block
    kinds carry chi_d row norms (see ``features.random_projection``). ``projection=None`` takes it
    from the boolean flag ``orthogonal`` (False: "iid", else "orthogonal", the default); giving both
    and contradicting (``orthogonal=True`` with "iid", ``False`` with a block kind) raises ValueError.
    O(L·m·d) time, O(L·(m+d)) memory; causal by chunked prefix sums, O(L·(m+d) + L·chunk + (L/chunk)·m·d)
    memory (positive kernels fused into the products: ``favor_fused``). Kept for backward: with ``recompute``
    (default) only q, k, v, the output and the normalizer, O(L·d), the rest made again in backward; without it also the
    features and, causal, the score blocks and chunk states.
    Stabilized per key (a log-scale against the largest visible key: see ``kernel`` and ``features``).
    Decoding (``decode_step``): positive kernels make a step's features from a cached, scaled copy of the
    projection and rescale the state only when the running maximum key log-scale grows.
    Masks: key padding yes; causal yes. The m×d projection (rows w, shared by all heads) is a
    float32 buffer (float64 under ``.double()``; it stays float32 when the module is cast to
    bf16/fp16), saved in checkpoints. It is redrawn every ``redraw_interval`` optimizer steps
    (0 = never), counted by :meth:`optimizer_step`, which the training loop calls once per step
    (``efficient_attn.attention_optimizer_step``), except after the run's last step, which
    :meth:`final_optimizer_step` counts without a redraw; forward and decoding never redraw. Draw n uses a
    generator seeded by (``draw_seed``, n). Standalone, ``draw_seed`` is ``seed``, or with
    ``seed=None`` one draw from torch's RNG; inside a model, ``efficient_attn.seed_attentions``
    sets it per module from (``seed`` or the run's seed, the module's name), so every FAVOR+ module
    has its own features. Redraws never touch torch's global RNG, and ``draw_seed``, the draw count
    and the steps since the last draw are buffers: every process of a DDP run draws the same
    features at the same step, and a resumed run the same as an uninterrupted one.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        num_features: int = 256,
        kernel: str = "softmax",
        orthogonal: bool | None = None,
        projection: str | None = None,
        redraw_interval: int = 0,
        kernel_eps: float = 1e-3,
        seed: int | None = None,
        chunk_size: int = 64,
        recompute: bool = True,
    ) -> None:
        super().__init__(head_dim, num_heads, chunk_size=chunk_size, recompute=recompute)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if num_features < 1 or redraw_interval < 0 or kernel_eps < 0:
            raise ValueError(
                "need num_features >= 1, redraw_interval >= 0, kernel_eps >= 0; got "
                f"{num_features}, {redraw_interval}, {kernel_eps}"
            )
        projection = _resolve_projection(projection, orthogonal)
        self.num_features, self.kernel, self.projection_kind = num_features, kernel, projection
        self.orthogonal = projection != "iid"
        self.redraw_interval, self.kernel_eps, self.seed = redraw_interval, kernel_eps, seed
        self.register_buffer("projection", torch.empty(num_features, head_dim))  # (m, d)
        self.register_buffer("num_draws", torch.zeros((), dtype=torch.long))
        base = seed if seed is not None else int(torch.randint(2**31 - 1, ()))  # one draw from the global RNG
        self.register_buffer("draw_seed", torch.tensor(base, dtype=torch.long))
        self.register_buffer("steps_since_draw", torch.zeros((), dtype=torch.long))  # saved for resume
        self._steps_since_draw = 0  # host copy of the buffer: counting steps never syncs a GPU
        self._step_cache: tuple | None = None  # see ``_step_projection``
        self.redraw_features()

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a fresh projection from a generator seeded by (``draw_seed``, draw count)."""
        generator = torch.Generator().manual_seed(int(self.draw_seed) * 1_000_003 + int(self.num_draws))
        w = random_projection(self.num_features, self.head_dim, self.projection_kind, generator)
        self.projection.copy_(w)
        self.num_draws += 1
        self.steps_since_draw.zero_()
        self._steps_since_draw = 0

    @torch.no_grad()
    def reset_random(self, seed: int) -> None:
        """Restart the features from ``seed``: draw 0 of a new stream, redraw schedule from zero."""
        self.draw_seed.fill_(seed)
        self.num_draws.zero_()
        self.redraw_features()

    @torch.no_grad()
    def optimizer_step(self) -> None:
        """Count one optimizer step; redraw once ``redraw_interval`` of them have passed since the last draw."""
        if self.redraw_interval == 0:
            return
        self._steps_since_draw += 1
        if self._steps_since_draw >= self.redraw_interval:
            self.redraw_features()
        else:
            self.steps_since_draw.fill_(self._steps_since_draw)

    @torch.no_grad()
    def final_optimizer_step(self) -> None:
        """Count the run's last optimizer step without redrawing: features drawn there would be used by the
        last validation and the test but never trained with. A run resumed with a larger cap redraws at its
        next step (the count is then past ``redraw_interval``)."""
        if self.redraw_interval == 0:
            return
        self._steps_since_draw += 1
        self.steps_since_draw.fill_(self._steps_since_draw)

    @property
    def feature_redraws(self) -> int:
        """Redraws since the features were seeded (``reset_random``) or built: draws after the first."""
        return int(self.num_draws) - 1

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # a checkpoint without ``draw_seed``: keep this module's (its features are loaded as saved)
        state_dict.setdefault(prefix + "draw_seed", self.draw_seed.clone())
        # a checkpoint with ``calls_since_draw`` counts training forward calls: one call per step without accumulation
        calls = state_dict.pop(prefix + "calls_since_draw", None)
        if calls is not None:
            state_dict.setdefault(prefix + "steps_since_draw", calls)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps_since_draw = int(self.steps_since_draw)

    def _apply(self, fn, recurse: bool = True):
        # a bf16/fp16 cast of the module keeps the projection float32, with its values unrounded
        before = self.projection
        super()._apply(fn, recurse)
        if self.projection.dtype in (torch.float16, torch.bfloat16):
            self.projection = before.to(device=self.projection.device, dtype=torch.float32)
        return self

    def feature_map(
        self, x: Tensor, is_query: bool, *, fresh_grad: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        x = x * self.head_dim**-0.25  # (B, H, N, d): φ(q)·φ(k) ≈ exp(qᵀk/√d)
        w = self.projection.to(x.dtype)  # (m, d)
        if self.kernel == "softmax":
            return positive_features(x, w, is_query, fresh_grad=fresh_grad)
        if self.kernel == "softmax_hyp":
            return hyperbolic_features(x, w, is_query, fresh_grad=fresh_grad)
        if self.kernel == "softmax_trig":
            return trig_features(x, w, is_query)
        return relu_features(x, w, self.kernel_eps)

    def decode_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Positive kernels without autograd: ``KernelAttention.decode_step`` in fewer operations, same state
        and values up to rounding. With the step projection W (``_step_projection``), a = W k − ‖k‖²/(2√d)
        is log φ(k) up to a constant, so φ(k) e^{−G} = e^{a − G} directly; G (state ``log_scale``) grows to
        max(a) only when a key exceeds it (then the state is rescaled, as the generic step does each time).
        φ(q) = e^{W q − max(W q)}: its scale cancels in the normalisation. Otherwise the generic step."""
        if self.kernel not in ("softmax", "softmax_hyp") or (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        ):
            return super().decode_step(q, k, v, state)
        check_step(q, k, v)
        check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v1 = upcast_with_ones(q, k, v)  # v1 (B, H, 1, Dv+1)
            w = self._step_projection(q.dtype)  # (d, M)
            phi_q = q @ w  # (B, H, 1, M): logits of the query
            phi_q = phi_q.sub_(phi_q.amax(-1, keepdim=True)).exp_()  # in (0, 1]
            a = torch.linalg.vecdot(k, k)[..., None]  # (B, H, 1, 1): ‖k‖²
            a = torch.sub(k @ w, a, alpha=0.5 * self.head_dim**-0.5)  # (B, H, 1, M): log φ(k) + const
            g = a.amax(-1, keepdim=True)  # (B, H, 1, 1): the key's log-scale
            if state is None:
                carried, run_max = None, g
            else:
                carried, run_max = state["kv"], state["log_scale"]  # (B, H, M, Dv+1), (B, H, 1, 1)
                # the running maximum grows: rescale the state (a copy); tested on CPU only, where it is cheap
                if run_max.device.type != "cpu" or bool((g > run_max).any()):
                    grown = torch.maximum(run_max, g)
                    carried, run_max = carried * (run_max - grown).exp(), grown
            phi_k = a.sub_(run_max).exp_().transpose(-1, -2)  # (B, H, M, 1): φ(k) e^{−G}, ≤ 1
            if carried is None:
                kv = phi_k * v1  # (B, H, M, Dv+1)
            else:
                kv = torch.addcmul(carried, phi_k, v1)  # (B, H, M, Dv+1), a new tensor
            out1 = phi_q @ kv  # (B, H, 1, Dv+1)
        return normalize(out1).to(out_dtype), {"kv": kv, "log_scale": run_max}

    def _step_projection(self, dtype: torch.dtype) -> Tensor:
        """(d, M) for ``decode_step``: the rows w (and −w for "softmax_hyp") times d^(−1/4), transposed, in
        ``dtype``. Cached, and made again whenever the ``projection`` buffer is another tensor (a device or
        dtype move, ``load_state_dict`` with ``assign``) or was written in place (a redraw, a load)."""
        w = self.projection
        cached = self._step_cache
        if cached is not None and cached[0] is w and cached[1] == (w._version, w.data_ptr(), dtype, self.kernel):
            return cached[2]
        w_step = w.to(dtype) * self.head_dim**-0.25  # (m, d)
        if self.kernel == "softmax_hyp":
            w_step = torch.cat([w_step, -w_step])  # (2m, d)
        w_step = w_step.T.contiguous()  # (d, M)
        if not w.is_inference():  # inference tensors keep no version counter
            self._step_cache = (w, (w._version, w.data_ptr(), dtype, self.kernel), w_step)
        return w_step

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        """Positive kernels ("softmax", "softmax_hyp") run fused (``favor_fused``: features made block by
        block inside the products, no (L, m) gradient of them); "softmax_trig" and "relu" take the
        generic ``KernelAttention.attend``. Same estimator and stabilisation either way."""
        if self.kernel not in ("softmax", "softmax_hyp"):
            return super().attend(q, k, v, key_padding_mask, causal)
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = upcast(q, k, v)  # k, v are zero on padded keys already; their normalizer is dropped inside
            w = self.projection.to(q.dtype)  # (m, d)
            if self.kernel == "softmax_hyp":
                w = torch.cat([w, -w])  # (2m, d): hyperbolic features are the positive features of ±w
            out = favor_positive_attention(
                q, k, v, w, self.head_dim**-0.25, key_padding_mask, causal, self.chunk_size,
                recompute=self.remakes_features(),
            )  # (B, H, L, Dv)
        return out.to(out_dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_features={self.num_features}, kernel={self.kernel!r}, "
            f"projection={self.projection_kind!r}, redraw_interval={self.redraw_interval}"
        )


def _resolve_projection(projection: str | None, orthogonal: bool | None) -> str:
    """The projection kind from ``projection`` and the boolean ``orthogonal`` flag (None = unset)."""
    if projection is None:
        return "iid" if orthogonal is False else "orthogonal"
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if orthogonal is not None and bool(orthogonal) != (projection != "iid"):
        raise ValueError(
            f"orthogonal={orthogonal} contradicts projection={projection!r}: orthogonal is True for the "
            "block kinds ('orthogonal', 'simplex') and False for 'iid'; give only projection"
        )
    return projection
