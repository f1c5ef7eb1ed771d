"""Every registered attention compiles as one graph, forward and backward, causal and not, with a padding
mask: ``torch.compile(fullgraph=True)`` raises on any graph break (a host sync such as ``.item()`` or
``if tensor:``, unsupported Python), and the compiled output and gradients equal the eager ones. The eager
backend keeps it to Dynamo's tracing (about a second a case)."""

import pytest
import torch

import efficient_attn as ea

from .helpers import skip_unsupported

CAUSAL = [False, True]


def _options(name: str) -> dict:
    options = ea.attention_options(name)
    kwargs = {"num_features": 16} if "num_features" in options else {}
    return kwargs | ({"max_len": 16} if "max_len" in options else {})


@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("name", ea.list_attentions())
def test_attention_compiles_as_one_graph(name, causal, one_thread):
    torch.manual_seed(0)
    attn = ea.create_attention(name, head_dim=8, num_heads=2, **_options(name))  # training mode: redraw logic too
    q, k, v = (torch.randn(2, 2, 10, 8, requires_grad=True) for _ in range(3))  # (B, H, L, D)
    mask = torch.zeros(2, 10, dtype=torch.bool)  # (B, S): the second sequence's last 3 keys are padding
    mask[1, 7:] = True

    def run(a, b, c):
        return attn(a, b, c, key_padding_mask=mask, causal=causal)

    skip_unsupported(name, lambda: run(q, k, v), causal=causal)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(run, fullgraph=True, backend="eager")
        got = compiled(q, k, v)
        grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    finally:
        torch._dynamo.reset()
    want = run(q, k, v)
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w)
