"""The core-attention interface every registered variant implements, and the mask helpers they share.

Tensors are heads-first: q (B, H, L, D), k (B, H, S, D), v (B, H, S, Dv) -> (B, H, L, Dv).
``key_padding_mask`` is (B, S) bool with True = padding, as in ``torch.nn.MultiheadAttention``.
A query that sees no key (every key padded, or every key up to it under ``causal``) outputs zeros.
Padded keys and values are zeroed before any variant sees them, so whatever they hold cannot leak.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import chain
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Base class: validates inputs, then calls :meth:`attend`.

    Subclasses implement ``attend(q, k, v, key_padding_mask, causal)`` on validated tensors and set
    ``supports_causal`` / ``supports_key_padding`` / ``supports_noncausal`` /
    ``supports_cross_attention`` to False for uses they cannot honour (those then raise, with the
    message of :func:`unsupported_use`, instead of being ignored).

    **Per-token input.** A variant that computes something from the tokens themselves (GLA's gates,
    the delta rule's β) sets ``token_input = True`` and takes a keyword ``model_dim`` (the width of
    the token vectors; ``MultiHeadAttention`` passes its ``d_model``). Its ``forward``, ``decode_step``
    and ``prefill`` then require ``x`` (B, L, model_dim), the layer's input at the query positions
    (the same sequence as the keys: such variants are self-attention only), and ``attend`` receives
    it as the keyword ``x``, with padded rows zeroed. Used alone (no ``x``, ``model_dim`` = H·D) the
    core reads the keys as its tokens, x = k with the heads merged, so it runs on q, k, v like any
    other variant. Every other variant takes no ``x`` (passing one raises), so their ``attend``
    signature is unchanged.
    """

    supports_causal: bool = True
    supports_key_padding: bool = True
    supports_noncausal: bool = True  # False: causal-only (a recurrence such as retention)
    supports_cross_attention: bool = True  # False: needs S == L, query i and key i the same position
    token_input: bool = False  # True: forward/decode_step/prefill take x (B, L, model_dim), see above
    seed: int | None = None  # an explicit seed option; :func:`~efficient_attn.seed_attentions` derives from it
    # an auxiliary training loss (scalar, weighted) that the last training-mode forward produced, else
    # None (Hedgehog distillation); :func:`~efficient_attn.attention_aux_loss` sums and clears them
    aux_loss: Tensor | None = None

    def __init__(self, head_dim: int, num_heads: int) -> None:
        super().__init__()
        for name, value in (("head_dim", head_dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.head_dim = head_dim
        self.num_heads = num_heads

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        x: Tensor | None = None,
    ) -> Tensor:
        check_inputs(q, k, v, key_padding_mask, causal, self.num_heads, self.head_dim)
        problem = unsupported_use(type(self), causal=causal, cross=q.shape[-2] != k.shape[-2])
        if problem:
            raise ValueError(problem)
        check_token_input(self, x, q)
        if key_padding_mask is not None:
            if not self.supports_key_padding:
                raise ValueError(f"{type(self).__name__} does not support key_padding_mask")
            pad = key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)  # padding (even inf/NaN) cannot leak
            if x is not None:
                x = x.masked_fill(key_padding_mask[:, :, None], 0.0)  # (B, L, model_dim)
        if self.token_input:
            return self.attend(q, k, v, key_padding_mask, causal, x=tokens_or_keys(x, k))
        return self.attend(q, k, v, key_padding_mask, causal)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        raise NotImplementedError

    def decode_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Any] | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """One step of causal self-attention: the newest query against every key so far.

        q, k, v (B, H, 1, D) for position t; ``state`` is what the previous step returned (None at
        t = 0). Returns (out (B, H, 1, Dv), new state). Stepping through a sequence gives the rows of
        ``forward(..., causal=True)``. This default keeps a key/value cache (O(t) per step);
        kernelized variants keep a constant-size running sum instead. The cache is written in place
        into spare capacity (:func:`append_kv`), so a step copies O(1) keys amortised, not O(t).
        """
        check_step(q, k, v)
        state = append_kv(state, k, v)
        return self(q, state["k"], state["v"]), state

    def prefill(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """The :meth:`decode_step` state after the keys/values of a whole prefix, in one call.

        k (B, H, t, D), v (B, H, t, Dv) for positions 0..t−1 -> the state that t calls of
        :meth:`decode_step` would return (their outputs are not computed), so decoding continues at
        position t. This default is the key/value cache; a variant that overrides ``decode_step``
        without overriding this falls back to stepping through the prefix (correct, O(t) calls).
        """
        check_inputs(k, k, v, None, True, self.num_heads, self.head_dim)
        if type(self).decode_step is Attention.decode_step:
            return {"k": k, "v": v}
        state = None
        for t in range(k.shape[2]):
            kt, vt = k[:, :, t : t + 1], v[:, :, t : t + 1]  # (B, H, 1, ·)
            _, state = self.decode_step(kt, kt, vt, state)
        return state

    def cache_memory(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
    ) -> dict[str, Tensor | None]:
        """What decoding keeps of fixed keys/values (cross-attention), computed once per sequence.

        This default keeps k, v and the mask; kernelized variants keep Σ_j φ(k_j)[v_j, 1]ᵀ, so each
        step costs O(M·Dv) whatever the source length. Every tensor is batch-first.
        Variants that cannot cross-attend (:func:`unsupported_use`) raise here.
        """
        problem = unsupported_use(type(self), causal=False, cross=True)
        if problem:
            raise ValueError(problem)
        return {"k": k, "v": v, "mask": key_padding_mask}

    def attend_memory(self, q: Tensor, memory: dict[str, Tensor | None]) -> Tensor:
        """q (B, H, L, D) against a :meth:`cache_memory` result -> (B, H, L, Dv)."""
        return self(q, memory["k"], memory["v"], key_padding_mask=memory["mask"])

    def reset_random(self, seed: int) -> None:
        """Redraw everything random this module owns from ``seed`` alone, leaving torch's RNG as it was.

        This default reruns ``reset_parameters`` (if the variant has one) on a private RNG seeded
        with ``seed``; variants with other random state (FAVOR+ features) override it.
        :func:`~efficient_attn.seed_attentions` calls it with a seed per module.
        """
        reset = getattr(self, "reset_parameters", None)
        if reset is not None:
            with private_rng(seed, self):
                reset()

    def optimizer_step(self) -> None:
        """Called once after every optimizer step (:func:`~efficient_attn.attention_optimizer_step`);
        a no-op unless the variant keeps a schedule (FAVOR+ redraws)."""

    def final_optimizer_step(self) -> None:
        """Called instead of :meth:`optimizer_step` after a run's last optimizer step
        (``attention_optimizer_step(model, final=True)``): what that step changes would meet no training,
        only the last validation and the test. By default the same as :meth:`optimizer_step`."""
        self.optimizer_step()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}"


