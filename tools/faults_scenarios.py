"""Fault injection for the training stack, the training faults: kill, resume, sweeps with a failing job, 2 processes,
bf16 and fp16. Each scenario runs tiny real trainings and returns what happened; tests/test_reliability.py and
tests/test_resume.py call them and ``python -m tools.faults`` writes its report from them.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from efficient_attn_tasks.commands import report
from efficient_attn_tasks.config.checks import CONFIG_DIR, ConfigError
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RESULTS_JSON, RunRecord
from tests.helpers import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
# A tiny ListOps run that crosses epochs, validates, redraws FAVOR+ features and uses dropout.
TINY = [*tiny_overrides("listops"), "task.batch_size=8", "test=false", "threads=1", "trainer.max_epochs=-1",
        "trainer.log_every_n_steps=1"]  # 8 steps an epoch
FAVOR = ["attention=favor_plus", "attention.kwargs.num_features=16", "attention.kwargs.redraw_interval=3"]


def compose_config(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))



class StepLog(pl.Callback):
    """Per step: the training loss and (optionally) whether every rank holds the same FAVOR+ features;
    per test: how many sentences each process decoded (translation batches carry ``refs``)."""

    def __init__(self, check_features: bool = False) -> None:
        self.losses: list[float] = []
        self.feature_mismatches = 0
        self.check_features = check_features
        self.test_sentences = 0
        self.test_sentences_per_process: list[int] = []

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(batch, dict) and "refs" in batch:
            self.test_sentences += len(batch["refs"])

    def on_test_end(self, trainer, module) -> None:
        from efficient_attn_tasks.run.distributed import all_gather_objects

        self.test_sentences_per_process = all_gather_objects(self.test_sentences)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if self.check_features:
            for buf in (b for n, b in module.named_buffers() if n.endswith("projection")):
                gathered = trainer.strategy.all_gather(buf)  # (world, m, d)
                if gathered.dim() == 3 and not all(torch.equal(gathered[0], g) for g in gathered[1:]):
                    self.feature_mismatches += 1


class KillAt(pl.Callback):
    """SIGKILL this process at the end of training step ``step`` (no chance to save anything)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- scenarios
def resume_after_kill(work: Path, steps: int = 12, kill_at: int = 8, every: int = 5,
                      extra: Sequence[str] = ()) -> dict[str, Any]:
    """Uninterrupted run vs. a run SIGKILLed at ``kill_at`` and resumed with ckpt_path=last."""
    attention = [] if any(e.startswith("attention=") for e in extra) else FAVOR
    overrides = [*TINY, *attention, "model.dropout=0.1", f"trainer.max_steps={steps}", f"checkpoint_every={every}",
                 *extra]
    full = StepLog()
    run(compose_config(overrides), work / "uninterrupted", callbacks=[full])
    killed = work / "killed"
    proc = _python(["run", str(killed), "--kill-at", str(kill_at), *overrides])
    resumed = StepLog()
    record = run(compose_config([*overrides, "ckpt_path=last"]), killed, callbacks=[resumed])
    start = steps - len(resumed.losses)
    diffs = [abs(a - b) for a, b in zip(full.losses[start:], resumed.losses)]
    return {"returncode": proc.returncode, "resumed_at_step": start, "resumed_steps": len(resumed.losses),
            "steps": record.steps, "max_abs_loss_diff": max(diffs), "bit_identical": max(diffs) == 0.0,
            "losses_full": full.losses, "losses_resumed": resumed.losses}


