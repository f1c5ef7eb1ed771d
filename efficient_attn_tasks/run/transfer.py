"""Stage one of a conversion (``init_from=<softmax run> transfer_steps=N``): before the fine-tune, N optimizer steps
that train only the new attention cores' own parameters against the checkpoint's softmax attention.

Each step reads one training batch, runs the model in eval mode (no dropout) inside
:class:`~efficient_attn.transfer.AttentionTransfer` (every core outputs exact softmax attention, so each layer
sees the checkpoint's activations, and adds its transfer loss: Hedgehog's distillation cross-entropy, else the
MSE of its output against softmax's) and steps AdamW (constant ``transfer_lr``, else ``optim.lr``; no weight
decay) on the cores' parameters alone; nothing else gets a gradient. The fine-tune (``trainer.max_steps`` steps,
every weight, the task's loss, a fresh optimizer and schedule) starts after it at step 0. What it did goes to
the log (``transfer/loss``, ``transfer/step``), the console, ``transfer.json`` in the run dir and results.json
(``transfer``); a resumed run (``ckpt_path=last`` with a last.ckpt) holds its effect in its weights and reads
``transfer.json`` instead of running it again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from efficient_attn.transfer import AttentionTransfer, check_transfer, transfer_cores, transfer_parameters
from efficient_attn_tasks.config.checks import ConfigError
from efficient_attn_tasks.config.schema import attention_spec

TRANSFER_JSON = "transfer.json"
LINES = 5  # progress lines printed over the stage


def check_teacher(source_cfg: DictConfig, steps: int, sites: Sequence[str]) -> None:
    """Stage one's target is plain softmax attention: refuse (one line) a checkpoint whose attention at some
    site is anything else (another variant, softmax with options or layer options)."""
    for site in sites:
        try:
            specs = attention_spec(source_cfg, site)
        except (TypeError, ValueError):
            specs = None
        for spec in specs if isinstance(specs, list) else [specs]:
            if spec is None or spec.name != "softmax" or spec.kwargs or any(spec.layer.values()):
                what = "an attention this code cannot resolve" if spec is None else f"{spec.name} {spec.kwargs}"
                raise ConfigError(f"transfer_steps={steps} trains the new attention against the checkpoint's "
                                  f"softmax attention, but init_from's {site} attention is {what}; start from a "
                                  "plain softmax run or set transfer_steps=0")


def run_transfer(module: Any, datamodule: Any, cfg: DictConfig, device: torch.device, logger: Any,
                 out_dir: Path) -> dict[str, Any]:
    """Stage one on ``module`` (weights already converted); returns its record (also written to transfer.json).

    A model whose attentions have no trainable tensors of their own (FAVOR+, linear) skips it with one line.
    """
    steps = int(cfg.transfer_steps)
    cores = transfer_cores(module)
    if not cores:
        print(f"transfer_steps={steps}: the new attention has no trainable tensors of its own; stage one skipped")
        return _save({"steps": 0, "requested": steps, "skipped": "no trainable attention tensors"}, out_dir)
    params = transfer_parameters(module)
    lr = float(cfg.transfer_lr if cfg.get("transfer_lr") is not None else cfg.optim.lr)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=0.0)
    try:
        check_transfer(module)
    except ValueError as err:  # a layer with options: the core alone has no softmax target
        raise ConfigError(f"transfer_steps={steps}: {err}; set transfer_steps=0") from None
    trained = {id(p) for p in params}
    flags = {p: p.requires_grad for p in module.parameters()}
    for p in module.parameters():
        p.requires_grad_(id(p) in trained)
    was_training, first, losses, start = module.training, None, [], time.perf_counter()
    module.to(device).eval()
    datamodule.setup("fit")
    try:
        with AttentionTransfer(module) as transfer:
            for step, batch in enumerate(_batches(datamodule, steps)):
                module(module.transfer_batch_to_device(batch, device, 0))
                loss = transfer.take()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                first = value if first is None else first
                losses.append(value)
                if logger:
                    logger.log_metrics({"transfer/loss": value, "transfer/step": step}, step=step)
                if step % max(1, steps // LINES) == 0 or step == steps - 1:
                    print(f"transfer step {step + 1}/{steps}: loss {value:.4g}", flush=True)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        module.train(was_training)
    tail = losses[-max(1, len(losses) // 10):]  # the last tenth's mean: one batch's loss is noisy
    record = {"steps": len(losses), "lr": lr, "cores": len(cores), "parameters": sum(p.numel() for p in params),
              "first_loss": first, "final_loss": losses[-1], "final_loss_mean": sum(tail) / len(tail),
              "time_s": round(time.perf_counter() - start, 3)}
    print(f"transfer: {len(losses)} steps on {len(cores)} attention cores ({record['parameters']} parameters), "
          f"loss {first:.4g} -> {record['final_loss_mean']:.4g}; fine-tune starts at step 0")
    return _save(record, out_dir)


def read_transfer(out_dir: Path) -> dict[str, Any] | None:
    """The stage-one record an earlier attempt of this run wrote (a resumed run's), else None."""
    path = out_dir / TRANSFER_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def _batches(datamodule: Any, steps: int) -> Any:
    """``steps`` training batches, epoch after epoch (each epoch's order from the run's seed, as in training)."""
    done, loader = 0, datamodule.train_dataloader()
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def _save(record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRANSFER_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def transfer_stage(cfg: DictConfig, started: bool, resumed: bool, module: Any, datamodule: Any, trainer: Any,
                   logger: Any, out_dir: Path) -> dict[str, Any] | None:
    """What ``run`` does about stage one: run it on a run that ``started`` from init_from's weights, read its
    record on a ``resumed`` one (its weights hold it), else nothing (None)."""
    if not cfg.get("transfer_steps"):
        return None
    if resumed:
        return read_transfer(out_dir)
    if not started:
        return None
    if trainer.world_size > 1:
        raise ConfigError(f"transfer_steps={cfg.transfer_steps} runs on one device; run the transfer stage with "
                          "trainer.devices=1 (then resume the fine-tune on more with ckpt_path=last)")
    return run_transfer(module, datamodule, cfg, trainer.strategy.root_device, logger, out_dir)
