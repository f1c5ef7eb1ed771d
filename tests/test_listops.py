"""ListOps: generator against the LRA spec, cached data module, and a 30-step smoke training."""

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import efficient_attn as ea
from efficient_attn_tasks.tasks.listops import (
    OPERATORS,
    PAD_ID,
    VOCAB,
    Config,
    ListOpsData,
    build,
    evaluate,
    generate_listops,
)
from tests.helpers import LossLog, skip_unsupported

SMALL = dict(min_length=10, max_length=40, max_depth=6, max_args=5)


def shape(tokens):
    """(nesting depth of operators, largest argument count) of a well-formed expression."""
    depth = deepest = widest = 0
    counts = []
    for token in tokens:
        if counts and token != "]":
            counts[-1] += 1
        if token in OPERATORS:
            depth, deepest = depth + 1, max(deepest, depth + 1)
            counts.append(0)
        elif token == "]":
            depth -= 1
            widest = max(widest, counts.pop())
    return deepest, widest


@pytest.fixture(scope="module")
def samples():
    return generate_listops(300, seed=0, **SMALL)


def test_generator_follows_spec(samples):
    assert len(samples) == 300
    for tokens, label in samples:
        assert label == evaluate(tokens)
        assert SMALL["min_length"] < len(tokens) < SMALL["max_length"]
        assert tokens[0] in OPERATORS and set(tokens) <= set(VOCAB[2:])
        depth, width = shape(tokens)
        assert depth <= SMALL["max_depth"] - 1  # root at depth 1, digits at depth <= max_depth
        assert 1 <= width <= SMALL["max_args"]
    assert {t for tokens, _ in samples for t in tokens} >= set(OPERATORS)
    assert len({" ".join(tokens) for tokens, _ in samples}) == 300  # distinct, as LRA's


def test_generator_lra_lengths():
    data = generate_listops(20, seed=1, min_length=500, max_length=2000)
    assert all(500 < len(tokens) < 2000 and label == evaluate(tokens) for tokens, label in data)


def test_generator_is_seeded(samples):
    assert generate_listops(300, seed=0, **SMALL) == samples
    assert generate_listops(300, seed=1, **SMALL) != samples


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_length=0, max_length=3), "max_length=3"),
        (dict(min_length=40, max_length=40), "min_length=40"),
        (dict(min_length=50, max_length=40), "min_length=50"),
        (dict(min_length=100, max_length=400, max_depth=3, max_args=3), "longest expression"),
        (dict(min_length=0, max_length=10, max_depth=1), "max_depth=1"),
        (dict(min_length=0, max_length=10, max_args=0), "max_args=0"),
    ],
)
def test_impossible_requests_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_listops(4, seed=0, **kwargs)


def test_rejection_is_capped():
    # one operator with two digits: only 4 x 10 x 10 distinct expressions exist, so 401 cannot be found
    with pytest.raises(ValueError, match="found only 400 of 401"):
        generate_listops(401, seed=0, min_length=2, max_length=6, max_depth=2, max_args=2)


@pytest.mark.parametrize(
    "text, value",
    [
        ("[MED 1 5 3 ]", 3),
        ("[SM 5 7 ]", 2),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MED 1 4 ]", 2),  # even count: floor of the mean of the middle two (LRA's int(np.median))
        ("[MED 9 2 7 4 ]", 5),
        ("[MIN [SM 9 9 ] [MED 3 ] ]", 3),
        ("7", 7),
    ],
)
def test_known_expressions(text, value):
    assert evaluate(text.split()) == value


@pytest.mark.parametrize("text", ["[MAX 1", "[MAX ]", "1 2", "[MAX 1 ] ]", "[FOO 1 ]", ""])
def test_evaluate_rejects_malformed(text):
    with pytest.raises(ValueError):
        evaluate(text.split())


def tiny_task(**overrides):
    base = dict(name="listops", train_size=64, val_size=16, test_size=16, data_seed=7, batch_size=8,
                pooling="mean", num_workers=0, **SMALL)
    return {**base, **overrides}


