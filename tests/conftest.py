import re
from pathlib import Path

import pytest
import torch

import efficient_attn as ea
from efficient_attn.attention.base import unsupported_use
from efficient_attn.transformer import SITE_USE, AttentionSpec

# the read-only data beside the repo (tests/helpers.py has it too; not imported here: it loads Lightning)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_qkv(b=2, h=2, length=12, s=None, d=8, dv=None, dtype=torch.float64, scale=1.0):
    """Random heads-first q (B,H,L,D), k (B,H,S,D), v (B,H,S,Dv)."""
    s = length if s is None else s
    dv = d if dv is None else dv
    q = torch.randn(b, h, length, d, dtype=dtype) * scale
    k = torch.randn(b, h, s, d, dtype=dtype) * scale
    v = torch.randn(b, h, s, dv, dtype=dtype)
    return q, k, v


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """W&B off with every W&B dir in a temp dir; a temp cache; the shared data dir when it exists."""
    patch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("env")
    patch.setenv("WANDB_MODE", "disabled")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        patch.setenv(var, str(root / var.lower()))
    patch.setenv("EFFICIENT_ATTN_CACHE", str(root / "cache"))
    if SHARED_DATA.exists():
        patch.setenv("EFFICIENT_ATTN_DATA", str(SHARED_DATA))
    yield
    patch.undo()


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
