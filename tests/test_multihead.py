"""The multi-head wrapper: projections shared by every variant, shapes, errors."""

import pytest
import torch

import efficient_attn as ea

from .helpers import skip_unsupported


@pytest.mark.parametrize("name", ea.list_attentions())
def test_self_and_cross_attention_shapes(name):
    mha = ea.MultiHeadAttention(32, 4, attention=name)
    x, memory = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    assert mha(x, causal=True).shape == (2, 7, 32)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 9:] = True
    skip_unsupported(name, lambda: mha(x, memory, key_padding_mask=mask), cross=True)
    assert mha(x, memory, key_padding_mask=mask).shape == (2, 7, 32)


def test_projections_are_the_same_for_every_variant():
    shapes = {}
    for name in ea.list_attentions():
        torch.manual_seed(0)
        mha = ea.MultiHeadAttention(32, 4, attention=name)
        shapes[name] = {k: v for k, v in mha.state_dict().items() if not k.startswith("attention.")}
    first = shapes.pop("softmax")
    for other in shapes.values():
        assert first.keys() == other.keys()
        assert all(torch.equal(first[k], other[k]) for k in first)


def test_attention_kwargs_forwarded():
    mha = ea.MultiHeadAttention(32, 4, attention="favor", attention_kwargs={"num_features": 48})
    assert mha.attention.projection.shape == (48, 8)
    with pytest.raises(TypeError, match="num_features"):
        ea.MultiHeadAttention(32, 4, attention="favor", attention_kwargs={"nb_features": 48})


def test_equals_torch_multihead_attention():
    """softmax through the wrapper == torch.nn.MultiheadAttention with the same weights."""
    ours = ea.MultiHeadAttention(16, 4).double()
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())
    x, mem = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 8, 16, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 6:] = True
    want, _ = ref(x, mem, mem, key_padding_mask=mask)
    torch.testing.assert_close(ours(x, mem, key_padding_mask=mask), want)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        ea.MultiHeadAttention(30, 4)
    assert ea.MultiHeadAttention(30, 4, head_dim=8).attention.head_dim == 8
    with pytest.raises(ValueError, match="unknown attention"):
        ea.MultiHeadAttention(32, 4, attention="sofmax")
    with pytest.raises(ValueError, match=r"\(B, L, 32\)"):
        ea.MultiHeadAttention(32, 4)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="causal"):
        ea.MultiHeadAttention(32, 4)(torch.randn(2, 5, 32), torch.randn(2, 6, 32), causal=True)
