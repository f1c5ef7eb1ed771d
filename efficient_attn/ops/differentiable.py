"""Exact second derivatives for the hand-written autograd Functions of the core.

The fast backward passes (chunked causal products, additive scores, positive features) work in
place and under ``no_grad``, so autograd cannot differentiate them again. When a second derivative
is asked for (``torch.autograd.grad(..., create_graph=True)``, e.g. a gradient penalty), grad mode
is on inside ``backward``; the Function then calls :func:`double_backward_by_recompute`, which
re-runs a plain autograd version of the same forward and differentiates that with
``create_graph=True``. First derivatives keep the fast path; second derivatives are exact, never
silently dropped (``tests/test_double_backward.py`` runs ``gradgradcheck`` on each Function).
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
