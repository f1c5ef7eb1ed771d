"""``efficient-attn-approx --checkpoint``: FAVOR+ error on the real queries and keys of a trained model.

Forward hooks on every core attention capture one validation batch's q, k, v per attention site; the
error of FAVOR+ against exact softmax is measured there (MSE of the output, and KL(P ‖ P̂) of its rows:
``kl_mean``), and per layer output with every attention of the model swapped to FAVOR+ (Performer
App. D.1 / Fig. 14). ``model_rows`` compares the model's own attention rows with softmax's on the same
q, k at every site (:mod:`efficient_attn.analysis.rows`: both KL directions and the softmax mass the
rows cover; "no rows" for attentions without normalized rows).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Any

import torch

from efficient_attn import Attention, MultiHeadAttention, create_attention, seed_attentions
from efficient_attn.analysis.rows import rows_against_softmax
from efficient_attn.layers import Block
from efficient_attn.registry import get_attention_class, list_attentions
from efficient_attn_tasks.approx import report as approx_report
from efficient_attn_tasks.inference.checkpoint import load as load_checkpoint


def run(a: argparse.Namespace) -> None:
    """Both tables for ``a.checkpoint``, written to ``a.out`` and logged to the active W&B run, if any."""
    data, module = load(a.checkpoint)
    a.out.mkdir(parents=True, exist_ok=True)  # once the checkpoint loaded: a refused one leaves no folder
    batch = validation_batch(data, a.batch_size)
    sites = capture(module, batch)
    title = f"{a.checkpoint.parent.parent.name}, {a.batch_size} validation sequences, {a.draws} draws"
    outputs = {
        "error_by_site": approx_report.save(site_errors(sites, a.layer_features, a.draws), "layer",
                                            a.out / "error_by_site", title),
        "error_by_depth": approx_report.save(depth_errors(module, batch, a.layer_features, a.draws), "layer",
                                             a.out / "error_by_depth", title,
                                             ylabel="relative error of layer output, all attention swapped"),
    }
    approx_report.save_table(model_rows(sites), a.out / "model_rows")
    approx_report.log_to_wandb(outputs)


def load(checkpoint: Path) -> tuple[Any, Any]:
    """(data module, task module in eval mode, float64) rebuilt from a checkpoint's own config
    (efficient_attn_tasks/inference/checkpoint.py)."""
    loaded = load_checkpoint(checkpoint)
    return loaded.data, loaded.module.double().eval()


def validation_batch(data: Any, size: int) -> dict[str, Any]:
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    return {k: v[:size] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}


def capture(module: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Inputs of every core attention call in one forward pass, in call order."""
    sites: list[dict[str, Any]] = []
    modules = dict(module.named_modules())

    def record(name, args, kwargs, out):
        q, k, v = args
        sites.append({"site": name, "attention": modules[name], "q": q, "k": k, "v": v,
                      "mask": kwargs.get("key_padding_mask"), "causal": kwargs.get("causal", False)})

    _forward_with_hooks(module, batch, Attention, record, with_kwargs=True)
    return sites


def _forward_with_hooks(module: Any, batch: dict[str, Any], kind: type, hook: Any, *,
                        with_kwargs: bool = False) -> None:
    """One no-grad forward pass calling ``hook(name, *hook_args)`` after every submodule of type ``kind``."""
    names = {m: n for n, m in module.named_modules() if isinstance(m, kind)}
    handles = [m.register_forward_hook(lambda mod, *a: hook(names[mod], *a), with_kwargs=with_kwargs) for m in names]
    try:
        with torch.no_grad():
            module(batch)
    finally:
        for h in handles:
            h.remove()


def site_errors(sites: list[dict[str, Any]], features: list[int], draws: int) -> list[dict[str, Any]]:
    """MSE of FAVOR+ (positive, orthogonal) against exact softmax on each site's real q, k, v, and the mean
    KL(P ‖ P̂) of its rows (``kl_*``; an infinite draw is counted in ``kl_non_finite``, not averaged)."""
    rows = []
    for layer, s in enumerate(sites):
        h, d = s["q"].shape[1], s["q"].shape[-1]
        kw = dict(key_padding_mask=s["mask"], causal=s["causal"])
        with torch.no_grad():
            exact = create_attention("softmax", head_dim=d, num_heads=h)(s["q"], s["k"], s["v"], **kw)
            for m in features:
                errs, kls = [], []
                for draw in range(draws):
                    favor = create_attention("favor", head_dim=d, num_heads=h, num_features=m, seed=draw).double()
                    errs.append(float((favor(s["q"], s["k"], s["v"], **kw) - exact).pow(2).mean()))
                    kls.append(rows_against_softmax(favor, s["q"], s["k"], **kw)["kl_softmax_model"])
                finite = [x for x in kls if x == x and abs(x) != float("inf")]
                rows.append(_row(f"m={m}", layer, s["site"], errs) | {
                    "kl_mean": statistics.mean(finite) if finite else float("nan"),
                    "kl_std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
                    "kl_non_finite": len(kls) - len(finite)})
    return rows


def model_rows(sites: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per site, the model's own attention rows against softmax's on the same q, k
    (:func:`efficient_attn.analysis.rows.rows_against_softmax`); NaN where the attention has no rows."""
    return [{"layer": layer, "site": s["site"], "attention": attention_name(s["attention"]),
             **rows_against_softmax(s["attention"], s["q"], s["k"], s["mask"], s["causal"])}
            for layer, s in enumerate(sites)]


def attention_name(attn: Any) -> str:
    """The registry name of an attention module (its class name if it is not registered)."""
    return next((n for n in list_attentions() if get_attention_class(n) is type(attn)), type(attn).__name__)


def depth_errors(module: Any, batch: dict[str, Any], features: list[int], draws: int) -> list[dict[str, Any]]:
    """Relative error ‖h_favor − h‖² / ‖h‖² of every layer's output with all attentions swapped to FAVOR+."""
    exact = _layer_outputs(module, batch)
    rows = []
    for m in features:
        per_layer: list[list[float]] = [[] for _ in exact]
        for draw in range(draws):
            swapped = _swap_to_favor(module, m, draw)
            for i, (name, h) in enumerate(_layer_outputs(swapped, batch)):
                per_layer[i].append(float((h - exact[i][1]).pow(2).sum() / exact[i][1].pow(2).sum()))
        rows += [_row(f"m={m}", i, exact[i][0], errs) for i, errs in enumerate(per_layer)]
    return rows


def _swap_to_favor(module: Any, m: int, seed: int) -> Any:
    """A copy with every attention FAVOR+ (m features); each site its own features, from (seed, its name)."""
    swapped = copy.deepcopy(module)
    for mha in (x for x in swapped.modules() if isinstance(x, MultiHeadAttention)):
        mha.attention = create_attention("favor", head_dim=mha.head_dim, num_heads=mha.num_heads,
                                         num_features=m, seed=seed).double().eval()
    seed_attentions(swapped)  # per-site features: errors of different layers are not correlated
    return swapped


def _layer_outputs(module: Any, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    outputs: list[tuple[str, torch.Tensor]] = []
    _forward_with_hooks(module, batch, Block, lambda name, args, out: outputs.append((name, out)))
    return outputs


def _row(estimator: str, layer: int, site: str, errors: list[float]) -> dict[str, Any]:
    return {"estimator": estimator, "layer": layer, "site": site, "draws": len(errors),
            "mse_mean": statistics.mean(errors), "mse_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
            "non_finite": sum(1 for e in errors if e != e)}
