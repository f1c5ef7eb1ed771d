"""Registry behaviour: names, errors that list what is known, registration rules."""

import pytest
import torch

import efficient_attn as ea
from efficient_attn.registry import _REGISTRY

BUILTIN = {"softmax", "dot", "additive", "bilinear", "favor", "linear"}


def test_builtins_registered():
    assert BUILTIN <= set(ea.list_attentions())
    assert ea.list_attentions() == sorted(ea.list_attentions())


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(ValueError) as info:
        ea.create_attention("favour", head_dim=8, num_heads=2)
    msg = str(info.value)
    assert "'favor'" in msg and "Did you mean" in msg
    for name in BUILTIN:
        assert name in msg


def test_unknown_kwarg_lists_accepted():
    with pytest.raises(TypeError) as info:
        ea.create_attention("favor", head_dim=8, num_heads=2, num_feature=64)
    msg = str(info.value)
    assert "num_feature" in msg and "num_features=256" in msg and "redraw_interval" in msg


def test_kwarg_of_another_variant_rejected():
    with pytest.raises(TypeError, match="hidden_dim"):
        ea.create_attention("softmax", head_dim=8, num_heads=2, hidden_dim=4)


@pytest.mark.parametrize(
    "name, kwargs",
    [("favor", {"kernel": "cosine"}), ("favor", {"num_features": 0}), ("softmax", {"scale": -1.0}),
     ("additive", {"hidden_dim": 0}), ("linear", {"chunk_size": 0})],
)
def test_bad_option_values(name, kwargs):
    with pytest.raises(ValueError):
        ea.create_attention(name, head_dim=8, num_heads=2, **kwargs)


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_bad_dims(bad):
    with pytest.raises(ValueError, match="head_dim"):
        ea.create_attention("softmax", head_dim=bad, num_heads=2)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        @ea.register_attention("softmax")
        class Again(ea.Attention):
            pass


def test_options_must_be_keyword_only():
    with pytest.raises(TypeError, match="keyword-only"):
        @ea.register_attention("_positional_option")
        class Positional(ea.Attention):
            def __init__(self, head_dim, num_heads, scale=1.0):
                super().__init__(head_dim, num_heads)
    assert "_positional_option" not in ea.list_attentions()


def test_custom_variant_plugs_into_wrapper():
    @ea.register_attention("_uniform")
    class Uniform(ea.Attention):
        """Mean of the values, ignoring queries (test only)."""

        def __init__(self, head_dim, num_heads):
            super().__init__(head_dim, num_heads)

        def attend(self, q, k, v, key_padding_mask, causal):
            return v.mean(-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1])

    try:
        assert "_uniform" in ea.list_attentions()
        mha = ea.MultiHeadAttention(16, 4, attention="_uniform")
        assert mha(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    finally:
        _REGISTRY.pop("_uniform")


def test_attention_options():
    opts = ea.attention_options("favor")
    assert opts["num_features"] == 256 and opts["kernel"] == "softmax"
    assert opts["orthogonal"] is None and opts["projection"] is None
    assert "head_dim" not in opts
