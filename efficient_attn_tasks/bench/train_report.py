"""The train mode's report: the PNG (tokens/s, attention share and peak memory against L) and the Markdown
summary (tables, ratios to softmax with the ones inside its drift marked as noise, the L from which each
attention trains faster), from measured rows or, with ``--summarize``, from a saved ``train_<device>.csv``.
The measuring side is :mod:`efficient_attn_tasks.bench.train`. No torch at module level.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

from efficient_attn_tasks.bench.report import crossover, memory_mib
from efficient_attn_tasks.bench.train import PROFILE_STEPS, REFERENCE, VOCAB
from efficient_attn_tasks.plots import Line, Panel, against_length


def report(rows: list[dict[str, Any]], cfg: dict[str, Any], machine: str, png: Path, md: Path) -> list[Path]:
    """Draw the PNG and write (and print) the summary of measured ``rows``; return their paths."""
    plot(rows, png, f"{machine} · {model_text(cfg)}")
    text = summary(rows, cfg, machine)
    md.write_text(text)
    print(text)
    return [png, md]


def _value(text: str) -> Any:
    """A CSV cell as the run wrote it: int, float, text, or None for an empty cell."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text or None


def _summary_machine(md: Path) -> str:
    """The ``- machine:`` line of an existing summary (for a CSV without a ``machine`` column)."""
    lines = md.read_text().splitlines() if md.exists() else []
    found = (line.removeprefix("- machine: ") for line in lines if line.startswith("- machine: "))
    return next(found, "unknown machine")


def rebuild(out: Path) -> list[Path]:
    """Redraw the PNG and rewrite the summary of every ``train_<device>.csv`` in ``out`` from the CSV alone
    (no point is measured again): for a change in how the results are summarised. The machine is the
    CSV's ``machine`` column or, in a CSV without one, the summary's ``- machine:`` line."""
    paths: list[Path] = []
    for path in sorted(out.glob("train_*.csv")):
        slug = path.stem.removeprefix("train_")
        rows = [{key: _value(value) for key, value in row.items()} for row in csv.DictReader(open(path))]
        md = out / f"train_summary_{slug}.md"
        first = rows[0]
        machine = first.get("machine") or _summary_machine(md)
        cfg = {key: first[key] for key in ("tokens_per_batch", "d_model", "layers", "d_ff", "dtype", "device",
                                           "warmup", "steps")}
        cfg |= {"train_heads": first["heads"], "lengths": list(dict.fromkeys(r["L"] for r in rows))}
        if len({r["batch"] for r in rows}) == 1 and len({r["tokens_per_batch"] for r in rows}) > 1:
            cfg["train_batch"] = first["batch"]  # a --train-batch run: the batch is fixed, the tokens grow
        if all(r.get("attention_share") is None for r in rows):
            cfg["profile_steps"] = 0
        paths += report(rows, cfg, machine, out / f"train_{slug}.png", md)
    if not paths:
        raise SystemExit(f"efficient-attn-bench: no train_<device>.csv in {out} to summarise")
    return paths


def drift(rows: list[dict[str, Any]]) -> list[str]:
    """Summary lines: the reference measured first and again after the other attentions at each L; a ratio
    to it inside that change is within the machine's drift, i.e. noise ([] when nothing was re-checked)."""
    checked = [r for r in rows if r["attention"] == REFERENCE and r.get("recheck_tokens_per_s")]
    if not checked:
        return []
    changes = [r["recheck_tokens_per_s"] / r["tokens_per_s"] - 1 for r in checked]
    return ["", f"Drift: {REFERENCE} measured first at each L and again after the other attentions at that L "
            "(a ratio to it within this change is noise):", "",
            "| L | first (tokens/s) | re-check (tokens/s) | change |", "|---|---|---|---|",
            *(f"| {r['L']} | {r['tokens_per_s']:.0f} | {r['recheck_tokens_per_s']:.0f} | {c:+.1%} |"
              for r, c in zip(checked, changes)),
            "", f"Largest change: {max(changes, key=abs):+.1%}."]


