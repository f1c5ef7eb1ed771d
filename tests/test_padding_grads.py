"""Padding reaches neither outputs nor gradients through ``MultiHeadAttention``, inf and NaN included.

Every registered attention, causal and not, self- and cross-attention: the padded rows of the inputs
are poisoned (NaN, ±inf, 1e300) and everything must equal the run on the same inputs with clean
padded rows (zeros, or random finite values): outputs at unpadded rows, every parameter gradient,
and the input gradient, which is exactly zero at padded rows. Comparisons are exact (rtol = atol = 0):
padding is zeroed before any arithmetic, so poisoned and clean runs compute the very same numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import efficient_attn as ea
from efficient_attn.transformer import (
    AttentionSpec,
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
)

from .helpers import site_specs, skip_unsupported

D_MODEL, HEADS, LENGTH = 16, 2, 7
POISONS = ("nan", "inf", "mixed")
EXACT = dict(rtol=0.0, atol=0.0)


def padding_mask(s: int) -> Tensor:
    """(4, S) bool, True = padding: right-padded; left- and interior-padded; unpadded; all padding."""
    mask = torch.zeros(4, s, dtype=torch.bool)
    mask[0, s - 3 :] = True
    mask[1, :2] = True
    mask[1, s // 2] = True
    mask[3] = True
    return mask


def fill_padded(x: Tensor, mask: Tensor, how: str) -> Tensor:
    """x (B, S, d) with its padded rows set to ``how``: nan | inf | mixed | zeros | random."""
    if how == "random":
        fill = torch.randn_like(x) * 100.0
    elif how == "mixed":  # NaN, ±inf, and a finite value whose square overflows
        cycle = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e300], dtype=x.dtype)
        fill = cycle.repeat(x.numel() // 4 + 1)[: x.numel()].view_as(x)
    else:
        fill = torch.full_like(x, {"nan": float("nan"), "inf": float("inf"), "zeros": 0.0}[how])
    return torch.where(mask[:, :, None], fill, x)  # (B, S, d)


def make_inputs(mode: str, causal: bool) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """(inputs for ``MultiHeadAttention.forward``, key_padding_mask (B, S), query rows that count (B, L)).

    mode: self (key None), cross (key given, value = key) or cross_kv (key and value given).
    Causal cross-attention needs S = L; otherwise the memory is longer than the queries.
    """
    query = torch.randn(4, LENGTH, D_MODEL, dtype=torch.float64)  # (B, L, d_model)
    if mode == "self":
        mask = padding_mask(LENGTH)
        return {"query": query}, mask, ~mask
    s = LENGTH if causal else LENGTH + 3
    mask = padding_mask(s)
    inputs = {"query": query, "key": torch.randn(4, s, D_MODEL, dtype=torch.float64)}  # key (B, S, d_model)
    if mode == "cross_kv":
        inputs["value"] = torch.randn(4, s, D_MODEL, dtype=torch.float64)  # (B, S, d_model)
    return inputs, mask, torch.ones(4, LENGTH, dtype=torch.bool)


def poison(inputs: dict[str, Tensor], mask: Tensor, how: str) -> dict[str, Tensor]:
    """Padded rows of every padded input set to ``how``: key and value, and the query in self-attention."""
    padded = ("key", "value") if "key" in inputs else ("query",)
    return {name: fill_padded(x, mask, how) if name in padded else x for name, x in inputs.items()}


def run(mha: ea.MultiHeadAttention, inputs: dict[str, Tensor], mask: Tensor, causal: bool,
        counted: Tensor, loss: str) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Forward + backward -> (output (B, L, d_model), parameter gradients, input gradients)."""
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    mha.zero_grad(set_to_none=True)
    out = mha(**leaves, key_padding_mask=mask, causal=causal)  # (B, L, d_model)
    if loss == "sum":
        out.sum().backward()
    else:  # a weighted loss over the rows that count only, so gradients differ row by row
        weights = torch.linspace(-1.0, 2.0, out[counted].numel(), dtype=out.dtype).view_as(out[counted])
        (out[counted] * weights).sum().backward()
    params = {name: p.grad.clone() for name, p in mha.named_parameters()}
    return out.detach(), params, {name: x.grad for name, x in leaves.items()}


