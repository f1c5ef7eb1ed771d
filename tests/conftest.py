"""Fixtures of every test: a fixed seed, an isolated environment (no W&B, temp caches), one thread on request; a tiny
trained softmax run for the conversion tests."""

import pytest
import torch

pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import SHARED_DATA  # noqa: E402  (after the rewrite hook: its asserts report their values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory):
    """The run dir of a tiny MQAR softmax run (6 steps), trained once per module on one thread."""
    from efficient_attn_tasks.run.fit import run
    from tests.helpers import config, tiny_overrides

    out = tmp_path_factory.mktemp("runs") / "softmax"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(config(*tiny_overrides("mqar", "attention=softmax", "trainer.max_steps=6")), out)
    finally:
        torch.set_num_threads(threads)
    return out