def unsupported_use(cls: type[Attention], *, causal: bool, cross: bool) -> str | None:
    """Why ``cls`` cannot run (non-)causal self- or cross-attention (its ``supports_*`` flags), or None.

    Forward raises this message; ``AttentionSpec.check`` reports it for a model's attention sites.
    """
    name = cls.__name__
    if causal and not cls.supports_causal:
        return f"{name} does not support causal=True"
    if not causal and not cls.supports_noncausal:
        return (f"{name} is causal-only: it needs causal=True (decoder self-attention), "
                "not non-causal encoder or cross-attention")
    if cross and not cls.supports_cross_attention:
        return (f"{name} is self-attention only: it needs keys aligned with the queries (S == L), "
                "not cross-attention over another sequence")
    return None


@contextmanager
def private_rng(seed: int | None = None, module: nn.Module | None = None) -> Iterator[None]:
    """Run a block on a copy of torch's RNG: afterwards the global RNG state is what it was before.

    With ``seed`` the block draws from that seed alone, on the CPU and on every GPU that ``module``'s
    tensors (or the default device) live on; without it the block continues from the current state.
    """
    devices = set()
    if module is not None:
        devices = {t.device.index for t in chain(module.parameters(), module.buffers()) if t.is_cuda}
    default = torch.get_default_device()
    if default.type == "cuda":
        devices.add(default.index if default.index is not None else torch.cuda.current_device())
    with torch.random.fork_rng(devices=sorted(devices)):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
        yield


