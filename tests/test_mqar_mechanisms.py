"""Where MQAR answers come from (per-pair accuracy, in-context rate), how far a window reaches, and how far a
trained attention's rows are from softmax's: each checked on inputs whose right answer is known."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from efficient_attn import create_attention
from efficient_attn.analysis.rows import attention_rows, rows_against_softmax, softmax_rows, visible_keys
from efficient_attn.attention.kernel import KernelAttention
from efficient_attn_tasks.tasks import mqar
from tests.helpers import config

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = mqar.Config(vocab_size=64, seq_len=32, num_kv_pairs=4, train_size=200, val_size=50, test_size=50)


def last_pair_answers(tokens: torch.Tensor, kv: int) -> torch.Tensor:
    """(n, L): every position answers the value of the most recent pair."""
    return tokens[:, 2 * kv - 1 : 2 * kv].expand_as(tokens)


def test_query_pairs_follow_the_key_not_the_query_order():
    # L = 16, kv = 3: keys 1 2 3 with values 11 12 13; queries at 6, 8, 12 ask keys 3, 1, 2
    tokens = torch.tensor([[1, 11, 2, 12, 3, 13, 3, 0, 1, 0, 0, 0, 2, 0, 0, 0]])
    targets = torch.full_like(tokens, mqar.IGNORE)
    targets[0, [6, 8, 12]] = torch.tensor([13, 11, 12])
    asked, pair = mqar.query_pairs(tokens, targets, 3)
    assert asked[0].nonzero().flatten().tolist() == [6, 8, 12]
    assert pair[0, [6, 8, 12]].tolist() == [2, 0, 1] and (pair[~asked] == -1).all()
    assert mqar.key_distances(tokens, targets, 3).tolist() == [6 - 4, 8 - 0, 12 - 2]
    predicted = torch.tensor([[0, 0, 0, 0, 0, 0, 13, 0, 12, 0, 0, 0, 7, 0, 0, 0]])  # right, wrong in context, out
    scores = {k: (float(v), n) for k, v, n in ((k, *v) for k, v in
                                                mqar.recall_scores(tokens, targets, predicted, 3).items())}
    assert scores == {"in_context": (2 / 3, 3), "acc_pair0": (0.0, 1), "acc_pair1": (0.0, 1), "acc_pair2": (1.0, 1)}


@pytest.mark.parametrize("answer, expected_pairs, in_context", [
    ("targets", [1.0, 1.0, 1.0, 1.0], 1.0),  # a perfect model
    ("last", [0.0, 0.0, 0.0, 1.0], 1.0),  # always the most recent pair's value
    ("zero", [0.0, 0.0, 0.0, 0.0], 0.0),  # never a value
])
def test_recall_scores_of_known_answers(answer, expected_pairs, in_context):
    data = mqar.generate(CFG, 200, seed=5)
    tokens, targets = data["tokens"], data["targets"]
    predicted = {"targets": targets, "last": last_pair_answers(tokens, CFG.num_kv_pairs),
                 "zero": torch.zeros_like(tokens)}[answer]
    scores = mqar.recall_scores(tokens, targets, predicted, CFG.num_kv_pairs)
    assert [float(scores[f"acc_pair{i}"][0]) for i in range(CFG.num_kv_pairs)] == expected_pairs
    assert float(scores["in_context"][0]) == in_context
    assert all(scores[f"acc_pair{i}"][1] == 200 for i in range(CFG.num_kv_pairs))  # every key asked once a row


def test_evaluation_logs_the_recall_scores_beside_accuracy():
    cfg = config("experiment=mqar/cpu", "task.vocab_size=64", "task.seq_len=32", "task.num_kv_pairs=4",
                 "model.d_model=16")
    m = mqar.MQARModule(cfg)
    assert m.monitor == "val/acc"
    assert m.eval_means == ("loss", "acc", "in_context", "acc_pair0", "acc_pair1", "acc_pair2", "acc_pair3")
    batch = mqar.generate(m.task, 16, seed=0)
    answers = last_pair_answers(batch["tokens"], 4)  # (n, L)
    logits = 100 * F.one_hot(answers, m.task.vocab_size).double()  # (n, L, V)
    m.forward = lambda b: logits
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    for split in ("val", "test"):
        m.eval_step(batch, split)
        m.log_means(split)
    for split in ("val", "test"):
        assert logged[f"{split}/acc"] == pytest.approx(0.25) and logged[f"{split}/in_context"] == 1.0
        assert [logged[f"{split}/acc_pair{i}"] for i in range(4)] == [0.0, 0.0, 0.0, 1.0]


def test_reach_share_counts_the_generated_split():
    cfg = replace(CFG, seq_len=64, num_kv_pairs=4)
    data = mqar.make_splits(cfg)[0]["test"]
    tokens, targets = data["tokens"], data["targets"]
    distances = []
    for row in range(len(tokens)):  # by hand: position of each query minus where its key sits
        for pos in (targets[row] != mqar.IGNORE).nonzero().flatten().tolist():
            distances.append(pos - tokens[row, : 2 * cfg.num_kv_pairs].tolist().index(int(tokens[row, pos])))
    assert mqar.key_distances(tokens, targets, cfg.num_kv_pairs).tolist() == distances
    for d in (0, 8, 16, 63):
        assert mqar.reach_share(cfg, d) == sum(x <= d for x in distances) / len(distances)
    assert mqar.reach_share(cfg, 0) == 0.0 and mqar.reach_share(cfg, cfg.seq_len) == 1.0
    assert mqar.window_reach(16) == 15 and mqar.window_reach(16, layers=2) == 30


# ----------------------------------------------------------------------------- attention rows against softmax


class OneHotKeys(KernelAttention):
    """φ(q) = e^{q/√d}, φ(k) = k: for one-hot keys φ(q)·φ(k_j) = e^{q·k_j/√d}, so its rows are softmax's."""

    def feature_map(self, x, is_query, *, fresh_grad=False):
        return ((x * x.shape[-1] ** -0.5).exp() if is_query else x), None