def model_text(cfg: dict[str, Any]) -> str:
    tokens = f"batch {cfg['train_batch']} (B·L tokens)" if cfg.get("train_batch") else \
        f"{cfg['tokens_per_batch']} tokens/batch"
    return (f"TransformerLM {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['train_heads']} heads, "
            f"d_ff {cfg['d_ff']}, {tokens}, {cfg['dtype']}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Tokens/s, attention share and peak memory against L; one colour per attention, the reference black."""
    x = "context length L"
    panels = ((lambda r: r["tokens_per_s"], Panel(title="training throughput", xlabel=x, ylabel="tokens / s",
                                                  yscale="log")),
              (lambda r: r["attention_share"], Panel(title="share of step time in the core attention (fwd+bwd)",
                                                     xlabel=x, ylabel="fraction", ylim=(0, 1), legend=False)),
              (memory_mib, Panel(title="peak memory", xlabel=x, ylabel="MiB (CUDA max allocated, or process peak RSS)",
                                 yscale="log", legend=False)))
    for i, name in enumerate(dict.fromkeys(r["attention"] for r in rows)):
        pts = [r for r in rows if r["attention"] == name and r["status"] == "ok"]
        for value, panel in panels:
            xy = [(r["L"], value(r)) for r in pts if (value(r) or 0) > 0]
            if xy:  # past ten names the colours repeat, dashed
                panel.lines.append(Line(name, *zip(*xy), index=i, linestyle="-" if i < 10 else "--",
                                        reference=name == REFERENCE))
    return against_length([panel for _, panel in panels], path, title)


def summary(rows: list[dict[str, Any]], cfg: dict[str, Any], machine: str) -> str:
    """Markdown: the setup, then per attention tokens/s (and the L from which it trains faster than
    softmax, same run), attention share and peak memory at every L."""
    get = {(r["attention"], r["L"]): r for r in rows}
    names = list(dict.fromkeys(r["attention"] for r in rows))
    lengths = cfg["lengths"]
    head = "| attention | " + " | ".join(f"L={L}" for L in lengths) + " |"

    def table(value: Callable[[dict], Any], fmt: str, extra: Callable[[str], str] | None = None) -> list[str]:
        lines = [head + (" faster than softmax from |" if extra else ""),
                 "|" + "---|" * (1 + len(lengths) + bool(extra))]
        for name in names:
            cells = []
            for L in lengths:
                row = get.get((name, L))
                ok = row is not None and row["status"] == "ok"
                cells.append((fmt.format(value(row)) if value(row) is not None else "–") if ok
                             else "–" if row is None else row["status"])
            lines.append(f"| {name} | " + " | ".join(cells) + " |" + (f" {extra(name)} |" if extra else ""))
        return lines

    # the reference's faster measurement at each L (first, or its re-check): "faster than softmax" must beat both
    fastest = [r | {"time_s": min(r["time_s"], r["batch"] * r["L"] / r["recheck_tokens_per_s"])}
               if r["attention"] == REFERENCE and r["status"] == "ok" and r.get("recheck_tokens_per_s") else r
               for r in rows]

    def faster(name: str) -> str:
        return "(reference)" if name == REFERENCE else crossover(fastest, "train", name=name, reference=REFERENCE)

    def ratio(row: dict[str, Any]) -> str:
        ref = get.get((REFERENCE, row["L"]))
        if ref is None or ref["status"] != "ok":
            return "–"
        band = sorted([ref["tokens_per_s"], ref.get("recheck_tokens_per_s") or ref["tokens_per_s"]])
        noise = "~" if row["attention"] != REFERENCE and band[0] <= row["tokens_per_s"] <= band[1] else ""
        return f"{noise}{row['tokens_per_s'] / ref['tokens_per_s']:.2f}×"

    memory = "CUDA max allocated" if cfg["device"] != "cpu" else "process peak RSS, torch and model included"
    batch = f"batch {cfg['train_batch']} at every L (B·L tokens per step)" if cfg.get("train_batch") else \
        f"batch = {cfg['tokens_per_batch']} / L"
    profiled = cfg.get("profile_steps", PROFILE_STEPS)
    share = (f"median of {profiled} further steps timed with module hooks (device synchronized at each boundary)"
             if profiled else "not measured (--profile-steps 0)")
    lines = [f"# Training throughput against context length ({cfg['device']})", "", f"- machine: {machine}",
             f"- model: {model_text(cfg)}; byte vocabulary ({VOCAB}), dropout 0.1, AdamW, random tokens; "
             f"{batch}",
             f"- {cfg['warmup']} warm-up step(s), then {cfg['steps']} timed step(s) (median; forward, backward, "
             "optimizer step)",
             f"- attention share: core attention (projections excluded) forward+backward time ÷ step time, {share}",
             "- faster than softmax from: the smallest L from which the attention's step is faster than softmax's at "
             "every larger measured L (same run; a softmax point that failed counts as slower; where softmax was "
             "re-checked, faster than both of its measurements)",
             "", "## Tokens per second", "", *table(lambda r: r["tokens_per_s"], "{:.0f}", faster), *drift(rows),
             "", f"## Tokens per second ÷ {REFERENCE}'s (same L, same run; ~ = between {REFERENCE}'s two "
             "measurements, i.e. within the drift: noise)", "", *table(ratio, "{}"),
             "", "## Share of step time in the core attention", "", *table(lambda r: r["attention_share"], "{:.0%}"),
             "", f"## Peak memory (MiB; {memory})", "", *table(memory_mib, "{:.0f}")]
    return "\n".join(lines) + "\n"
