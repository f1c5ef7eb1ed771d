"""Where training memory goes: the bytes a forward keeps for backward, per module and per tensor kind.

Peak RSS (``train``) says how much; this says what. One forward (and loss) of the train mode's LM runs
under :func:`torch.autograd.graph.saved_tensors_hooks`, whose pack hook notes which module saved each
tensor; then the autograd graph is walked from the loss, and every tensor a node holds for its backward
(a built-in node's ``_saved_*`` fields; a custom Function's ``saved_tensors`` and the tensors it keeps as
attributes, which no hook sees) is counted once per storage, under the innermost module that saved it
and the node that holds it. Parameters are left out (they are not activations).

    python -m efficient_attn_tasks.bench.saved --attentions softmax,linear,favor --lengths 1024 4096 --layers 2

prints, per attention and L, the saved MiB by module kind (attention core, projections, MLP, norms,
rest) and the core's largest entries (node, shape, MiB); ``--train-batch B`` holds the batch at B, so the tokens
grow with L (B·L), as ``efficient-attn-bench --train-batch`` does, instead of the tokens at ``--tokens-per-batch``
(batch = tokens / L); with ``--peak`` also the most bytes live at once during
forward and backward (``lm_step_peak``: what a step's peak RSS measures, without the allocator's caching). No forward
runs at import.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

MIB = 2**20


@dataclass
class Saved:
    """One storage kept for backward: who saved it (module path, class), which node holds it, its size."""

    module: str
    module_type: str
    node: str
    field: str
    shape: tuple[int, ...]
    nbytes: int


def _tensors(value: Any) -> Iterator[Any]:
    """The tensors in a node field: a tensor, or a list/tuple of them (nested once)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from (t for t in item if isinstance(t, torch.Tensor))


def _node_fields(node: Any) -> Iterator[tuple[str, Any]]:
    """(field name, value) of everything ``node`` keeps for its backward."""
    if hasattr(node, "saved_tensors") and hasattr(node, "apply"):  # a custom Function's ctx
        try:
            yield "saved_tensors", node.saved_tensors
        except RuntimeError:  # already freed
            pass
        for name, value in vars(node).items():
            yield name, value
        return
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                yield name, getattr(node, name)
            except RuntimeError:
                continue