def check_token_input(attn: Attention, x: Tensor | None, q: Tensor) -> None:
    """``x`` is given exactly when ``attn`` takes a per-token input, and then is (B, L, model_dim)."""
    name = type(attn).__name__
    if not attn.token_input:
        if x is not None:
            raise ValueError(f"{name} takes no per-token input x (only variants with token_input = True do)")
        return
    b, heads, length, dim = q.shape
    want = (b, length, attn.model_dim)
    if x is None:
        if attn.model_dim != heads * dim:
            raise ValueError(f"{name} computes its gates from the tokens: pass x of shape (B, L, model_dim) = "
                             f"{want} (without x it reads the keys, which needs model_dim = H·D = {heads * dim})")
        return
    if tuple(x.shape) != want or not x.is_floating_point():
        raise ValueError(f"{name} needs x of shape (B, L, model_dim) = {want}, got {x.dtype} {tuple(x.shape)}")


def tokens_or_keys(x: Tensor | None, k: Tensor) -> Tensor:
    """The per-token input: ``x`` (B, L, model_dim), or without it the keys with heads merged (B, L, H·D)."""
    return x if x is not None else k.transpose(1, 2).flatten(2)  # (B, H, L, D) -> (B, L, H·D)


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    num_heads: int,
    head_dim: int,
) -> None:
    """Raise ``ValueError`` naming the shapes when q, k, v and the mask do not fit together."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L|S, D), got {shapes}")
    (b, h, length, d), (bk, hk, s, dk), (bv, hv, sv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv and h == hk == hv):
        raise ValueError(f"q, k, v must share batch and head dims, got {shapes}")
    if h != num_heads or d != head_dim or dk != head_dim:
        raise ValueError(
            f"expected {num_heads} heads of dim {head_dim} (B, {num_heads}, L, {head_dim}), got {shapes}"
        )
    if s != sv:
        raise ValueError(f"k and v must have the same length S, got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if causal and length != s:
        raise ValueError(f"causal=True needs self-attention (L == S), got {shapes}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, s) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be bool of shape (B, S) = ({b}, {s}) with True = padding, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} for {shapes}"
            )


class _Spare:
    """The buffers behind a key/value cache's ``k``/``v`` views and how far they are written.

    Shared by every state that views them; only the state at the written frontier may write the
    next slot in place.
    """

    def __init__(self, k: Tensor, v: Tensor, length: int) -> None:
        self.k, self.v, self.length = k, v, length


class KVCache(dict):
    """A key/value cache state: the dict ``{"k": (B, H, t, D), "v": (B, H, t, Dv)}`` that every
    reader expects, plus (as an attribute, not a key) the :class:`_Spare` buffers it views. Code that
    rebuilds the dict (beam reordering) gets a plain dict, which is then copied on the next step."""

    __slots__ = ("spare",)

    def __init__(self, k: Tensor, v: Tensor, spare: _Spare | None = None) -> None:
        super().__init__(k=k, v=v)
        self.spare = spare


def append_kv(state: dict[str, Any] | None, k: Tensor, v: Tensor, growth: float = 1.5) -> dict[str, Any]:
    """The key/value cache ``state`` (k (B, H, t, D), v (B, H, t, Dv)) with position t appended.

    ``torch.cat`` would copy all t keys every step (O(t) per token, 9× sdpa's preallocated cache at
    16K). Instead the keys live in buffers with spare capacity (grown ×``growth`` when full, so a
    step copies O(1) keys amortised) and ``state["k"]`` / ``state["v"]`` are views of the first t+1
    slots, so every reader sees exactly the cache it saw before. A state written past (stepped
    twice, e.g. two continuations of one prompt), reordered (beam search: its views are fresh
    copies), or recorded for autograd is never written in place; it is copied into new buffers.
    """
    if state is None:
        state = KVCache(k[:, :, :0], v[:, :, :0])  # (B, H, 0, ·)
    old_k, old_v = state["k"], state["v"]
    t = old_k.shape[2]
    spare = getattr(state, "spare", None)
    in_place = (
        isinstance(spare, _Spare) and spare.length == t and t < spare.k.shape[2]
        and spare.k.shape[:2] == k.shape[:2] and spare.k.dtype == k.dtype and spare.k.device == k.device
        and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or old_k.requires_grad))
    )
    if not in_place:
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or old_k.requires_grad):
            # autograd records the views: never write into them (plain torch.cat, a fresh tensor)
            return KVCache(torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2))  # (B, H, t+1, ·)
        capacity = max(int(t * growth) + 1, t + 16)
        b, h = k.shape[:2]
        spare = _Spare(k.new_empty(b, h, capacity, k.shape[-1]), v.new_empty(b, h, capacity, v.shape[-1]), t)
        spare.k[:, :, :t], spare.v[:, :, :t] = old_k, old_v  # (B, H, t, ·)
    spare.k[:, :, t : t + 1], spare.v[:, :, t : t + 1] = k, v
    spare.length = t + 1
    return KVCache(spare.k[:, :, : t + 1], spare.v[:, :, : t + 1], spare)  # views (B, H, t+1, ·)


def check_step(q: Tensor, k: Tensor, v: Tensor) -> None:
    """A decoding step takes exactly one new position."""
    if q.dim() != 4 or q.shape[2] != 1 or k.shape[2:3] != (1,) or v.shape[2:3] != (1,):
        raise ValueError(
            f"decode_step takes one position: q, k, v of shape (B, H, 1, D), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def empty_rows(key_padding_mask: Tensor, length: int, causal: bool) -> Tensor:
    """(B, 1, L, 1) bool: True where a query sees no key at all (its output is defined as zero)."""
    visible = ~key_padding_mask  # (B, S)
    if causal:
        empty = visible.cumsum(-1) == 0  # (B, L): nothing visible in keys 0..t
    else:
        empty = (~visible.any(-1, keepdim=True)).expand(-1, length)  # (B, L)
    return empty[:, None, :, None]


def allowed_pairs(key_padding_mask: Tensor, length: int, causal: bool) -> tuple[Tensor, Tensor]:
    """Boolean (B, 1, L, S) mask, True = query may attend key, and the (B, 1, L, 1) empty rows.

    Empty rows are let through to every key (so softmax stays finite and gradients NaN-free);
    callers zero those rows' outputs afterwards.
    """
    s = key_padding_mask.shape[-1]
    allowed = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        tril = torch.ones(length, s, dtype=torch.bool, device=key_padding_mask.device).tril()
        allowed = allowed & tril  # (B, 1, L, S)
    empty = empty_rows(key_padding_mask, length, causal)  # (B, 1, L, 1)
    return allowed | empty, empty


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    """softmax(scale · q kᵀ + mask) v through ``F.scaled_dot_product_attention`` (fused kernels)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    allowed, empty = allowed_pairs(key_padding_mask, q.shape[-2], causal)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)  # (B, H, L, Dv)
    return out.masked_fill(empty, 0.0)


def masked_softmax(scores: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
    """Row softmax of explicit (B, H, L, S) scores under the masks; empty rows become zeros."""
    if key_padding_mask is None and not causal:
        return scores.softmax(-1)
    length, s = scores.shape[-2:]
    if key_padding_mask is None:
        key_padding_mask = torch.zeros(scores.shape[0], s, dtype=torch.bool, device=scores.device)
    allowed, empty = allowed_pairs(key_padding_mask, length, causal)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, H, L, S)
    return weights.masked_fill(empty, 0.0)
