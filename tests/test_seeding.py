"""One seed, one model whatever the attention; per-module random features; redraws per optimizer step."""

import pytest
import torch

import efficient_attn as ea
from efficient_attn.transformer import (
    AttentionSpec,
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
)

from .helpers import make_qkv, site_specs

CFG = TransformerConfig(d_model=16, num_heads=2, d_ff=32, encoder_layers=2, decoder_layers=2, max_len=64,
                        positional="learned", tie_embeddings=False)  # untied: an output layer built last
SPECS = [AttentionSpec(name) for name in ea.list_attentions()] + [
    AttentionSpec("favor", {"kernel": "relu"}),
    AttentionSpec("favor", {"kernel": "softmax_trig"}),
    AttentionSpec("favor", {"orthogonal": False}),
    AttentionSpec("favor", {"seed": 5}),
]
MODELS = ["seq2seq", "classifier", "lm"]


def build(kind: str, spec: AttentionSpec, seed: int = 3) -> torch.nn.Module:
    """``spec`` at every site it can serve (softmax at the others: no encoder for a causal-only variant)."""
    torch.manual_seed(seed)
    sites = site_specs(spec)
    if kind == "seq2seq":
        return Seq2SeqTransformer(CFG, 20, encoder_attention=sites["encoder"], decoder_attention=sites["decoder"],
                                  cross_attention=sites["cross"])
    if kind == "classifier":
        return TransformerClassifier(CFG, 20, 5, attention=sites["encoder"])
    return TransformerLM(CFG, 20, attention=spec)


def shared(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter outside the core attentions (embeddings, Q/K/V/O, feed-forward, norms, output)."""
    return {n: p for n, p in model.named_parameters() if ".attention." not in n}


def projections(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every FAVOR+ projection in ``model`` (redraws overwrite the buffers in place)."""
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("projection")}


# ----------------------------------------------------------------------------- same seed, same model
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}{s.kwargs or ''}")
@pytest.mark.parametrize("kind", MODELS)
def test_shared_parameters_and_global_rng_do_not_depend_on_the_attention(kind, spec):
    reference = build(kind, AttentionSpec("softmax"))
    rng_after_reference = torch.get_rng_state()
    model = build(kind, spec)
    assert torch.equal(torch.get_rng_state(), rng_after_reference)  # the attention drew nothing from it
    want, got = shared(reference), shared(model)
    assert want.keys() == got.keys() and len(want) > 10
    assert [n for n in want if not torch.equal(want[n], got[n])] == []


def test_standalone_multihead_attention_is_deterministic_and_leaves_the_global_rng():
    states = {}
    for name in ("softmax", "bilinear", "favor"):
        torch.manual_seed(0)
        first = ea.MultiHeadAttention(16, 2, attention=name)
        states[name] = torch.get_rng_state()
        torch.manual_seed(0)
        again = ea.MultiHeadAttention(16, 2, attention=name)
        for key, value in first.state_dict().items():
            assert torch.equal(value, again.state_dict()[key]), (name, key)
    assert torch.equal(states["softmax"], states["bilinear"]) and torch.equal(states["softmax"], states["favor"])


# ----------------------------------------------------------------------------- a stream per module
@pytest.mark.parametrize("kwargs", [{}, {"seed": 5}], ids=["run-seed", "explicit-seed"])
def test_every_favor_module_of_a_model_has_its_own_features(kwargs):
    model = build("seq2seq", AttentionSpec("favor", {"num_features": 8, **kwargs}))
    found = list(projections(model).values())
    assert len(found) == 6  # 2 encoder self, 2 decoder self, 2 cross
    assert all(not torch.equal(a, b) for i, a in enumerate(found) for b in found[i + 1 :])


def test_learned_attention_parameters_differ_per_module():
    model = build("lm", AttentionSpec("bilinear"))
    weights = [p for n, p in model.named_parameters() if n.endswith("attention.weight")]
    assert len(weights) == 2 and not torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("kind", MODELS)
def test_the_same_seed_rebuilds_the_same_features_and_another_seed_does_not(kind):
    spec = AttentionSpec("favor", {"num_features": 8})
    first, again, other = (projections(build(kind, spec, seed)) for seed in (3, 3, 4))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert all(not torch.equal(first[n], other[n]) for n in first)


def test_an_explicit_seed_fixes_the_features_whatever_the_run_seed():
    spec = AttentionSpec("favor", {"num_features": 8, "seed": 5})
    first, other = (projections(build("lm", spec, seed)) for seed in (3, 4))
    assert all(torch.equal(first[n], other[n]) for n in first)
    plain = projections(build("lm", AttentionSpec("favor", {"num_features": 8})))
    assert all(not torch.equal(first[n], plain[n]) for n in first)


