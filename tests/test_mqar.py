"""MQAR: the generator follows zoology's semantics, splits are seeded and disjoint, loss and accuracy
count only query positions, the state size is measured right, and the quick comparison separates
softmax from linear attention with statistics (the `experiment=mqar/quick` multirun, ~1 min)."""

import os
import subprocess
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from efficient_attn.transformer import AttentionSpec, TransformerConfig, TransformerLM, decode_state_size
from efficient_attn_tasks.commands.report import main as report_main
from efficient_attn_tasks.run.record import RunRecord
from efficient_attn_tasks.tasks import mqar
from tests.helpers import config

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = mqar.Config(vocab_size=64, seq_len=32, num_kv_pairs=4, train_size=200, val_size=50, test_size=50)


def test_sequences_bind_each_queried_key_to_its_value():
    data = mqar.generate(CFG, 300, seed=1)
    tokens, targets = data["tokens"], data["targets"]  # (n, L)
    kv, half = CFG.num_kv_pairs, CFG.vocab_size // 2
    keys, values = tokens[:, 0 : 2 * kv : 2], tokens[:, 1 : 2 * kv : 2]  # (n, kv)
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < CFG.vocab_size)).all()
    assert all(len(set(row)) == kv for row in keys.tolist()) and all(len(set(row)) == kv for row in values.tolist())
    assert (targets[:, : 2 * kv] == mqar.IGNORE).all()  # no loss inside the context
    for row in range(len(tokens)):
        where = (targets[row] != mqar.IGNORE).nonzero().flatten()
        assert len(where) == kv and ((where - 2 * kv) % 2 == 0).all()  # kv queries, at even offsets
        asked = tokens[row, where]
        assert sorted(asked.tolist()) == sorted(keys[row].tolist())  # every key queried once
        bound = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert targets[row, where].tolist() == [bound[k] for k in asked.tolist()]
        filler = torch.ones(CFG.seq_len, dtype=torch.bool)
        filler[: 2 * kv], filler[where] = False, False
        assert (tokens[row, filler] == 0).all()  # random_non_queries=false: token 0


def test_random_filler_changes_only_the_filler():
    plain = mqar.generate(CFG, 100, seed=3)
    noisy = mqar.generate(replace(CFG, random_non_queries=True), 100, seed=3)
    filler = plain["tokens"] == 0
    assert torch.equal(plain["targets"], noisy["targets"])
    assert torch.equal(plain["tokens"][~filler], noisy["tokens"][~filler])
    assert (noisy["tokens"][filler] != 0).float().mean() > 0.9


@pytest.mark.parametrize("power_a", [0.01, 1.0])
def test_query_gaps_follow_the_power_law(power_a):
    cfg = replace(CFG, num_kv_pairs=1, power_a=power_a)
    targets = mqar.generate(cfg, 20000, seed=0)["targets"]  # one query per row
    gaps = ((targets != mqar.IGNORE).nonzero()[:, 1] - 2) // 2  # slot index after the 2-token context
    space = (cfg.seq_len - 2) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    p = p / p.sum()
    freq = torch.bincount(gaps, minlength=space).double() / len(gaps)
    assert (freq - p).abs().max() < 0.015, (freq[:4], p[:4])


def test_splits_are_seeded_disjoint_and_independent_of_the_run_seed():
    a, _ = mqar.make_splits(CFG)
    b, _ = mqar.make_splits(CFG)
    assert all(torch.equal(a[s]["tokens"], b[s]["tokens"]) for s in mqar.SPLITS)
    assert not torch.equal(a["val"]["tokens"][:10], a["test"]["tokens"][:10])
    other, _ = mqar.make_splits(replace(CFG, data_seed=7))
    assert not torch.equal(a["train"]["tokens"], other["train"]["tokens"])
    # a tiny vocabulary makes contexts repeat: val/test lose exactly the ones seen in training
    tiny = replace(CFG, vocab_size=8, num_kv_pairs=2, seq_len=8, train_size=100, val_size=100, test_size=100)
    splits, dropped = mqar.make_splits(tiny)
    seen = {tuple(r) for r in splits["train"]["tokens"][:, :4].tolist()}
    assert dropped["val"] > 0 and dropped["test"] > 0
    for name in ("val", "test"):
        assert len(splits[name]["tokens"]) == 100 - dropped[name]
        assert not seen & {tuple(r) for r in splits[name]["tokens"][:, :4].tolist()}