def test_data_module_batches_and_cache(tmp_path):
    data = ListOpsData(Config(**tiny_task()), cache_dir=tmp_path, seed=0)
    data.prepare_data()
    assert data.path.exists() and data.path.parent == tmp_path / "listops"
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    tokens, mask, label = batch["tokens"], batch["padding_mask"], batch["label"]
    assert tokens.dtype == torch.long and mask.dtype == torch.bool and label.shape == (8,)
    assert tokens.shape == mask.shape and tokens.shape[0] == 8
    assert not mask[:, 0].any() and (~mask).sum(1).max() == tokens.shape[1]  # padded to the longest
    assert (tokens[mask] == PAD_ID).all() and (tokens[~mask] != PAD_ID).all()
    for row, keep, y in zip(tokens, ~mask, label):
        assert evaluate([VOCAB[i] for i in row[keep]]) == y
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [64, 16, 16]

    before = data.path.stat().st_mtime_ns
    again = ListOpsData(Config(**tiny_task()), cache_dir=tmp_path, seed=0)
    again.prepare_data()
    again.setup("fit")
    assert data.path.stat().st_mtime_ns == before  # loaded, not regenerated
    for split in ("train", "val", "test"):
        a, b = data.splits[split], again.splits[split]
        assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(len(a)))


def test_splits_differ_and_cls_prepended(tmp_path):
    data = ListOpsData(Config(**tiny_task(pooling="cls")), cache_dir=tmp_path)
    data.setup()
    firsts = {split: data.splits[split][0][0] for split in ("train", "val", "test")}
    assert all(ids[0] == VOCAB.index("<cls>") and ids[1] != VOCAB.index("<cls>") for ids in firsts.values())
    seqs = {split: {tuple(data.splits[split][i][0].tolist()) for i in range(16)} for split in firsts}
    assert not (seqs["train"] & seqs["val"]) and not (seqs["val"] & seqs["test"])
    other = ListOpsData(Config(**tiny_task(data_seed=8)), cache_dir=tmp_path)
    assert other.path != data.path  # the cache file is per generator parameters


def run_config(tmp_path, attention, **task):
    return OmegaConf.create({
        "task": tiny_task(**task),
        "model": dict(d_model=64, num_heads=4, head_dim=None, d_ff=128, encoder_layers=2, decoder_layers=2,
                      dropout=0.0, activation="relu", norm_first=True, positional="sinusoidal", max_len=512,
                      tie_embeddings=True, encoder_attention=None, decoder_attention=None, cross_attention=None),
        "attention": attention,
        "optim": dict(lr=2e-3, weight_decay=0.0, betas=[0.9, 0.98], warmup_steps=0, schedule="constant"),
        "seed": 0, "data_dir": None, "cache_dir": str(tmp_path),
    })


def test_build_checks_max_len(tmp_path):
    cfg = run_config(tmp_path, {"name": "softmax", "kwargs": {}}, min_length=10, max_length=514)  # max_len 512
    with pytest.raises(ValueError, match="raise model.max_len"):
        build(cfg)
    cfg.task.max_length = 513  # longest sequence: 512 tokens
    build(cfg)
    cfg.task.pooling = "cls"  # 512 + <cls>
    with pytest.raises(ValueError, match="raise model.max_len"):
        build(cfg)


@pytest.mark.parametrize("name", ea.list_attentions())
def test_loss_falls(tmp_path, one_thread, name):
    kwargs = {"num_features": 16} if name == "favor" else {}
    skip_unsupported(name, lambda: build(run_config(tmp_path, {"name": name, "kwargs": kwargs})))  # an encoder
    data, module = build(run_config(tmp_path, {"name": name, "kwargs": kwargs}))
    assert module.monitor == "val/acc" and module.monitor_mode == "max"
    log = LossLog()
    trainer = pl.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[log])
    trainer.fit(module, datamodule=data)
    assert len(log.losses) == 30
    assert sum(log.losses[-5:]) / 5 < sum(log.losses[:5]) / 5, log.losses


def test_validate_and_test_log_accuracy(tmp_path, one_thread):
    data, module = build(run_config(tmp_path, {"name": "softmax", "kwargs": {}}))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (val,) = trainer.validate(module, datamodule=data, verbose=False)
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    assert set(val) == {"val/loss", "val/acc"} and set(test) == {"test/loss", "test/acc"}
    assert 0.0 <= val["val/acc"] <= 1.0
    batch = next(iter(data.train_dataloader()))
    assert module.batch_tokens(batch) == int((~batch["padding_mask"]).sum())
