"""Continue a text with a trained byte-level language model (task=lm; loaded by checkpoint.py).

The prompt's UTF-8 bytes are read in one pass (``TransformerLM.prefill``), then each new byte costs one
``decode_step`` on the model's incremental state (:func:`efficient_attn.generate.sample`). Bytes are drawn from
softmax(logits / temperature) over the top-k most likely; temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
from typing import TextIO


def run(a: argparse.Namespace, out: TextIO) -> str:
    """Write the prompt and its continuation to ``out``; returns the continuation."""
    import torch

    from efficient_attn.generate import sample
    from efficient_attn_tasks.inference.checkpoint import ConfigError, device, load

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
