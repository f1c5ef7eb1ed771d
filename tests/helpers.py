"""What several test files share: the tiny task configs and how to compose them, random inputs for the
attention tests, checks that more than one attention's tests make, and a fresh interpreter for import checks.

Light to import: Hydra and Lightning load only when a config is composed or ``LossLog`` is used, so the
core attention tests run without the app's dependencies.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pytest
import torch
from torch import Tensor

import efficient_attn as ea
from efficient_attn.attention.base import unsupported_use
from efficient_attn.transformer import SITE_USE, AttentionSpec

if TYPE_CHECKING:
    from omegaconf import DictConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # read-only data beside the repo
REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- tiny configs of the app

# Each task small enough that a few training steps take seconds on one thread (used with model=tiny).
TINY_TRANSLATION = ["task.source=synthetic", "task.synthetic_sizes=[64,16,16]", "task.vocab_size=40",
                    "task.batch_size=16"]
TINY_LISTOPS = ["task.train_size=64", "task.val_size=16", "task.test_size=16", "task.min_length=10",
                "task.max_length=40", "task.batch_size=16"]
TINY_LM = ["task.context_length=32", "task.batch_size=4", "task.train_batches_per_epoch=4", "task.eval_batches=2"]
TINY_MQAR = ["task.vocab_size=32", "task.seq_len=16", "task.num_kv_pairs=2", "task.train_size=32", "task.val_size=16",
             "task.test_size=16", "task.batch_size=16"]
TINY = {"translation": TINY_TRANSLATION, "listops": TINY_LISTOPS, "lm": TINY_LM, "mqar": TINY_MQAR}
QUIET = ["trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]


def config(*overrides: str) -> DictConfig:
    """The app's ``train`` config composed with these Hydra overrides (not checked)."""
    from hydra import compose, initialize_config_dir

    from efficient_attn_tasks.config.checks import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny_overrides(task: str, *overrides: str) -> list[str]:
    """Overrides of a tiny, quiet run of ``task`` (model=tiny, no logger), then ``overrides``."""
    return [f"task={task}", "model=tiny", "logger=none", *TINY[task], *QUIET, *overrides]


def tiny_cfg(task: str, attention: str, *overrides: str) -> DictConfig:
    """The composed config of a tiny, quiet run of ``task`` with configs/attention/<attention>.yaml."""
    return config(*tiny_overrides(task, f"attention={attention}", *overrides))


def config_files(group: str) -> list[str]:
    """The config names of one Hydra group (configs/<group>/*.yaml)."""
    from efficient_attn_tasks.config.checks import CONFIG_DIR

    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a new Python interpreter in the repo (one thread, this checkout importable): what it
    imports is all that is loaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def __getattr__(name: str) -> Any:
    """``LossLog`` subclasses a Lightning callback: built on first use, so that importing this module
    leaves Lightning unloaded."""
    if name != "LossLog":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import pytorch_lightning as pl

    class LossLog(pl.Callback):
        """Records the training loss of every step."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

        def fell(self, k: int = 5) -> bool:
            """Mean of the last k losses below the mean of the first k."""
            return sum(self.losses[-k:]) < sum(self.losses[:k])

    LossLog.__qualname__ = "LossLog"
    globals()["LossLog"] = LossLog
    return LossLog


# ----------------------------------------------------------------------------- attention inputs and checks


def make_qkv(b=2, h=2, length=12, s=None, d=8, dv=None, dtype=torch.float64, scale=1.0):
    """Random heads-first q (B,H,L,D), k (B,H,S,D), v (B,H,S,Dv)."""
    s = length if s is None else s
    dv = d if dv is None else dv
    q = torch.randn(b, h, length, d, dtype=dtype) * scale
    k = torch.randn(b, h, s, d, dtype=dtype) * scale
    v = torch.randn(b, h, s, dv, dtype=dtype)
    return q, k, v


def decode_sequence(attn, q, k, v):
    """Run ``attn.decode_step`` over every position of q, k, v (B, H, L, ·); outputs (B, H, L, Dv)."""
    state, rows = None, []
    for t in range(q.shape[2]):
        out, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        rows.append(out)
    return torch.cat(rows, dim=2)


def assert_same_grads(got, want, inputs, params=(), *, rtol=1e-9, atol=1e-11) -> None:
    """``got()`` and ``want()`` (same-shape outputs) have the same gradients, with respect to the
    ``inputs`` (leaf tensors) and ``params``, of one random weighting of their entries."""
    weights = None

    def grads(fn):
        nonlocal weights
        leaves = [*inputs, *params]
        for t in leaves:
            t.grad = None
        out = fn()
        weights = torch.randn_like(out) if weights is None else weights
        (out * weights).sum().backward()
        return [t.grad.clone() for t in leaves]

    for g, w in zip(grads(got), grads(want), strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def assert_reset_random_is_seeded(attn, draw) -> None:
    """``attn.reset_random(seed)`` redraws ``draw(attn)`` from the seed alone (same seed, same
    tensor; another seed, another), and leaves torch's global RNG where it was."""
    state = torch.get_rng_state()
    attn.reset_random(7)
    first = draw(attn).detach().clone()
    attn.reset_random(7)
    assert torch.equal(draw(attn), first) and torch.equal(torch.get_rng_state(), state)
    attn.reset_random(8)
    assert not torch.equal(draw(attn), first)