@pytest.mark.parametrize("loss", ["unpadded", "sum"])
@pytest.mark.parametrize("how", POISONS)
@pytest.mark.parametrize("mode", ["self", "cross", "cross_kv"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ea.list_attentions())
def test_poisoned_padding_reaches_no_output_or_gradient(name, causal, mode, how, loss):
    mha = ea.MultiHeadAttention(D_MODEL, HEADS, attention=name).double()
    inputs, mask, counted = make_inputs(mode, causal)
    cross = "key" in inputs and inputs["key"].shape[1] != LENGTH
    skip_unsupported(name, lambda: mha(**inputs, key_padding_mask=mask, causal=causal), causal=causal, cross=cross)
    ref_out, ref_params, ref_inputs = run(mha, poison(inputs, mask, "zeros"), mask, causal, counted, loss)
    assert ref_params["k_proj.weight"].abs().sum() > 0 and ref_params["q_proj.weight"].abs().sum() > 0

    for fill in (how, "random"):
        out, params, grads = run(mha, poison(inputs, mask, fill), mask, causal, counted, loss)
        torch.testing.assert_close(out[counted], ref_out[counted], **EXACT)
        assert params.keys() == ref_params.keys()
        for pname, grad in params.items():
            assert grad.isfinite().all(), f"{pname}.grad not finite with {fill} padding"
            torch.testing.assert_close(grad, ref_params[pname], **EXACT, msg=lambda m: f"{pname}: {m}")
        for iname, grad in grads.items():
            assert grad.isfinite().all(), f"d{iname} not finite with {fill} padding"
            torch.testing.assert_close(grad, ref_inputs[iname], **EXACT)
            if iname != "query" or mode == "self":
                assert torch.equal(grad[mask], torch.zeros_like(grad[mask])), f"d{iname} nonzero at padding"
    if mode == "self":  # documented: padded positions of self-attention output zeros
        assert torch.equal(out[mask], torch.zeros_like(out[mask]))


@pytest.mark.parametrize("how", POISONS)
@pytest.mark.parametrize("name", ea.list_attentions())
def test_projected_and_cached_cross_attention_ignore_poisoned_memory(name, how):
    """The decoder's paths: ``project_kv`` (with the mask) then ``attend_projected`` / ``attend_cached``."""
    mha = ea.MultiHeadAttention(D_MODEL, HEADS, attention=name).double()
    query = torch.randn(4, LENGTH, D_MODEL, dtype=torch.float64)  # (B, L, d_model)
    memory = torch.randn(4, LENGTH + 3, D_MODEL, dtype=torch.float64)  # (B, S, d_model)
    mask = padding_mask(LENGTH + 3)
    skip_unsupported(name, lambda: mha.attention.cache_memory(*mha.project_kv(memory, key_padding_mask=mask), mask),
                     cross=True)

    def run_paths(fill: str) -> list[tuple[Tensor, list[Tensor], Tensor]]:
        results = []
        for path in ("projected", "cached"):
            mem = fill_padded(memory, mask, fill).requires_grad_()
            mha.zero_grad(set_to_none=True)
            k, v = mha.project_kv(mem, key_padding_mask=mask)  # (B, H, S, D) each
            if path == "projected":
                out = mha.attend_projected(query, k, v, key_padding_mask=mask)  # (B, L, d_model)
            else:
                out = mha.attend_cached(query, mha.attention.cache_memory(k, v, mask))  # (B, L, d_model)
            out.sum().backward()
            results.append((out.detach(), [p.grad.clone() for p in mha.parameters()], mem.grad))
        return results

    for (ref_out, ref_grads, ref_dmem), (out, grads, dmem) in zip(run_paths("zeros"), run_paths(how)):
        torch.testing.assert_close(out, ref_out, **EXACT)
        for grad, ref in zip(grads, ref_grads):
            assert grad.isfinite().all()
            torch.testing.assert_close(grad, ref, **EXACT)
        assert torch.equal(dmem[mask], torch.zeros_like(dmem[mask]))
        torch.testing.assert_close(dmem, ref_dmem, **EXACT)


def test_bad_mask_for_projection_raises():
    mha = ea.MultiHeadAttention(D_MODEL, HEADS)
    memory = torch.randn(2, 5, D_MODEL)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha.project_kv(memory, key_padding_mask=torch.zeros(2, 5))  # not bool
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha.project_kv(memory, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))


# --- through the Transformer models: the padded rows of the embedding output are overwritten ---

def _config() -> TransformerConfig:
    return TransformerConfig(d_model=D_MODEL, num_heads=HEADS, d_ff=32, encoder_layers=2,
                             decoder_layers=2, dropout=0.0, max_len=32)


def _models(name: str) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(model, source embedding) for a Seq2SeqTransformer and a TransformerClassifier; ``name`` at
    the sites it can serve, softmax at the others (no classifier for a causal-only variant)."""
    sites = site_specs(AttentionSpec(name))
    seq2seq = Seq2SeqTransformer(_config(), 20, encoder_attention=sites["encoder"], decoder_attention=sites["decoder"],
                                 cross_attention=sites["cross"]).double()
    models = [(seq2seq, seq2seq.embed_src)]
    if sites["encoder"].name == name:
        classifier = TransformerClassifier(_config(), 20, 3, attention=sites["encoder"]).double()
        models.append((classifier, classifier.embed))
    return models


def _model_grads(model: torch.nn.Module, embed: torch.nn.Module, fill: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and parameter gradients with the padded rows of the source embedding output set to ``fill``."""
    src = torch.randint(1, 20, (4, 9))
    mask = padding_mask(9)
    mask[3, 0] = False  # an all-padding source is not a sentence
    handle = embed.register_forward_hook(lambda mod, args, out: fill_padded(out, mask, fill))
    try:
        model.zero_grad(set_to_none=True)
        if isinstance(model, Seq2SeqTransformer):
            tgt = torch.randint(1, 20, (4, 6))
            out = model(src, tgt, mask)  # (B, T, V); the target embedding shares no hook
        else:
            out = model(src, mask)  # (B, C)
        out.square().sum().backward()
    finally:
        handle.remove()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fill", ["random", "mixed"])  # finite garbage; NaN, ±inf and 1e300
@pytest.mark.parametrize("name", ea.list_attentions())
def test_models_ignore_garbage_in_padding(name, fill):
    """The model's output and every parameter gradient are those with zeros in the padded rows."""
    for model, embed in _models(name):
        torch.manual_seed(1)
        ref_out, ref = _model_grads(model, embed, "zeros")
        torch.manual_seed(1)
        out, grads = _model_grads(model, embed, fill)
        torch.testing.assert_close(out, ref_out, **EXACT)
        assert grads.keys() == ref.keys()
        for pname, grad in grads.items():
            assert grad.isfinite().all(), f"{pname}.grad not finite"
            torch.testing.assert_close(grad, ref[pname], **EXACT, msg=lambda m: f"{pname}: {m}")
