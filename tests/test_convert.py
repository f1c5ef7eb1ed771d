"""Converting a trained model to another attention (efficient_attn_tasks/run/convert.py): ``init_from`` in
training and ``efficient-attn-eval --attention`` (swap-in) load every weight outside the attention cores, keep
the new attention's own fresh, and refuse, in one line and before any data is built, a checkpoint that does not
fit (another task, another d_model) or a resume at the same time."""

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from efficient_attn import MultiHeadAttention
from efficient_attn.attention.favor import FavorAttention
from efficient_attn_tasks.commands import evaluate
from efficient_attn_tasks.commands.train import resume_command
from efficient_attn_tasks.config.checks import ConfigError
from efficient_attn_tasks.inference import checkpoint
from efficient_attn_tasks.inference import evaluate as scoring
from efficient_attn_tasks.run import convert
from efficient_attn_tasks.run.curves import read_curves
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RunRecord, checkpoint_step
from efficient_attn_tasks.tasks import mqar
from tests.helpers import config, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def score(*argv) -> dict:
    return scoring.run(evaluate.parser().parse_args([str(a) for a in argv]))


class Snapshot(pl.Callback):
    """The module's state when fit starts: after init_from loaded it, before any step."""

    def on_fit_start(self, trainer, module):
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_swap_in_of_the_checkpoints_own_attention_scores_as_the_plain_eval(softmax_run):
    plain = score(softmax_run)
    swapped = score(softmax_run, "--attention", "softmax")
    assert swapped["metrics"] == plain["metrics"]
    assert swapped["swapped_in"]["same_attention"] and swapped["swapped_in"]["fresh"] == []
    assert plain["swapped_in"] is None
    ckpt = Path(plain["checkpoint"])
    assert (ckpt.with_name(f"{ckpt.stem}.eval_test.json")).is_file()
    assert (ckpt.with_name(f"{ckpt.stem}.eval_test.swap_softmax.json")).is_file()  # not the plain eval's


def test_swap_in_kwargs_reach_the_attention(softmax_run):
    loaded = checkpoint.load(softmax_run, attention="favor_plus", attention_kwargs={"num_features": 7})
    favors = [m for m in loaded.module.modules() if isinstance(m, FavorAttention)]
    assert len(favors) == 2 and all(m.projection.shape[0] == 7 for m in favors)
    assert loaded.swap["attention"]["kwargs"]["num_features"] == 7 and not loaded.swap["same_attention"]
    assert loaded.swap["fresh"] and all(".self_attn.attention." in k for k in loaded.swap["fresh"])
    record = score(softmax_run, "--attention", "favor_plus", "--attention-kwargs", "num_features=7")
    assert record["swapped_in"]["attention_config"] == "favor_plus" and record["attention"] == "favor"
    assert record["swapped_in"]["attention"]["kwargs"]["num_features"] == 7
    ckpt = Path(record["checkpoint"])
    assert ckpt.with_name(f"{ckpt.stem}.eval_test.swap_favor_plus.num_features=7.json").is_file()
    with pytest.raises(ConfigError, match="has no option"):
        checkpoint.load(softmax_run, attention="favor_plus", attention_kwargs={"nb_features": 7})


def test_init_from_loads_every_shared_weight_then_trains_and_records_where_it_started(softmax_run, tmp_path, capsys):
    snap = Snapshot()
    cfg = config(*tiny_overrides("mqar", "attention=favor_plus", f"init_from={softmax_run}", "trainer.max_steps=2"))
    record = run(cfg, tmp_path / "favor", callbacks=[snap])
    source = checkpoint.find(softmax_run)[0]
    saved = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    shared = [k for k in snap.state if ".attention." not in k]
    assert len(shared) > 20 and all(k in saved and torch.equal(snap.state[k], saved[k]) for k in shared)
    assert any(k.endswith("attention.projection") for k in snap.state)  # FAVOR+'s own, drawn from the seed
    assert record.status == "ok" and record.stopped_step == 2
    written = RunRecord.read(tmp_path / "favor" / "results.json")
    assert written.config["init_from"] == str(source.resolve())
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("init from"))
    assert line.startswith(f"init from {source}") and "model.decoder.layers.*.self_attn.attention.projection" in line


def test_the_attentions_own_tensors_are_never_loaded_from_another_attention():
    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(MultiHeadAttention(16, 2, "favor", {"num_features": 8}), torch.nn.Linear(16, 16))

    old, new = model(1), model(2)
    fresh = new[0].attention.projection.clone()
    done = convert.load_converted(new, old.state_dict(), same_attention=False)
    assert torch.equal(new[0].attention.projection, fresh)
    assert not torch.equal(new[0].attention.projection, old[0].attention.projection)
    assert torch.equal(new[0].q_proj.weight, old[0].q_proj.weight) and torch.equal(new[1].bias, old[1].bias)
    assert "0.attention.projection" in done.fresh and "0.attention.projection" not in done.loaded
    convert.load_converted(new, old.state_dict(), same_attention=True)
    assert torch.equal(new[0].attention.projection, old[0].attention.projection)