def test_seed_attentions_reseeds_without_touching_the_global_rng():
    model = build("lm", AttentionSpec("additive"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    ea.seed_attentions(model, base_seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attention." in n for n in changed)
    ea.seed_attentions(model, base_seed=3)  # the seed the model was built with: back where it started
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- redraws per optimizer step
def favor(**kwargs) -> torch.nn.Module:
    return ea.create_attention("favor", head_dim=8, num_heads=2, num_features=8, **kwargs)


def test_redraw_after_exactly_redraw_interval_optimizer_steps_never_in_forward():
    attn = favor(redraw_interval=3).train()
    q, k, v = make_qkv(b=1, h=2, length=5, d=8, dtype=torch.float32)
    seen = [attn.projection.clone()]
    for _ in range(7):
        for _ in range(4):  # forward calls, even in training mode, never redraw
            attn(q, k, v)
            assert torch.equal(attn.projection, seen[-1])
        ea.attention_optimizer_step(attn)
        seen.append(attn.projection.clone())
    changed = [i for i in range(1, 8) if not torch.equal(seen[i], seen[i - 1])]
    assert changed == [3, 6] and int(attn.num_draws) == 3


def test_no_redraws_with_interval_zero():
    attn = favor(redraw_interval=0)
    before = attn.projection.clone()
    for _ in range(5):
        ea.attention_optimizer_step(attn)
    assert torch.equal(attn.projection, before)


def test_state_dict_round_trip_restores_the_redraw_counter():
    attn = favor(redraw_interval=3, seed=1)
    for _ in range(2):
        ea.attention_optimizer_step(attn)
    restored = favor(redraw_interval=3, seed=2)
    restored.load_state_dict(attn.state_dict())
    assert int(restored.steps_since_draw) == 2
    ea.attention_optimizer_step(attn), ea.attention_optimizer_step(restored)  # step 3: both redraw
    assert torch.equal(restored.projection, attn.projection) and int(restored.num_draws) == 2


def test_checkpoints_that_counted_forward_calls_still_load():
    attn = favor(redraw_interval=3)
    legacy = dict(attn.state_dict())
    legacy["calls_since_draw"] = legacy.pop("steps_since_draw") + 2
    restored = favor(redraw_interval=3)
    restored.load_state_dict(legacy)
    ea.attention_optimizer_step(restored)  # 2 calls + 1 step: redrawn, to draw 1 of attn's stream
    attn.redraw_features()
    assert torch.equal(restored.projection, attn.projection) and int(restored.num_draws) == 2
    del legacy["draw_seed"]
    favor(redraw_interval=3).load_state_dict(legacy)  # from before draw_seed existed


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_low_precision_casts_keep_the_projection_float32_and_unrounded(cast):
    model = build("lm", AttentionSpec("favor", {"num_features": 8}))
    before = projections(model)
    model = model.to(torch.bfloat16) if cast == "bfloat16" else model.half()
    assert model.output.weight.dtype != torch.float32  # the rest was cast
    after = projections(model)
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], before[n]) for n in before)
    assert torch.isfinite(model(torch.randint(20, (2, 9))).float()).all()
    assert all(p.dtype == torch.float64 for p in projections(model.double()).values())
    back = projections(model.float())  # bf16 -> float64 -> float32 lost nothing
    assert all(back[n].dtype == torch.float32 and torch.equal(back[n], before[n]) for n in before)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def projection_log():
    """A Lightning callback (built on demand: importing Lightning costs seconds)."""
    import pytorch_lightning as pl

    class ProjectionLog(pl.Callback):
        """Per training batch: global step after it, and whether the features changed in its forward/backward
        (batch start to just before the optimizer step, or to the batch end when no step is taken) or at all."""

        def __init__(self) -> None:
            self.rows: list[tuple[int, bool, bool]] = []
            self.start: dict[str, torch.Tensor] = {}
            self.before_step: dict[str, torch.Tensor] | None = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.start, self.before_step = projections(module), None

        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            self.before_step = projections(module)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            end = projections(module)
            in_pass = not same(self.start, self.before_step if self.before_step is not None else end)
            self.rows.append((trainer.global_step, in_pass, not same(self.start, end)))

    return ProjectionLog()


@pytest.mark.usefixtures("one_thread")
def test_lightning_redraws_at_optimizer_steps_with_gradient_accumulation(tmp_path):
    from efficient_attn_tasks.run.fit import run
    from tools import faults_scenarios as faults

    log = projection_log()
    cfg = faults.compose_config([*faults.TINY, *faults.FAVOR, "attention.kwargs.redraw_interval=2",
                                 "trainer.accumulate_grad_batches=2", "trainer.max_steps=6"])
    record = run(cfg, tmp_path, callbacks=[log])
    assert [row[0] for row in log.rows] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]  # 2 micro-batches a step
    assert not any(row[1] for row in log.rows)  # never inside a forward or backward
    assert [i for i, row in enumerate(log.rows) if row[2]] == [3, 7]  # after steps 2 and 4; not after the last, 6
    assert record.feature_redraws == 2
