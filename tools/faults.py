"""Fault injection for the training stack: ``python -m tools.faults`` runs every scenario (tools/faults_scenarios.py,
tools/faults_inputs.py) and writes the Markdown report; ``python -m tools.faults run`` is the training a scenario
starts in a subprocess when the run must die mid-training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from efficient_attn_tasks.config.checks import CONFIG_DIR
from efficient_attn_tasks.run.fit import run
from tools.faults_inputs import bad_inputs, ctrl_c_and_resume, first_week_inputs, first_week_rows, same_run_dir_twice
from tools.faults_scenarios import (
    KillAt,
    StepLog,
    bf16_training,
    compose_config,
    ddp_vs_single,
    fp16_overflow,
    resume_after_kill,
    resume_after_sigterm,
    sweep_with_a_failing_job,
    translation_ddp_vs_single,
)


# ----------------------------------------------------------------------------- report
def write_report(args: argparse.Namespace) -> None:
    """Run every scenario under ``args.work`` and write the Markdown table to ``args.out``."""

    work, started = args.work, time.time()
    kill = resume_after_kill(work / "kill")
    term = resume_after_sigterm(work / "term")
    ddp = ddp_vs_single(work / "ddp")
    mt = translation_ddp_vs_single(work / "ddp_translation")
    attentions = sorted(p.stem for p in (Path(CONFIG_DIR) / "attention").glob("*.yaml"))
    bf16 = bf16_training(attentions, work / "bf16")
    fp16 = fp16_overflow(work / "fp16")
    bad = bad_inputs(work / "bad")
    sweeps = [sweep_with_a_failing_job(work / f"sweep_{launcher}", launcher) for launcher in ("basic", "joblib")]
    week = first_week_rows(same_run_dir_twice(work / "same_dir"), ctrl_c_and_resume(work / "ctrl_c"),
                           first_week_inputs(work / "first_week"))
    lines = [
        "# Reliability: faults injected and what happened",
        "",
        f"Made by `python -m tools.faults --out {args.out} --work {args.work}` on {_machine()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, in {time.time() - started:.0f} s. "
        "Tiny ListOps model (d_model 64, 2 layers), one thread.",
        "",
        "| fault | what happened |",
        "|---|---|",
        f"| SIGKILL at step {kill['resumed_at_step'] + 3} of {kill['steps']} (checkpoint every 5 steps; FAVOR+ "
        f"m=16 redrawn every 3 steps, dropout 0.1), re-run with `ckpt_path=last` | exit {kill['returncode']} "
        f"(killed); resumed at step {kill['resumed_at_step']}, trained {kill['resumed_steps']} steps to "
        f"{kill['steps']}; per-step loss vs. the uninterrupted run: max abs diff {kill['max_abs_loss_diff']:.3g} "
        f"({'bit-identical' if kill['bit_identical'] else 'not bit-identical'}) |",
        f"| SIGTERM to `efficient-attn-train` (W&B offline) once it had a checkpoint, then the same command with "
        f"`ckpt_path=last` | first exit {term['first_returncode']} "
        f"(`{(term['interrupt_message'] or ['no message'])[0]}`), second exit {term['second_returncode']}; "
        f"{term['run_dirs']} run dir, results.json steps {term['steps']}, W&B runs {term['wandb_runs']} "
        f"({'same id' if term['same_wandb_id'] else 'different ids'}) |",
        f"| DDP, {ddp['devices']} CPU processes (gloo) vs 1 process, same global batch (8), {ddp['steps']} "
        f"steps, FAVOR+ redrawn every 2 steps | max abs parameter diff {ddp['max_abs_param_diff']:.3g}; val loss "
        f"{ddp['val_loss'][1]:.6f} vs {ddp['val_loss'][ddp['devices']]:.6f}; FAVOR+ features differing across ranks "
        f"at {ddp['feature_mismatches']} step(s) |",
        f"| DDP translation, {mt['devices']} CPU processes (gloo) vs 1 process, same global batch (7 sentences: 4 "
        f"and 3 per process, uneven tokens), {mt['steps']} steps, float64, dropout 0; then {mt['devices']} "
        f"processes test the 1-process run's best checkpoint (beam 3, 15 sentences) | max abs parameter diff "
        f"{mt['max_abs_param_diff']:.3g}; training tokens counted {mt['train_tokens']['one']} vs "
        f"{mt['train_tokens']['many']}; val loss {mt['val_loss']['one']:.6f} vs {mt['val_loss']['many']:.6f}, "
        f"val BLEU {mt['val_bleu']['one']:.2f} vs {mt['val_bleu']['many']:.2f}; same weights: test BLEU "
        f"{mt['test_bleu']['one']:.4f} vs {mt['test_bleu']['same_weights']:.4f}, test_hypotheses.txt "
        f"{'identical' if mt['same_hypotheses'] else 'different'} ({mt['hypotheses']} lines); test sentences "
        f"decoded per process {mt['test_sentences_per_process']} |",
    ]
    for name, r in bf16.items():
        outcome = f"stopped: {r['error']}" if r["error"] is not None else (
            f"{r['steps']} steps, non-finite losses {r['nonfinite_losses']}, skipped updates {r['skipped']}, "
            f"last loss {r['last_loss']:.4f}")
        lines.append(f"| bf16-mixed, embeddings ×8 (large q, k norms), attention={name} | {outcome} |")
    outcome = (f"{fp16['steps']} steps, {fp16['scaler_skipped_steps']} skipped by the scaler (counted in "
               f"results.json `scaler_skipped_steps`; scale {fp16['init_scale']:.3g} → {fp16['final_scale']:.3g}), "
               f"guard incidents {fp16['skipped_updates']}, last loss {fp16['losses'][-1]:.4f}") \
        if fp16["error"] is None else f"stopped: {fp16['error']}"
    lines.append(f"| fp16-mixed with a gradient scaler (initial scale {fp16['init_scale']:.3g}: the first steps' "
                 f"gradients overflow), nonfinite=stop | {outcome} |")
    for r in bad:
        ok = "as expected" if r["returncode"] == r["expected"] else f"expected exit {r['expected']}"
        lines.append(f"| bad input: {r['input']} (`{r['overrides'][:200]}`) | exit {r['returncode']} ({ok}) "
                     f"after {r['seconds']:.0f} s: `{r['message'][:300]}` |")
    for r in sweeps:
        failed = "; ".join(f"{name} at step {f['steps']}: `{f['error']['type']}: {f['error']['message'][:200]}`"
                           for name, f in r["failed"].items()) or "none"
        lines.append(f"| one job of a 3-job sweep fails (`-m model.max_len=64,16,64`, {r['launcher']} launcher: "
                     f"job 1's model is shorter than the ListOps data) | statuses {r['statuses']}; failed record "
                     f"{failed}; summary lists {len(r['summary_failed'])} failed job(s); exit {r['returncode']}; "
                     f"the same command with `ckpt_path=last` re-ran {r['rerun']} (exit {r['resumed_returncode']}) |")
    lines += [
        "",
        "## A user's first week: before and after",
        "",
        "Each command run here as a user types it (W&B off, no network); the before column is quoted from where it "
        "was reported or measured, not run by this harness. More mistakes, measured by hand before and after, are "
        "in [reliability_door.md](reliability_door.md).",
        "",
        "| what was done | before (as reported / measured) | after (this run) |",
        "|---|---|---|",
        *week,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _machine() -> str:
    from efficient_attn_tasks.run.machine import hardware

    return hardware()





def _run_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.faults run")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--check-features", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    log = StepLog(check_features=args.check_features)
    callbacks = [log] + ([KillAt(args.kill_at)] if args.kill_at else [])
    record = run(compose_config(overrides), args.out_dir, callbacks=callbacks)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        (args.out_dir / "faults.json").write_text(json.dumps(
            {"steps": record.steps, "val_last": record.metrics.val_last, "losses": log.losses,
             "feature_mismatches": log.feature_mismatches,
             "test_sentences_per_process": log.test_sentences_per_process}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return _run_command(argv[1:])
    parser = argparse.ArgumentParser(description="Inject every fault on a tiny model; write a Markdown table.")
    parser.add_argument("--out", type=Path, default=Path("results/reliability.md"))
    parser.add_argument("--work", type=Path, default=Path("faults_work"))
    write_report(parser.parse_args(argv))


if __name__ == "__main__":
    main()
