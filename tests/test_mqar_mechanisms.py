"""Where MQAR answers come from (per-pair accuracy, in-context rate), how far a window reaches, and how far a
trained attention's rows are from softmax's: each checked on inputs whose right answer is known."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

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