def test_only_attention_tensors_may_be_missing_or_left_over():
    def model(*extra: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.Sequential(MultiHeadAttention(16, 2, "softmax"), torch.nn.Linear(16, 16), *extra)

    old = {**model().state_dict(), "0.attention.weight": torch.ones(2, 8, 8)}  # the old attention's own
    assert convert.load_converted(model(), old, same_attention=False).dropped == ["0.attention.weight"]
    with pytest.raises(ConfigError, match="lacks weights of this model that no attention owns: 2.weight, 2.bias"):
        convert.load_converted(model(torch.nn.Linear(16, 16)), old, same_attention=False)
    with pytest.raises(ConfigError, match="no attention's and have no place in this model: 2.weight"):
        convert.load_converted(model(), {**old, "2.weight": torch.ones(3)}, same_attention=False)


@pytest.mark.parametrize("overrides, message", [
    (["task=mqar", "model.d_model=32"], "do not fit this model: model.embed_tgt.tokens.weight"),
    (["task=listops"], "is a checkpoint of task mqar, but this run's task is listops"),
    (["task=mqar", "task.vocab_size=40"], "trained with task.vocab_size=32, this run has task.vocab_size=40"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line_before_any_data(softmax_run, tmp_path, monkeypatch,
                                                                               overrides, message):
    task = overrides[0].split("=")[1]

    def no_data(*args, **kwargs):
        raise AssertionError("data was built before the checkpoint was checked")

    monkeypatch.setattr(mqar.MQARData, "setup", no_data)
    monkeypatch.setattr(mqar.MQARData, "prepare_data", no_data)
    cfg = config(*tiny_overrides(task, "attention=favor_plus", *overrides[1:], f"init_from={softmax_run}"))
    with pytest.raises(ConfigError, match=message) as err:
        run(cfg, tmp_path / "refused")
    assert "\n" not in str(err.value)


def test_init_from_with_another_checkpoint_is_refused_in_one_line_with_exit_2(softmax_run, tmp_path):
    ckpt = checkpoint.find(softmax_run)[0]
    out = subprocess.run([sys.executable, "-m", "efficient_attn_tasks.commands.train",
                          *tiny_overrides("mqar", f"init_from={softmax_run}", f"ckpt_path='{ckpt}'",
                                          f"hydra.run.dir={tmp_path / 'both'}")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: init_from=") and "give one of them" in err[0]
    # an interrupted run that started from init_from keeps it: ckpt_path=last resumes it from its own last.ckpt
    assert resume_command(["task=mqar", "init_from=runs/a", "attention=hedgehog"], tmp_path, None) == \
        f"efficient-attn-train task=mqar init_from=runs/a attention=hedgehog hydra.run.dir={tmp_path} ckpt_path=last"


def test_a_run_started_from_init_from_resumes_from_its_own_last_checkpoint(softmax_run, tmp_path, capsys):
    """ckpt_path=last with init_from: a run dir without last.ckpt starts from init_from's weights; one with a
    last.ckpt (an interrupted attempt) resumes from it, never from init_from again."""
    out = tmp_path / "favor"
    first = Snapshot()
    cfg = config(*tiny_overrides("mqar", "attention=favor_plus", f"init_from={softmax_run}", "ckpt_path=last",
                                 "trainer.max_steps=2"))
    assert run(cfg, out, callbacks=[first]).status == "ok"
    saved = torch.load(checkpoint.find(softmax_run)[0], map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(first.state["model.embed_tgt.tokens.weight"], saved["model.embed_tgt.tokens.weight"])
    assert any(x.startswith("init from") for x in capsys.readouterr().out.splitlines())
    (out / "results.json").unlink()  # as an interrupted attempt leaves it: last.ckpt, no finished record
    again = Snapshot()
    cfg = config(*tiny_overrides("mqar", "attention=favor_plus", f"init_from={softmax_run}", "ckpt_path=last",
                                 "trainer.max_steps=4"))
    record = run(cfg, out, callbacks=[again])
    assert record.status == "ok" and record.resumed_from and record.stopped_step == 4
    embed = "model.embed_tgt.tokens.weight"
    assert not torch.equal(again.state[embed], saved[embed])  # the 2 steps trained, not init_from's weights
    assert not any(x.startswith("init from") for x in capsys.readouterr().out.splitlines())  # not read again


def test_the_swap_in_help_example_names_a_real_option():
    text = evaluate.parser().format_help()
    assert "last.ckpt --split val --attention favor_plus --attention-kwargs num_features=64" in text


def test_validate_first_scores_the_starting_weights_at_step_0_and_leaves_training_as_it_was(softmax_run, tmp_path):
    """``validate_first=true`` from init_from with the same attention: step 0 of curves.csv is the source run's
    validation of its best checkpoint, to the bit; the training steps after it are those of a run without it."""
    def curves(validate_first: bool) -> dict:
        out = tmp_path / f"first={validate_first}"
        cfg = config(*tiny_overrides("mqar", "attention=softmax", f"init_from={softmax_run}", "trainer.max_steps=2",
                                     f"validate_first={str(validate_first).lower()}"))
        assert run(cfg, out).status == "ok"
        return read_curves(out / "curves.csv")

    first, plain = curves(True), curves(False)
    source = read_curves(softmax_run / "curves.csv")
    best = checkpoint_step(str(checkpoint.find(softmax_run)[0]))
    for key in ("val/loss", "val/acc"):
        assert first[key][0][0] == 0 and 0 not in plain[key][0]
        assert first[key][1][0] == source[key][1][source[key][0].index(best)]
        assert (first[key][0][1:], first[key][1][1:]) == plain[key]
    assert first["train/loss"] == plain["train/loss"]
    with pytest.raises(ConfigError, match="validate_first must be true or false"):
        run(config(*tiny_overrides("mqar", "validate_first=yes")), tmp_path / "typo")
