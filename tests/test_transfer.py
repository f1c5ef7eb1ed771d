"""Stage one of a conversion (``init_from=<softmax run> transfer_steps=N``, efficient_attn_tasks/run/transfer.py and
efficient_attn/transfer.py): only the new attention cores' own tensors train, against the checkpoint's softmax
attention; then the fine-tune runs its own steps; a resumed run does not run it again."""

import json
from pathlib import Path

import pytest
import torch

from efficient_attn import MultiHeadAttention
from efficient_attn.transfer import AttentionTransfer, transfer_parameters
from efficient_attn_tasks.config.checks import ConfigError
from efficient_attn_tasks.run import transfer as stage
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RunRecord
from tests.helpers import config, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 30


def converted(softmax_run: Path, attention: str, *overrides: str):
    return config(*tiny_overrides("mqar", f"attention={attention}", f"init_from={softmax_run}", "trainer.max_steps=2",
                                  *overrides))


@pytest.mark.parametrize("name,kwargs", [("hedgehog", {}), ("bilinear", {})])
@pytest.mark.parametrize("causal,padded", [(False, False), (True, True)])
def test_inside_the_transfer_a_layer_outputs_softmax_attention_and_its_core_trains_alone(name, kwargs, causal, padded):
    torch.manual_seed(0)
    layer, teacher = MultiHeadAttention(16, 2, name, kwargs), MultiHeadAttention(16, 2, "softmax")
    teacher.load_state_dict(layer.state_dict(), strict=False)  # the same projections
    x = torch.randn(3, 7, 16)  # (B, L, d_model)
    mask = torch.zeros(3, 7, dtype=torch.bool)  # (B, L)
    mask[0, 5:] = padded
    params = transfer_parameters(layer)
    assert params and {id(p) for p in params} == {id(p) for p in layer.attention.parameters()}
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    with AttentionTransfer(layer) as transfer:
        for _ in range(20):
            out = layer(x, key_padding_mask=mask, causal=causal)  # (B, L, d_model)
            torch.testing.assert_close(out, teacher(x, key_padding_mask=mask, causal=causal))
            loss = transfer.take()
            assert transfer.take() is None  # taken once
            optimizer.zero_grad()
            loss.backward()
            assert all(p.grad is None for n, p in layer.named_parameters() if not n.startswith("attention."))
            optimizer.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert not layer._forward_hooks and not layer.attention._forward_hooks  # gone on exit
    if name == "hedgehog":  # its own distillation loss on the layer's q, k
        assert losses[0] == pytest.approx(float(reference_distill(layer, x, mask, causal)), rel=1e-3)


def reference_distill(layer: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Cross-entropy of the freshly initialised Hedgehog weights against softmax's, written plainly."""
    fresh = MultiHeadAttention(16, 2, "hedgehog")
    fresh.load_state_dict({k: v for k, v in layer.state_dict().items() if ".attention." not in f".{k}"},
                          strict=False)  # the projections; the maps as initialised (identity, zero)
    x = x.masked_fill(mask[:, :, None], 0.0)
    q = fresh.q_proj(x).view(3, 7, 2, 8).transpose(1, 2)  # (B, H, L, D)
    k = fresh.k_proj(x).view(3, 7, 2, 8).transpose(1, 2)  # (B, H, L, D)
    allowed = ~mask[:, None, None, :].expand(3, 1, 7, 7)  # (B, 1, L, S)
    if causal:
        allowed = allowed & torch.ones(7, 7, dtype=torch.bool).tril()
    p = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, H, L, S)
    phi = [torch.cat([z.softmax(-1), (-z).softmax(-1)], -1) for z in (q, k)]  # identity maps: (B, H, L, 2D)
    kernel = (phi[0] @ phi[1].transpose(-1, -2)).masked_fill(~allowed, 0.0)  # (B, H, L, S)
    student = kernel / kernel.sum(-1, keepdim=True)
    return -(p * student.clamp_min(1e-38).log()).sum(-1).mean()