def _walk(root: Any) -> Iterator[Any]:
    """Every node of the autograd graph below ``root`` once."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(next_fn for next_fn, _ in node.next_functions)


def saved_for_backward(model: Any, forward: Callable[[], Any]) -> list[Saved]:
    """The storages that ``forward()`` (returning a tensor with a graph, e.g. the loss) keeps for backward,
    each once, attributed to the innermost submodule of ``model`` whose forward saved it ("" outside any)."""
    import torch

    names = {id(m): name for name, m in model.named_modules()}
    stack: list[Any] = []
    saver: dict[int, tuple[str, str]] = {}  # storage pointer -> (module path, class) of the first saver

    def enter(module: Any, *_: Any) -> None:
        stack.append(module)

    def leave(module: Any, *_: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    def pack(t: Any) -> Any:
        key = t.untyped_storage().data_ptr()
        if key not in saver:
            module = stack[-1] if stack else None
            saver[key] = (names.get(id(module), "?"), type(module).__name__) if module is not None else ("", "")
        return t

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    finally:
        for handle in handles:
            handle.remove()
    rows, counted = [], set(params)
    for node in _walk(out.grad_fn):
        for field, value in _node_fields(node):
            for t in _tensors(value):
                key = t.untyped_storage().data_ptr()
                if key in counted or key == 0:
                    continue
                counted.add(key)
                module, module_type = saver.get(key, ("(kept by a Function, no hook)", ""))
                rows.append(Saved(module, module_type, type(node).__name__, field, tuple(t.shape),
                                  t.untyped_storage().nbytes()))
    return rows


def kind(row: Saved) -> str:
    """A coarse class of the saver: attention core, attention projections, MLP, norms, or the rest."""
    path = row.module
    if ".attention" in path or row.module.startswith("(kept"):
        return "attention core"
    if "attn" in path:
        return "attention projections"
    if ".ff" in path:
        return "mlp"
    if "LayerNorm" in row.module_type or "norm" in path:
        return "norms"
    return "rest (embeddings, head, loss)"


def summarize(rows: list[Saved]) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """Bytes by kind; and the core's entries grouped by (node, field, shape with layer indices folded),
    largest first, as (label, count, bytes)."""
    by_kind: dict[str, int] = defaultdict(int)
    core: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        by_kind[kind(row)] += row.nbytes
        if kind(row) == "attention core":
            label = f"{row.node}.{row.field} {'x'.join(map(str, row.shape))}"
            core[label][0] += 1
            core[label][1] += row.nbytes
    entries = sorted(((label, c, b) for label, (c, b) in core.items()), key=lambda e: -e[2])
    return dict(by_kind), entries


def _lm(attention: str, length: int, tokens: int, layers: int, d_model: int, heads: int, d_ff: int,
        num_features: int, options: dict[str, Any] | None, batch: int | None = None) -> tuple[Any, Callable[[], Any]]:
    """The train mode's LM and a function running its forward and loss on fixed data: ``batch`` sequences of
    length L, or (``batch`` None) tokens / L of them."""
    import torch
    import torch.nn.functional as F

    from efficient_attn.transformer import AttentionSpec, TransformerConfig, TransformerLM
    from efficient_attn_tasks.bench.train import VOCAB, attention_kwargs

    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=d_model, num_heads=heads, d_ff=d_ff, encoder_layers=0, decoder_layers=layers,
                            max_len=length)
    kwargs = attention_kwargs(attention, {"num_features": num_features, "L": length}) | (options or {})
    model = TransformerLM(cfg, VOCAB, attention=AttentionSpec(attention, kwargs))
    batch = batch_size(length, tokens, batch)
    data = torch.randint(0, VOCAB, (batch, length + 1))  # (B, L + 1)

    def forward() -> Any:
        logits = model(data[:, :-1])  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())

    return model, forward


def batch_size(length: int, tokens: int, batch: int | None = None) -> int:
    """The batch: ``batch`` when given (tokens B·L grow with L), else tokens / L (at least 1)."""
    return batch if batch is not None else max(1, tokens // length)


def lm_breakdown(attention: str, length: int, tokens: int, layers: int, d_model: int = 256, heads: int = 4,
                 d_ff: int = 1024, num_features: int = 256, options: dict[str, Any] | None = None,
                 batch: int | None = None) -> list[Saved]:
    """The saved tensors of one forward + loss of the train mode's LM (batch ``batch``, or tokens / L)."""
    model, forward = _lm(attention, length, tokens, layers, d_model, heads, d_ff, num_features, options, batch)
    return saved_for_backward(model, forward)


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes live at once, above those live at the start, while ``fn()`` runs: the CPU allocator's
    allocations and frees in order, from the profiler's memory events (deterministic: no allocator caching, no
    other process, unlike peak RSS)."""
    import torch

    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    # every allocation (+bytes) and free (−bytes) of the CPU allocator, in order; parsed lazily, not as op events
    records = [e for e in prof.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):  # a stable sort: same-ns records keep their order
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def lm_step_peak(attention: str, length: int, tokens: int, layers: int, d_model: int = 256, heads: int = 4,
                 d_ff: int = 1024, num_features: int = 256, options: dict[str, Any] | None = None,
                 batch: int | None = None) -> int:
    """Peak bytes live during one forward, loss and backward of the train mode's LM (batch ``batch``, or
    tokens / L), parameters left out (they exist before), gradients included: the allocator's counterpart of a
    training step's peak RSS."""
    model, forward = _lm(attention, length, tokens, layers, d_model, heads, d_ff, num_features, options, batch)
    return peak_bytes(lambda: forward().backward())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attentions", default="softmax,linear,favor")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--tokens-per-batch", type=int, default=16384)
    p.add_argument("--train-batch", type=int, metavar="B",
                   help="hold the batch at B (tokens B·L grow with L) instead of the tokens at --tokens-per-batch")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-features", type=int, default=256)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an attention option (every attention that has it), e.g. recompute=false")
    p.add_argument("--top", type=int, default=8, help="core entries shown")
    p.add_argument("--peak", action="store_true",
                   help="also the peak bytes live during a forward and backward (profiler memory events)")
    args = p.parse_args(argv)
    if args.train_batch is not None and args.train_batch < 1:
        p.error(f"--train-batch must be >= 1, got {args.train_batch}")
    import efficient_attn as ea

    for name in args.attentions.split(","):
        options = {}
        for item in args.option:
            key, value = item.split("=", 1)
            if key in ea.attention_options(name):
                options[key] = {"true": True, "false": False}.get(value.lower(), value)
        for length in args.lengths:
            batch = batch_size(length, args.tokens_per_batch, args.train_batch)
            rows = lm_breakdown(name, length, args.tokens_per_batch, args.layers, num_features=args.num_features,
                                options=options, batch=batch)
            by_kind, entries = summarize(rows)
            total = sum(by_kind.values())
            shown = ", ".join(f"{k} {b / MIB:.1f}" for k, b in sorted(by_kind.items(), key=lambda kv: -kv[1]))
            print(f"{name} L={length} B={batch} layers={args.layers} "
                  f"{options or ''}: saved {total / MIB:.1f} MiB ({shown})")
            if args.peak:
                peak = lm_step_peak(name, length, args.tokens_per_batch, args.layers, num_features=args.num_features,
                                    options=options, batch=batch)
                print(f"    step peak (forward + backward, above the parameters): {peak / MIB:.1f} MiB")
            for label, count, nbytes in entries[: args.top]:
                print(f"    {re.sub(r'Backward0?$', '', label):<60} x{count:<4} {nbytes / MIB:8.1f} MiB")


if __name__ == "__main__":
    main()
