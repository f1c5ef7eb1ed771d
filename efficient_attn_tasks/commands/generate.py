"""``efficient-attn-generate``: continue a text with a trained byte-level language model (task=lm).

The prompt's UTF-8 bytes are read in one pass (``TransformerLM.prefill``), then each new byte costs one
``decode_step`` on the model's incremental state: a constant-size running sum for kernel attentions
(FAVOR+, linear, ...), a key/value cache that grows with the text for softmax
(:func:`efficient_attn.generate.sample`). Bytes are drawn from softmax(logits / temperature) over the
top-k most likely; ``--temperature 0`` is greedy. The checkpoint runs alone (efficient_attn_tasks/run/checkpoint.py).

Building the parser imports neither torch nor Lightning (``--help`` is fast); generating imports them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from efficient_attn_tasks.commands.cli import parser as cli_parser

EXAMPLES = (
    "efficient-attn-generate outputs/<date>/<run> --prompt 'ROMEO:'       # its best checkpoint, 200 bytes",
    "efficient-attn-generate <run>/checkpoints/last.ckpt --prompt 'To be' --max-new-tokens 500 --top-k 10",
    "efficient-attn-generate <run> --prompt 'KING' --temperature 0         # greedy: the most likely bytes",
)
OUTPUTS = (
    "stdout: the prompt followed by its continuation (bytes that are not UTF-8 shown as U+FFFD)",
    "stderr: errors only (error: ..., exit status 2)",
)


def parser() -> argparse.ArgumentParser:
    p = cli_parser("efficient-attn-generate", "Continue a text with a trained byte-level language model "
                   "(task=lm), one byte per decoding\nstep on the model's incremental state. The checkpoint "
                   "runs alone.", EXAMPLES, OUTPUTS)
    p.add_argument("checkpoint", type=Path, help="an lm .ckpt file, or a run dir (its best checkpoint)")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline, i.e. a line's start)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="bytes to generate")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy; < 1 sharper, > 1 flatter")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="draw among the K most likely bytes; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (the same seed, the same text)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if there is one")
    return p


def main(argv: list[str] | None = None) -> None:
    """With no arguments at all, the help."""
    if argv is None and len(sys.argv) == 1:
        parser().print_help()
        return
    a = parser().parse_args(argv)
    from efficient_attn_tasks.run.checkpoint import command_errors  # torch loads here

    with command_errors():
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(encoding="utf-8")
        run(a, sys.stdout)


def run(a: argparse.Namespace, out: TextIO) -> str:
    """Write the prompt and its continuation to ``out``; returns the continuation."""
    import torch

    from efficient_attn.generate import sample

    from efficient_attn_tasks.run.checkpoint import ConfigError, device, load

    loaded = load(a.checkpoint)
    if loaded.cfg.task.name != "lm":
        raise ConfigError(f"{loaded.path} is a {loaded.cfg.task.name} checkpoint; efficient-attn-generate continues "
                          "text with a byte-level language model (task=lm)")
    if a.max_new_tokens < 0 or a.temperature < 0 or a.top_k < 0:
        raise ConfigError("--max-new-tokens, --temperature and --top-k must be >= 0")
    prompt = a.prompt.encode("utf-8")
    model = loaded.module.model.to(device(a.device))
    limit = model.cfg.max_len
    if not prompt or len(prompt) + a.max_new_tokens > limit:
        raise ConfigError(f"--prompt ({len(prompt)} bytes) plus --max-new-tokens {a.max_new_tokens} must be 1 to "
                          f"{limit} positions (this model's model.max_len); shorten one of them")
    on = next(model.parameters()).device
    tokens = torch.tensor([list(prompt)], device=on)  # (1, T)
    generator = torch.Generator(on).manual_seed(a.seed)
    new = sample(model, tokens, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, generator=generator)
    text = bytes(new[0].tolist()).decode("utf-8", errors="replace")
    out.write(a.prompt + text + "\n")
    out.flush()
    return text


if __name__ == "__main__":
    main()
