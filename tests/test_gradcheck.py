"""torch.autograd.gradcheck (float64) of the full attention call for every variant.

Causal and not, with left and right padding, through q, k and v (and the variant's parameters),
at lengths whose chunking leaves a partial last chunk (L=11 with chunk 3, 4) or none (11, 12/4):
a hand-written backward that drops the state carried across chunks fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import efficient_attn as ea

from .helpers import make_qkv, skip_unsupported

ALL = ea.list_attentions()
SMALL_OPTIONS = {"favor": {"num_features": 6}}  # small m keeps the numerical Jacobian cheap
EXTRA = [("favor", {"num_features": 6, "kernel": "relu"}), ("favor", {"num_features": 4, "kernel": "softmax_trig"})]
EXTRA += [("sliding_window", {"window": 3}), ("sliding_window", {"window": 4})]  # L 11, 12: partial and full blocks
LENGTH_CHUNKS = [(11, 3), (11, 4), (11, 11), (12, 4)]
FAST = {"fast_mode": True}  # random-projection gradcheck: one Jacobian-vector product per input, not L·D


def cases() -> list[tuple[str, dict, int, int]]:
    """(name, options, L, chunk): chunked variants at every (L, chunk), the others at each L once."""
    out = []
    for name, options in [(n, SMALL_OPTIONS.get(n, {})) for n in ALL] + EXTRA:
        if "chunk_size" in ea.attention_options(name):
            out += [(name, {**options, "chunk_size": c}, n, c) for n, c in LENGTH_CHUNKS]
        else:
            out += [(name, options, 11, 0), (name, options, 12, 0)]
    return out


def case_id(case: tuple[str, dict, int, int]) -> str:
    name, options, length, chunk = case
    extra = "".join(f"-{k}={v}" for k, v in options.items() if k not in ("num_features", "chunk_size"))
    return f"{name}{extra}-L{length}-c{chunk}"


def build(name: str, options: dict) -> torch.nn.Module:
    torch.manual_seed(1)
    return ea.create_attention(name, head_dim=3, num_heads=1, **options).double().eval()


def padding(length: int) -> torch.Tensor:
    """Row 0 right-padded (2 keys), row 1 left-padded (1 key: under causal, its row 0 sees nothing)."""
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[0, -2:] = True
    mask[1, :1] = True
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_gradcheck_q_k_v(case, causal):
    name, options, length, _ = case
    attn = build(name, options)
    q, k, v = make_qkv(b=2, h=1, length=length, d=3, dv=2, scale=0.8)
    mask = padding(length)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    skip_unsupported(name, lambda: attn(q, k, v, causal=causal), causal=causal)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attn(q, k, v, key_padding_mask=mask, causal=causal), inputs, **FAST
    )
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v, causal=causal), inputs, **FAST)


@pytest.mark.parametrize("name", ALL)
def test_gradcheck_cross_attention(name):
    attn = build(name, {**SMALL_OPTIONS.get(name, {}), **({"chunk_size": 2} if name == "additive" else {})})
    q, k, v = make_qkv(b=2, h=1, length=5, s=7, d=3, dv=2, scale=0.8)
    mask = padding(7)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask), cross=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v, key_padding_mask=mask), inputs, **FAST)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", [n for n in ALL if list(build(n, SMALL_OPTIONS.get(n, {})).parameters())])
def test_gradcheck_parameters(name, causal):
    """Learned parameters (additive's W_q, W_k, b, w; bilinear's W) get exact gradients too."""
    options = {**SMALL_OPTIONS.get(name, {}), **({"chunk_size": 4} if name == "additive" else {})}
    attn = build(name, options)
    names = [n for n, _ in attn.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in attn.parameters())
    q, k, v = make_qkv(b=2, h=1, length=11, d=3, dv=2, scale=0.8)
    mask = padding(11)

    def call(*values):
        return functional_call(attn, dict(zip(names, values)), (q, k, v),
                               {"key_padding_mask": mask, "causal": causal})

    skip_unsupported(name, lambda: call(*params), causal=causal)

    assert torch.autograd.gradcheck(call, params, **FAST)
