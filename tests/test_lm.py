"""Byte-level LM task: windows and splits, determinism, data errors, and a 30-step smoke training."""

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from efficient_attn_tasks.tasks.data import DataError
from efficient_attn_tasks.tasks.lm import ByteLMData, Config, build
from tests.helpers import SHARED_DATA, LossLog

DATA = SHARED_DATA
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is not there")

TINY_MODEL = dict(
    d_model=64, num_heads=4, head_dim=None, d_ff=128, encoder_layers=2, decoder_layers=2, dropout=0.0,
    activation="relu", norm_first=True, positional="sinusoidal", max_len=512, tie_embeddings=True,
    encoder_attention=None, decoder_attention=None, cross_attention=None,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def text_file(tmp_path: Path, size: int = 20_000) -> Path:
    """A small repetitive UTF-8 text of ``size`` bytes (with multi-byte characters) in tmp_path."""
    line = "to be, or not to be: that is the question — ¿qué? 名前\n".encode()
    padding = size % len(line)
    path = tmp_path / "text.txt"
    path.write_bytes(line * (size // len(line)) + b"." * padding)
    return path


def full_config(attention="softmax", kwargs=None, **task):
    task = {"dataset": "file", "context_length": 64, "batch_size": 8, "train_batches_per_epoch": 30, **task}
    return OmegaConf.create({
        "task": task,
        "model": TINY_MODEL,
        "attention": {"name": attention, "kwargs": kwargs or {}},
        "optim": {"lr": 3e-3, "weight_decay": 0.01, "betas": [0.9, 0.98], "warmup_steps": 5, "schedule": "constant"},
        "seed": 0, "data_dir": str(DATA), "cache_dir": None,
    })


def data_module(seed: int = 0, **task) -> ByteLMData:
    dm = ByteLMData(Config(**task), data_dir=DATA, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def first_batch(loader):
    return next(iter(loader))


def test_windows_are_shifted_and_eval_windows_tile_their_split(tmp_path):
    dm = data_module(dataset="file", path=str(text_file(tmp_path)), context_length=32, batch_size=4)
    train = first_batch(dm.train_dataloader())
    assert train["tokens"].shape == train["targets"].shape == (4, 32)
    assert train["tokens"].dtype == torch.long
    assert torch.equal(train["tokens"][:, 1:], train["targets"][:, :-1])
    for split in ("val", "test"):
        data = dm.splits[split]
        loader = getattr(dm, f"{split}_dataloader")()
        targets = torch.cat([b["targets"].reshape(-1) for b in loader])  # (N,)
        tokens = torch.cat([b["tokens"].reshape(-1) for b in loader])
        count = (len(data) - 1) // 32 * 32
        assert torch.equal(tokens, data[:count].long())  # contiguous, non-overlapping, in order
        assert torch.equal(targets, data[1 : count + 1].long())  # each byte predicted once


def test_splits_partition_the_text(tmp_path):
    path = text_file(tmp_path)
    dm = data_module(dataset="file", path=str(path), context_length=16, split=[0.8, 0.1])
    raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    lengths = [len(dm.splits[s]) for s in ("train", "val", "test")]
    assert len(raw) == 20_000 and lengths == [16_000, 2_000, 2_000]
    assert torch.equal(torch.cat([dm.splits[s] for s in ("train", "val", "test")]), raw)
    # training windows stay inside the training bytes
    starts = list(dm.train_dataloader().sampler)
    assert max(starts) + 16 + 1 <= lengths[0]


def test_eval_batches_caps_val_and_test(tmp_path):
    dm = data_module(dataset="file", path=str(text_file(tmp_path)), context_length=16, batch_size=4, eval_batches=3)
    assert len(dm.val_dataloader()) == len(dm.test_dataloader()) == 3


@needs_shakespeare
def test_same_seed_same_first_batch_and_epochs_differ():
    def first_batches(seed, epochs=1):  # each pass over the loader is the next epoch
        dm = ByteLMData(Config(context_length=32, batch_size=4), data_dir=DATA, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [first_batch(loader)["tokens"] for _ in range(epochs)]

    assert torch.equal(first_batches(0)[0], first_batches(0)[0])
    assert not torch.equal(first_batches(0)[0], first_batches(1)[0])
    epoch0, epoch1 = first_batches(0, epochs=2)
    assert not torch.equal(epoch0, epoch1)


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt"):
        data_module(dataset="file", path=str(missing))


def test_non_utf8_file_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1") * 1000)
    with pytest.raises(DataError, match="UTF-8"):
        data_module(dataset="file", path=str(path))


def test_bad_configs_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="tinyshakespeare.*enwik8.*file"):
        Config(dataset="wikitext")
    with pytest.raises(ValueError, match="task.path"):
        Config(dataset="file")
    with pytest.raises(ValueError, match="shorten task.context_length"):
        data_module(dataset="file", path=str(text_file(tmp_path, size=2_000)), context_length=500)
    with pytest.raises(ValueError, match="raise model.max_len"):
        build(full_config(path=str(text_file(tmp_path)), context_length=1024))


def init_bpc(cfg) -> float:
    pl.seed_everything(0)
    dm, module = build(cfg)
    dm.setup("fit")
    with torch.no_grad():
        return module.loss(first_batch(dm.val_dataloader())).item() / math.log(2)


def test_bpc_at_init_is_about_eight_bits(tmp_path):
    """Near-uniform predictions over 256 bytes cost log2(256) = 8 bits. Untied output: logits of
    std ~0.6 add ~0.25 bit. (Tied embeddings start higher, ~9.9 bits: the input byte's own logit
    is large, so the fresh model over-predicts a repeat.)"""
    cfg = full_config(path=str(text_file(tmp_path)))
    cfg.model.tie_embeddings = False
    assert abs(init_bpc(cfg) - 8.0) < 0.5
    assert 8.0 < init_bpc(full_config(path=str(text_file(tmp_path)))) < 11.0


@needs_shakespeare
@pytest.mark.parametrize("attention,kwargs", [("softmax", {}), ("favor", {"num_features": 16}), ("linear", {})])
def test_training_loss_falls(attention, kwargs):
    pl.seed_everything(0)
    cfg = full_config(attention, kwargs, dataset="tinyshakespeare")
    dm, module = build(cfg)
    history = LossLog()
    trainer = pl.Trainer(
        max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, enable_model_summary=False, callbacks=[history],
    )
    trainer.fit(module, datamodule=dm)
    assert len(history.losses) == 30
    assert sum(history.losses[-5:]) / 5 < sum(history.losses[:5]) / 5


def test_eval_loss_is_token_weighted_over_a_short_last_batch(tmp_path):
    """val split of 2,000 bytes / 64-token windows = 31 windows: batches of 8, 8, 8, 7."""
    pl.seed_everything(0)
    dm, module = build(full_config(path=str(text_file(tmp_path)), split=[0.8, 0.1]))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    result = trainer.validate(module, datamodule=dm, verbose=False)[0]
    batches = list(dm.val_dataloader())
    assert [len(b["tokens"]) for b in batches] == [8, 8, 8, 7]
    with torch.no_grad():
        total = sum(module.loss(b).item() * b["targets"].numel() for b in batches)
    expected = total / sum(b["targets"].numel() for b in batches)
    assert result["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert result["val/bpc"] == pytest.approx(expected / math.log(2), rel=1e-5)
    assert module.monitor == "val/bpc" and module.monitor_mode == "min"


@needs_shakespeare
def test_fit_and_test_log_every_metric():
    pl.seed_everything(0)
    dm, module = build(full_config(dataset="tinyshakespeare", eval_batches=2, train_batches_per_epoch=2))
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert {"train/loss", "train/bpc", "val/loss", "val/bpc"} <= set(trainer.callback_metrics)
    result = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert result["test/bpc"] == pytest.approx(result["test/loss"] / math.log(2), rel=1e-5)