def resume_after_sigterm(work: Path, steps: int = 300, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The console command, SIGTERMed once it has a checkpoint, then re-run with ckpt_path=last."""
    overrides = [*TINY, "logger=wandb", f"trainer.max_steps={steps}", "checkpoint_every=2"]
    env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    cmd = [sys.executable, "-m", "efficient_attn_tasks.commands.train", *overrides]
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    while not list(work.glob("outputs/*/*/checkpoints/last.ckpt")) and time.monotonic() - start < 120:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    first_out, _ = proc.communicate(timeout=120)
    second = subprocess.run([*cmd, "ckpt_path=last"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    run_dirs = sorted(p.parent for p in work.glob("outputs/*/*/.hydra"))
    results = run_dirs[-1] / RESULTS_JSON
    record = RunRecord.read(results) if results.exists() else RunRecord()
    wandb_runs = sorted(p.name for p in run_dirs[-1].glob("wandb/offline-run-*"))
    return {"first_returncode": proc.returncode, "second_returncode": second.returncode,
            "run_dirs": len(run_dirs), "steps": record.steps, "resumed_from": record.resumed_from,
            "wandb_runs": wandb_runs, "same_wandb_id": len({r.rsplit("-", 1)[-1] for r in wandb_runs}) == 1,
            "interrupt_message": [ln for ln in first_out.splitlines() if "interrupted at step" in ln],
            "second_output": second.stdout[-2000:] + second.stderr[-2000:]}


SWEEP = [*TINY, "trainer.max_steps=2", "model.max_len=64,16,64"]  # job 1's model is too short for the ListOps data


def sweep_with_a_failing_job(work: Path, launcher: str = "basic", resume: bool = True) -> dict[str, Any]:
    """``efficient-attn-train -m`` over 3 jobs whose middle one fails when its model is built (model.max_len
    below the ListOps lengths; Hydra's basic or joblib launcher), with ``resume`` the same command plus
    ``ckpt_path=last``, then ``efficient-attn-report`` on the sweep: exit codes, each job's status, the
    summary's failed-jobs lines, which jobs the resumed sweep ran again (results.json rewritten), the report."""
    sweep = work / "sweep"
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    cmd = [sys.executable, "-m", "efficient_attn_tasks.commands.train", "-m", *SWEEP, *extra,
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    work.mkdir(parents=True, exist_ok=True)
    first = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    records = {p.parent.name: RunRecord.read(p) for p in sorted(sweep.glob("*/results.json"))}
    written = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    resumed = subprocess.run([*cmd, "ckpt_path=last"], cwd=work, env=env, capture_output=True, text=True,
                             timeout=600) if resume else None
    rerun = sorted(p.parent.name for p in sweep.glob("*/results.json")
                   if p.stat().st_mtime_ns != written.get(p.parent.name))
    table = io.StringIO()
    with contextlib.redirect_stdout(table), contextlib.suppress(SystemExit):  # no run dirs: an empty report
        report.main([str(sweep), "--rows", "attention,config.model.max_len"])
    lines = first.stdout.splitlines()
    start = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("Failed jobs")), len(lines))
    listed = list(itertools.takewhile(lambda ln: ln.startswith("  "), lines[start:]))  # "  <run dir>: <error>"
    return {"launcher": launcher, "returncode": first.returncode,
            "resumed_returncode": resumed.returncode if resumed else None,
            "statuses": {name: r.status for name, r in records.items()},
            "failed": {name: r.to_dict() for name, r in records.items() if r.failed},
            "summary_failed": [ln.strip() for ln in listed],
            "rerun": rerun, "report": table.getvalue(),
            "output": first.stdout[-3000:] + first.stderr[-3000:]}


def ddp_vs_single(work: Path, steps: int = 8, devices: int = 2) -> dict[str, Any]:
    """The same global batch on 1 process and on ``devices`` gloo processes: final weights and val loss."""
    overrides = [*TINY, *FAVOR, "attention.kwargs.redraw_interval=2", "model.dropout=0.0",
                 f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.val_check_interval=1.0"]
    out = {}
    for n in (1, devices):
        extra = ["trainer=ddp", f"trainer.devices={n}"] if n > 1 else []
        proc = _python(["run", str(work / f"p{n}"), "--check-features", *overrides, *extra])
        if proc.returncode != 0:
            raise RuntimeError(f"{n}-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out[n] = json.loads((work / f"p{n}" / "faults.json").read_text())
    one, many = (torch.load(work / f"p{n}" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                 for n in (1, devices))
    param_diff = _max_abs_diff(one, many)
    return {"devices": devices, "steps": out[devices]["steps"], "max_abs_param_diff": param_diff,
            "val_loss": {n: out[n]["val_last"].get("val/loss") for n in out},
            "feature_mismatches": out[devices]["feature_mismatches"]}


# Synthetic translation, 7 sentences a batch: on 2 processes 4 and 3 (uneven tokens); val and test of 15
# sentences make 3 batches (7, 7, 1): one process decodes two of them, the other one. Float64: in float32 the
# key-projection biases, whose exact gradient is 0 under softmax, get rounding noise that Adam scales to ~lr.
TRANSLATION = ["task=translation", "task.source=synthetic", "task.synthetic_sizes=[64,15,15]", "task.vocab_size=40",
               "task.synthetic_length=[2,12]", "task.batch_size=7", "task.beam_size=3", "model=tiny",
               "model.dropout=0.0", "logger=none", "threads=1", "optim.warmup_steps=1", "trainer.accelerator=cpu",
               "trainer.precision=64-true", "trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
               "trainer.log_every_n_steps=1"]


def translation_ddp_vs_single(work: Path, steps: int = 6, devices: int = 2) -> dict[str, Any]:
    """Translation on 1 process ("one") and on ``devices`` gloo processes ("many"; same global batches, uneven
    tokens per process): final weights, val loss and BLEU, tokens counted. Then a ``devices``-process run
    ("same_weights") resumes the 1-process run at its last step (so trains no further) and tests its best
    checkpoint: beam BLEU and test_hypotheses.txt on the same weights as the 1-process run's test."""
    overrides = [*TRANSLATION, f"trainer.max_steps={steps}"]
    ddp = ["trainer=ddp", f"trainer.devices={devices}"]
    runs = {"one": overrides, "many": [*overrides, *ddp],
            "same_weights": [*overrides, *ddp, f"ckpt_path={work / 'one' / 'checkpoints' / 'last.ckpt'}"]}
    records, decoded, hyps = {}, {}, {}
    for name, args in runs.items():
        proc = _python(["run", str(work / name), *args])
        if proc.returncode != 0:
            raise RuntimeError(f"{name} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        records[name] = RunRecord.read(work / name / RESULTS_JSON)
        decoded[name] = json.loads((work / name / "faults.json").read_text())["test_sentences_per_process"]
        hyps[name] = (work / name / "test_hypotheses.txt").read_text().splitlines()
    one, many = (torch.load(work / n / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                 for n in ("one", "many"))
    param_diff = max(float((one[k].double() - many[k].double()).abs().max()) for k in one if one[k].is_floating_point())
    val = lambda name, key: records[name].metrics.val_last.get(key)  # noqa: E731
    test = lambda name, key: records[name].metrics.test.get(key)  # noqa: E731
    trained, tested = ("one", "many"), ("one", "same_weights")
    return {"devices": devices, "steps": records["many"].steps, "max_abs_param_diff": param_diff,
            "val_loss": {n: val(n, "val/loss") for n in trained},
            "val_bleu": {n: val(n, "val/bleu") for n in trained},
            "train_tokens": {n: records[n].train_tokens for n in trained},
            "test_bleu": {n: test(n, "test/bleu") for n in tested},
            "test_loss": {n: test(n, "test/loss") for n in tested},
            "same_hypotheses": hyps["one"] == hyps["same_weights"], "hypotheses": len(hyps["same_weights"]),
            "test_sentences_per_process": decoded["same_weights"],
            "processes": {n: r.processes for n, r in records.items()},
            "same_weights_steps": records["same_weights"].steps}


def bf16_training(attentions: Sequence[str], work: Path, steps: int = 8, scale: float = 8.0) -> dict[str, dict]:
    """A few bf16-mixed training steps per attention config with embeddings scaled up (large q, k norms)."""
    out = {}
    for name in attentions:
        log = StepLog()
        cfg = compose_config([*TINY, f"attention={name}", "trainer.precision=bf16-mixed",
                              f"trainer.max_steps={steps}", "nonfinite=stop"])
        try:
            with _scaled_embeddings(scale):
                record = run(cfg, work / name, callbacks=[log])
            bad = sum(not torch.isfinite(torch.tensor(x)) for x in log.losses)
            out[name] = {"steps": record.steps, "nonfinite_losses": int(bad), "skipped": record.skipped_updates,
                         "last_loss": log.losses[-1], "error": None}
        except (FloatingPointError, ConfigError) as err:  # ConfigError: cannot serve ListOps' encoder
            out[name] = {"steps": None, "nonfinite_losses": None, "skipped": None, "last_loss": None,
                         "error": str(err)}
    return out


def fp16_overflow(work: Path, steps: int = 12, init_scale: float = 2.0**24,
                  callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """fp16 AMP with a gradient scaler whose initial scale overflows the fp16 gradients (``nonfinite=stop``).

    Lightning turns ``trainer.precision=16-mixed`` into bf16 on CPU, so the fp16 plugin and its scaler
    are built here (on the GPU when there is one). The scaler halves its scale at each skipped step
    and grows it only every 2000 good ones, so ``init_scale · 0.5**skipped == final_scale``.
    """
    from pytorch_lightning.plugins.precision import MixedPrecision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    log = StepLog()
    cfg = compose_config([*TINY, "trainer.precision=null", f"trainer.max_steps={steps}", "nonfinite=stop"])
    try:
        record = run(cfg, work, callbacks=[log, *callbacks],
                     plugins=[MixedPrecision("16-mixed", device, scaler=scaler)])
    except FloatingPointError as err:
        return {"steps": None, "scaler_skipped_steps": None, "skipped_updates": None, "precision": None,
                "init_scale": init_scale, "final_scale": scaler.get_scale(), "losses": log.losses, "error": str(err)}
    return {"steps": record.steps, "scaler_skipped_steps": record.scaler_skipped_steps,
            "skipped_updates": record.skipped_updates, "precision": record.precision, "init_scale": init_scale,
            "final_scale": scaler.get_scale(), "losses": log.losses, "error": None}


def _max_abs_diff(one: dict[str, torch.Tensor], many: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' floating-point tensors."""
    return max(float((one[k].double() - many[k].double()).abs().max()) for k in one if one[k].is_floating_point())


class _scaled_embeddings:
    """Multiply every token embedding's output by ``scale`` (queries and keys with large norms)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __enter__(self) -> None:
        from efficient_attn import transformer

        self.original = transformer.TokenEmbedding.forward
        scale, original = self.scale, self.original
        transformer.TokenEmbedding.forward = lambda module, *a, **k: original(module, *a, **k) * scale

    def __exit__(self, *exc: Any) -> None:
        from efficient_attn import transformer

        transformer.TokenEmbedding.forward = self.original

def _python(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "tools.faults", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)