def qkv(seed: int = 0, length: int = 10, dim: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, length, dim, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
def test_row_kl_is_zero_exactly_when_the_rows_are_softmax(causal):
    q, _, v = qkv()
    k = F.one_hot(torch.randint(6, (2, 2, 10), generator=torch.Generator().manual_seed(1)), 6).double()
    attn = OneHotKeys(6, 2).double()
    torch.testing.assert_close(attn(q, k, v, causal=causal),
                               create_attention("softmax", head_dim=6, num_heads=2)(q, k, v, causal=causal))
    same = rows_against_softmax(attn, q, k, causal=causal)
    assert same["rows"] == "kernel" and same["softmax_mass"] == pytest.approx(1.0, abs=1e-12)
    assert abs(same["kl_softmax_model"]) < 1e-12 and abs(same["kl_model_softmax"]) < 1e-12
    other = rows_against_softmax(attn, q, k + 0.3, causal=causal)  # keys off the one-hot set: other rows
    assert other["kl_softmax_model"] > 1e-3 and other["kl_model_softmax"] > 1e-3


@pytest.mark.parametrize("name, kwargs", [("linear", {}), ("favor", {"num_features": 32}), ("hedgehog", {}),
                                          ("taylor", {}), ("sliding_window", {"window": 3}), ("softmax", {})])
@pytest.mark.parametrize("causal", [False, True])
def test_rows_are_the_ones_the_attention_averages_with(name, kwargs, causal):
    q, k, v = qkv(2)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True  # the second sequence's last 3 keys are padding
    attn = create_attention(name, head_dim=6, num_heads=2, **kwargs).double().eval()
    kind, rows, visible = attention_rows(attn, q, k, pad, causal)
    assert (rows[1, :, :, 7:] == 0).all()  # padded keys get no weight
    out = attn(q, k, v, key_padding_mask=pad, causal=causal)  # (B, H, L, Dv)
    torch.testing.assert_close(rows @ v.masked_fill(pad[:, None, :, None], 0.0), out, rtol=0, atol=1e-12)
    result = rows_against_softmax(attn, q, k, pad, causal)
    if name == "softmax":
        assert abs(result["kl_softmax_model"]) < 1e-12
    else:
        assert result["kl_softmax_model"] > 0 and result["kl_model_softmax"] > 0


def test_sliding_window_rows_report_the_mass_inside_the_window():
    q, k, _ = qkv(3)
    window = create_attention("sliding_window", head_dim=6, num_heads=2, window=3).double()
    p = softmax_rows(q, k, visible_keys(10, None, True))
    mass = (p * visible_keys(10, None, True, 3)).sum(-1)  # (B, H, L): softmax mass on the window's keys
    result = rows_against_softmax(window, q, k, causal=True)
    assert result["rows"] == "window" and result["kl_softmax_model"] == math.inf  # mass outside the band
    assert result["softmax_mass"] == pytest.approx(float(mass.mean()), abs=1e-12)
    assert result["kl_model_softmax"] == pytest.approx(float(-mass.log().mean()), abs=1e-12)  # = −log(mass)
    wide = create_attention("sliding_window", head_dim=6, num_heads=2, window=10).double()
    assert abs(rows_against_softmax(wide, q, k, causal=True)["kl_softmax_model"]) < 1e-12  # sees every key


@pytest.mark.parametrize("name", ["mamba2", "retention", "dot"])
def test_attentions_without_normalized_rows_say_so(name):
    q, k, _ = qkv(4)
    result = rows_against_softmax(create_attention(name, head_dim=6, num_heads=2).double(), q, k, causal=True)
    assert result["rows"] == "no rows" and math.isnan(result["kl_softmax_model"])


# ----------------------------------------------------------------------------- tools/mqar_mechanisms


def test_mechanisms_tool_reproduces_the_run_and_counts_the_window_reach(tmp_path):
    from efficient_attn_tasks.run.fit import run
    from tests.helpers import tiny_cfg
    from tools import mqar_mechanisms

    sweep = tmp_path / "sweep"
    run(tiny_cfg("mqar", "sliding_window", "attention.kwargs.window=4", "trainer.max_epochs=1"), sweep / "w4")
    (sweep / "broken").mkdir()  # no results.json: not a finished run
    rows = mqar_mechanisms.main([str(sweep), "--out", str(tmp_path / "out" / "mech"), "--rows-batch", "4"])
    assert len(rows) == 1
    row = rows[0]
    assert row["acc"] == pytest.approx(row["acc_recorded"], abs=1e-6)  # the run's own test accuracy
    assert (row["window"], row["layers"], row["rows"]) == (4, 2, "window")
    task = mqar.Config(**json.loads((sweep / "w4" / "results.json").read_text())["config"]["task"])
    assert row["reach1"] == mqar.reach_share(task, 3) and row["reach_stack"] == mqar.reach_share(task, 6)
    assert row["reach1"] < mqar.reach_share(task, 4)  # distances are even: 3 reaches no further than 2, 4 does
    assert 0 < row["reach_stack"] < 1  # queries on both sides of the reach: near and far both measured
    near = row["reach_stack"]
    assert row["acc"] == pytest.approx(near * row["acc_near"] + (1 - near) * row["acc_far"], abs=1e-6)
    assert 0 < row["softmax_mass"] < 1 and row["kl_softmax_model"] == math.inf and row["kl_model_softmax"] > 0
    pairs = [row[f"acc_pair{i}"] for i in range(row["num_kv_pairs"])]
    assert row["acc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)  # every key asked once per sequence
    header = (tmp_path / "out" / "mech.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["run", "attention", "seq_len"] and "acc_pair1" in header and "acc_near" in header
    assert (tmp_path / "out" / "mech.md").is_file()


def test_accuracy_splits_at_the_reach():
    from tools.mqar_mechanisms import by_reach

    distances = torch.tensor([2, 4, 6, 8, 10])
    correct = torch.tensor([True, True, False, False, True])
    assert by_reach(distances, correct, 5) == {"reach_stack": 0.4, "acc_near": 1.0, "acc_far": pytest.approx(1 / 3)}
    assert math.isnan(by_reach(distances, correct, 10)["acc_far"])  # every key within reach


def test_keep_reads_earlier_rows_back_and_replaces_only_the_runs_measured_again(tmp_path):
    from tools.mqar_mechanisms import kept_rows, merged, write

    def row(run, acc, **extra):
        return {"run": run, "attention": "linear", "seq_len": 64, "num_kv_pairs": 2, "d_model": 64, "lr": 1e-4,
                "seed": 0, "acc": acc, "acc_pair0": acc, "acc_pair1": acc, "kl_softmax_model": math.inf, **extra}

    old = [row("a", 0.5, reach1=0.25), row("c", 0.125)]
    write(old, tmp_path / "mech")
    first = (tmp_path / "mech.csv").read_text()
    assert kept_rows(tmp_path / "mech.csv") == old  # numbers come back as numbers, empty cells stay absent
    write(kept_rows(tmp_path / "mech.csv"), tmp_path / "mech")
    assert (tmp_path / "mech.csv").read_text() == first  # a kept row is written back as it was
    rows = merged(kept_rows(tmp_path / "mech.csv"), [row("c", 0.75), row("b", 1.0)])
    assert [(r["run"], r["acc"]) for r in rows] == [("a", 0.5), ("b", 1.0), ("c", 0.75)]
    assert kept_rows(tmp_path / "missing.csv") == []
