"""Exact second derivatives for the hand-written autograd Functions of the core.

The fast backward passes (chunked causal products, additive scores, positive features) work in
place and under ``no_grad``, so autograd cannot differentiate them again. When a second derivative
is asked for (``torch.autograd.grad(..., create_graph=True)``, e.g. a gradient penalty), grad mode
is on inside ``backward``; the Function then calls :func:`double_backward_by_recompute`, which
re-runs a plain autograd version of the same forward and differentiates that with
``create_graph=True``. First derivatives keep the fast path; second derivatives are exact, never
silently dropped (``tests/test_double_backward.py`` runs ``gradgradcheck`` on each Function).

:func:`recompute_in_backward` is the same re-computation used for training memory: a forward that keeps only its
inputs and runs again in backward (activation checkpointing of one function, seen by autograd as one node).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def double_backward_by_recompute(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor], grads: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """Gradients of ``fn(*inputs)`` against ``grads``, as a differentiable graph.

    ``inputs`` are the Function's saved inputs (still attached to the caller's graph); those that do
    not require grad get None.
    """
    wanted = [t for t in inputs if t.requires_grad]
    with torch.enable_grad():
        out = fn(*inputs)
        found = iter(torch.autograd.grad(out, wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(found) if t.requires_grad else None for t in inputs)


def recompute_active(recompute: bool) -> bool:
    """Whether a forward should keep only its inputs for backward and run again there: ``recompute``, in
    training (grad mode on), and not under ``torch.compile`` (a backward that calls ``autograd.grad`` would break
    the graph; the compiler plans the memory of a compiled step itself)."""
    return recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def recompute_in_backward(fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """``fn(*inputs)`` (one tensor out) whose autograd graph keeps only ``inputs``: backward runs ``fn`` again with
    autograd on and differentiates that run, so none of ``fn``'s intermediates (score blocks, per-chunk states)
    are held between forward and backward; the cost is one more forward of ``fn``. ``fn`` must be deterministic
    (a pure function of its inputs and of constants it closes over). Second derivatives differentiate a plain
    re-computation (``double_backward_by_recompute``)."""
    return _RecomputeInBackward.apply(fn, *inputs)


class _RecomputeInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)  # grad mode is off inside forward: nothing of fn's is kept

    @staticmethod
    def backward(ctx, grad: Tensor):
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return (None, *double_backward_by_recompute(ctx.fn, inputs, (grad,)))
        wanted = ctx.needs_input_grad[1:]
        leaves = [t.detach().requires_grad_(w) for t, w in zip(inputs, wanted)]
        with torch.enable_grad():
            out = ctx.fn(*leaves)
        found = iter(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad, allow_unused=True))
        return (None, *(next(found) if t.requires_grad else None for t in leaves))