def test_config_rejects_impossible_cells():
    with pytest.raises(ValueError, match="even"):
        replace(CFG, seq_len=33)
    with pytest.raises(ValueError, match="4·num_kv_pairs"):
        replace(CFG, num_kv_pairs=9)
    with pytest.raises(ValueError, match="distinct keys"):
        replace(CFG, vocab_size=6, num_kv_pairs=3, seq_len=16)


def module(*overrides: str) -> mqar.MQARModule:
    cfg = config("experiment=mqar/cpu", "task.vocab_size=64", "task.seq_len=32", "model.d_model=16", *overrides)
    return mqar.MQARModule(cfg)


def test_loss_and_accuracy_count_query_positions_only():
    m = module()
    batch = mqar.generate(m.task, 8, seed=0)
    asked = batch["targets"] != mqar.IGNORE
    logits = torch.randn(8, m.task.seq_len, m.task.vocab_size, dtype=torch.float64)
    right = batch["targets"].clamp_min(0)
    logits[asked] += 100 * F.one_hot(right[asked], m.task.vocab_size)  # right at every query
    logits[~asked] += 100 * F.one_hot((right[~asked] + 1) % m.task.vocab_size, m.task.vocab_size)  # wrong elsewhere
    m.forward = lambda b: logits
    loss, acc, count = m.scores(batch)
    assert acc == 1.0 and count == int(asked.sum())
    torch.testing.assert_close(loss, F.cross_entropy(logits[asked], batch["targets"][asked]), rtol=0, atol=1e-12)
    row, col = asked.nonzero()[0].tolist()
    logits[row, col] = 0.0  # one query wrong (a tie: argmax = token 0, never a value)
    assert m.scores(batch)[1] == (count - 1) / count


@pytest.mark.parametrize("name, kwargs, expected", [
    ("softmax", {}, lambda L, H, D, d: 2 * L * d),  # the KV cache grows with L
    ("linear", {}, lambda L, H, D, d: H * D * (D + 1)),  # Σ φ(k)[v, 1]ᵀ, whatever L
    ("favor", {"num_features": 16}, lambda L, H, D, d: H * 16 * (D + 1) + H),  # + the running log-scale
])
def test_decode_state_size_is_what_one_layer_keeps(name, kwargs, expected):
    cfg = TransformerConfig(d_model=32, num_heads=2, d_ff=16, encoder_layers=0, decoder_layers=2, max_len=64)
    model = TransformerLM(cfg, 20, attention=AttentionSpec(name, kwargs)).eval()
    for length in (8, 24):
        assert decode_state_size(model, length) == expected(length, 2, 16, 32)


@pytest.mark.slow
def test_quick_comparison_separates_softmax_from_linear(tmp_path, capsys):
    """The documented quick run: 2 attentions × 3 seeds in parallel, then the paired report."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = ["efficient-attn-train", "-m", "experiment=mqar/quick", f"hydra.sweep.dir={tmp_path}"]
    # ~2.5 min on 2 free cores (results/README.md); the limit leaves room for a loaded machine
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [RunRecord.read(p) for p in tmp_path.glob("*/results.json")]
    acc = {(r.attention, r.seed): r.metrics.test["test/acc"] for r in records}
    assert sorted(acc) == [(a, s) for a in ("linear", "softmax") for s in (0, 1, 2)]
    assert min(acc["softmax", s] for s in range(3)) > 0.9, acc  # softmax recalls
    assert max(acc["linear", s] for s in range(3)) < 0.5, acc  # elu+1 linear attention does not
    report_main([str(tmp_path), "--rows", "attention", "--tune", "config.optim.lr", "--ci", "--paired", "softmax",
                 "--metrics", "test/acc,test/state_size", "--out", str(tmp_path / "table")])
    table = capsys.readouterr().out
    linear = next(line for line in table.splitlines() if line.startswith("| linear"))
    assert " * |" in linear  # the paired difference is significant (p < 0.05)
    assert "4,160" in linear and "8,192" in table  # H·D·(D+1) against 2·L·d
    again = subprocess.run([*cmd, "ckpt_path=last"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 6  # the grid resumes: finished jobs are not run again