def assert_causal_rows_ignore_the_future(attn, q: Tensor, k: Tensor, v: Tensor, times: Sequence[int], *,
                                         exact: bool = True) -> None:
    """Adding large noise to q, k and v after position t leaves the causal output's rows ≤ t as they were
    (bit for bit when ``exact``, else to 1e-12) and changes the later rows, for each t in ``times``."""
    out = attn(q, k, v, causal=True)
    for t in times:
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] += 10 * torch.randn_like(x[:, :, t + 1 :])
        out2 = attn(q2, k2, v2, causal=True)
        if exact:
            assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1]), t
        else:
            torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out2[:, :, t + 1 :], out[:, :, t + 1 :]), t  # the future does matter


def assert_poisoned_padding_changes_nothing(attn, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *,
                                            causal: bool) -> Tensor:
    """Padded keys and values holding ±inf, NaN or ±1e300 give the output and the q, k, v gradients that
    zeros there give, bit for bit, and no gradient reaches a padded key or value. Returns the output."""

    def run(fill_k: float, fill_v: float) -> tuple[Tensor, ...]:
        kk = k.masked_fill(mask[:, None, :, None], fill_k).requires_grad_()
        vv = v.masked_fill(mask[:, None, :, None], fill_v).requires_grad_()
        qq = q.clone().requires_grad_()
        out = attn(qq, kk, vv, key_padding_mask=mask, causal=causal)
        out.square().sum().backward()
        return out, qq.grad, kk.grad, vv.grad

    clean = run(0.0, 0.0)
    for fills in ((float("inf"), float("nan")), (float("nan"), float("-inf")), (1e300, -1e300)):
        for a, b in zip(run(*fills), clean, strict=True):
            assert torch.equal(a, b), fills
    out, _, grad_k, grad_v = clean
    assert (grad_k[mask[:, None, :, None].expand_as(grad_k)] == 0).all()
    assert (grad_v[mask[:, None, :, None].expand_as(grad_v)] == 0).all()
    return out


def assert_bf16_close_to_float64(attn, reference: Callable[..., Tensor], qk_scale: float, causal: bool) -> None:
    """bf16 ``attn`` (head_dim 64) on bf16 inputs, q and k at ``qk_scale``× unit norms, one row padded,
    against ``reference(module, q, k, v, mask, causal)`` in float64 on the same rounded inputs and weights:
    the output is bf16 and finite, its error at most 2^-8·max|v|."""
    q, k, v = (torch.randn(2, 2, 96, 64) * s for s in (qk_scale, qk_scale, 1.0))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[1, 70:] = True
    out = attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    exact = copy.deepcopy(attn).double()
    want = reference(exact, q.double(), k.double(), v.double(), mask, causal)
    err = (out.double() - want).abs().max() / v.abs().max().double()
    assert err <= 2**-8, err.item()


def skip_unsupported(name: str, call, *, causal: bool = False, cross: bool = False) -> None:
    """If attention ``name`` cannot run this way (its ``supports_*`` flags: causal-only, self-attention
    only), ``call()`` must raise its clear error, and the test stops there, skipped with that reason."""
    problem = unsupported_use(ea.get_attention_class(name), causal=causal, cross=cross)
    if problem is not None:
        with pytest.raises(ValueError, match=re.escape(problem)):
            call()
        pytest.skip(problem)


def site_specs(spec: AttentionSpec, sites=("encoder", "decoder", "cross")) -> dict[str, AttentionSpec]:
    """{site: spec} for a model's sites: ``spec`` where its attention can serve (``SITE_USE``), softmax
    elsewhere (a causal-only variant is no encoder; a self-attention-only one no cross-attention)."""
    cls = ea.get_attention_class(spec.name)
    return {site: spec if unsupported_use(cls, **SITE_USE[site]) is None else AttentionSpec() for site in sites}