def test_stage_one_trains_only_the_new_attentions_tensors_then_the_fine_tune_runs_its_own_steps(
        softmax_run, tmp_path, monkeypatch, capsys):
    seen = {}
    original = stage.run_transfer

    def watched(module, *args):
        seen["before"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        out = original(module, *args)
        seen["after"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return out

    monkeypatch.setattr(stage, "run_transfer", watched)
    cfg = converted(softmax_run, "hedgehog", f"transfer_steps={STEPS}", "transfer_lr=0.01")
    record = run(cfg, tmp_path / "hedgehog")
    before, after = seen["before"], seen["after"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    own = {k for k in before if ".self_attn.attention." in k}
    assert own and changed == own  # every map tensor trained, nothing else touched
    assert record.status == "ok" and record.stopped_step == 2  # the fine-tune's own steps
    done = record.transfer
    assert done["steps"] == STEPS and done["lr"] == 0.01 and done["cores"] == 2
    assert done["final_loss_mean"] < done["first_loss"]
    written = json.loads((tmp_path / "hedgehog" / "results.json").read_text())
    assert written["transfer"] == done == json.loads((tmp_path / "hedgehog" / stage.TRANSFER_JSON).read_text())
    out = capsys.readouterr().out.splitlines()
    assert sum(x.startswith("transfer step ") for x in out) >= 5
    assert any(x.startswith(f"transfer: {STEPS} steps on 2 attention cores") for x in out)


def test_a_variant_without_tensors_of_its_own_skips_stage_one_in_one_line(softmax_run, tmp_path, capsys):
    record = run(converted(softmax_run, "favor_plus", "transfer_steps=5"), tmp_path / "favor")
    assert record.status == "ok" and record.stopped_step == 2
    assert record.transfer == {"steps": 0, "requested": 5, "skipped": "no trainable attention tensors"}
    out = capsys.readouterr().out.splitlines()
    assert "transfer_steps=5: the new attention has no trainable tensors of its own; stage one skipped" in out
    assert not any(x.startswith("transfer step") for x in out)


@pytest.mark.parametrize("overrides,message", [
    (("attention=hedgehog", "transfer_steps=5"), r"^transfer_steps=5 trains .* set init_from="),
    (("transfer_steps=-1",), r"^transfer_steps must be an int >= 0"),
    (("transfer_lr=0",), r"^transfer_lr must be a positive number"),
])
def test_transfer_options_are_checked_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        run(config(*tiny_overrides("mqar", *overrides)), tmp_path / "refused")
    assert "\n" not in str(err.value)


def test_stage_one_needs_a_softmax_checkpoint_and_cores_without_layer_options(softmax_run, tmp_path):
    first = run(converted(softmax_run, "hedgehog"), tmp_path / "hedgehog")
    assert first.status == "ok" and first.transfer is None  # transfer_steps=0: no stage, nothing recorded
    with pytest.raises(ConfigError, match=r"init_from's decoder attention is hedgehog") as err:
        run(converted(tmp_path / "hedgehog", "hedgehog", "transfer_steps=5"), tmp_path / "again")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"options off, but output_norm and output_gate set; set transfer_steps=0"):
        run(converted(softmax_run, "gla", "transfer_steps=5"), tmp_path / "gla")


def test_a_resumed_run_does_not_run_stage_one_again(softmax_run, tmp_path, capsys):
    out = tmp_path / "hedgehog"
    cfg = converted(softmax_run, "hedgehog", "transfer_steps=4", "ckpt_path=last")
    first = run(cfg, out)
    assert first.transfer["steps"] == 4 and "transfer step 4/4: loss" in capsys.readouterr().out
    (out / "results.json").unlink()  # as an interrupted attempt leaves it: last.ckpt, no finished record
    cfg = converted(softmax_run, "hedgehog", "transfer_steps=4", "ckpt_path=last", "trainer.max_steps=4")
    record = run(cfg, out)
    assert record.resumed_from and record.stopped_step == 4
    assert record.transfer == first.transfer  # the first attempt's, read back
    assert RunRecord.read(out / "results.json").transfer == first.transfer
    assert not any(x.startswith("transfer") for x in capsys.readouterr().out.splitlines())
