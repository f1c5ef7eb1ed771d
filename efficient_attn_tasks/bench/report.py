"""Reporting half of the benchmark: log-log plot, Markdown summary with ratios and crossovers."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from efficient_attn_tasks.bench.flex import FLEX_BASELINES, FORWARD_ONLY
from efficient_attn_tasks.plots import Line, Panel, against_length


def memory_mib(row: dict[str, Any]) -> float | None:
    """Peak memory of a point: CUDA max allocated, else the process's peak RSS (what a user's
    machine must hold; the CSV also keeps ``base_rss_mib``, the RSS before the first call)."""
    if row.get("status") != "ok":
        return None
    if row.get("peak_cuda_mib") is not None:
        return row["peak_cuda_mib"]
    return row["peak_rss_mib"]


MODE_STYLE = (("noncausal", "-"), ("causal", "--"), ("decode", ":"))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Log-log time and memory vs L; one colour per attention, solid noncausal, dashed causal, dotted decoding."""
    x = "sequence length L"
    time = Panel(title="forward+backward time", xlabel=x, ylabel="seconds", yscale="log")
    memory = Panel(title="peak memory", xlabel=x, ylabel="MiB (CUDA max allocated, or process peak RSS)",
                   yscale="log", legend=False)
    decode = Panel(title="decoding: time per step (one token per sequence) after L", xlabel=x,
                   ylabel="milliseconds per step", yscale="log")
    for i, name in enumerate(dict.fromkeys(r["attention"] for r in rows)):
        for mode, style in MODE_STYLE:
            pts = [r for r in rows if r["attention"] == name and r["mode"] == mode and r["status"] == "ok"]
            series = [(decode, lambda r: r["time_s"] * 1e3), (memory, memory_mib)] if mode == "decode" else \
                [(time, lambda r: r["time_s"]), (memory, memory_mib)]
            for panel, value in series:
                xy = [(r["L"], value(r)) for r in pts if (value(r) or 0) > 0]
                if xy:
                    panel.lines.append(Line(f"{name} ({mode})", *zip(*xy), index=i, linestyle=style))
    kernel = any(r["mode"] in ("causal", "noncausal") for r in rows)
    decoding = any(r["mode"] == "decode" for r in rows)
    return against_length([p for p, shown in ((time, kernel), (memory, True), (decode, decoding)) if shown], path,
                          title)


def crossover(rows: list[dict[str, Any]], mode: str, name: str = "favor", reference: str = "sdpa") -> str:
    """Smallest L from which ``name`` beats ``reference`` at every larger measured L (failed reference = slower)."""
    def time_of(who: str, length: int) -> float | None:
        row = next((r for r in rows if (r["attention"], r["mode"], r["L"]) == (who, mode, length)), None)
        if row is None or row["status"] in ("", None):
            return None
        return row["time_s"] if row["status"] == "ok" else math.inf

    pairs = [(L, time_of(name, L), time_of(reference, L)) for L in sorted({r["L"] for r in rows})]
    pairs = [(L, f, s) for L, f, s in pairs if f is not None and s is not None and min(f, s) < math.inf]
    found = None
    for length, own, ref in reversed(pairs):
        if own >= ref:
            break
        found = length
    return f"L = {found}" if found else "not reached"


def summary(rows: list[dict[str, Any]], cfg: dict[str, Any], machine: str, peak: float | None) -> str:
    """Markdown: machine, matmul peak, favor vs baselines tables, ratios, crossover, efficiency."""
    cols = [(n, m) for n in ("favor", "performer_pytorch", "sdpa") for m in ("noncausal", "causal")]
    get = {(r["attention"], r["mode"], r["L"]): r for r in rows}
    lengths = cfg["lengths"]

    def cell(key: tuple, value: Callable[[dict], float | None], fmt: str) -> str:
        row = get.get(key)
        return "–" if row is None else (fmt.format(value(row)) if row["status"] == "ok" else row["status"])

    def ratio(a: tuple, b: tuple, value: Callable[[dict], float | None]) -> str:
        ra, rb = get.get(a), get.get(b)
        ok = ra and rb and ra["status"] == rb["status"] == "ok" and value(rb)
        return f"{value(ra) / value(rb):.2f}" if ok else "–"

    head = "| L | " + " | ".join(f"{n} {m}" for n, m in cols) + " |\n|" + "---|" * (len(cols) + 1)
    lines = [f"# Attention benchmark ({cfg['device']})", "", f"- machine: {machine}",
             f"- config: B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, m={cfg['num_features']}, "
             f"{cfg['dtype']}, {cfg['repeats']} timed repeats after 1 warm-up "
             "(median; 1 where a step takes over 20 s), forward+backward",
             f"- matmul peak ({cfg['matmul_size']}² {cfg['dtype']}): "
             + (f"{peak:.1f} GFLOP/s" if peak else "failed")]
    if any(r["mode"] != "decode" for r in rows):  # a decode-only run has no forward+backward tables
        lines += kernel_tables(rows, cfg, get, cols, cell, ratio, head)
        lines += flex_table(rows, lengths)
    lines += decode_table(rows, lengths, cfg["batch"])
    return "\n".join(lines) + "\n"


def kernel_tables(rows: list[dict[str, Any]], cfg: dict[str, Any], get: dict, cols: list[tuple], cell: Callable,
                  ratio: Callable, head: str) -> list[str]:
    """The forward+backward sections: favor against the baselines, ratios, crossover, every attention."""
    lengths = cfg["lengths"]
    lines = ["", "## Time (ms)", "", head]
    time_ms = lambda r: r["time_s"] * 1e3  # noqa: E731
    lines += [f"| {L} | " + " | ".join(cell((n, m, L), time_ms, "{:.1f}") for n, m in cols) + " |" for L in lengths]
    lines += ["", "## Peak memory (MiB; " + ("CUDA max allocated" if cfg["device"] != "cpu"
              else "process peak RSS, torch and inputs included") + ")", "", head]
    lines += [f"| {L} | " + " | ".join(cell((n, m, L), memory_mib, "{:.0f}") for n, m in cols) + " |" for L in lengths]
    lines += ["", "## Ratios", "", "| L | perf/favor time nc | perf/favor time c | favor c/nc time | "
              "perf/favor mem nc | perf/favor mem c | favor c/nc mem |", "|" + "---|" * 7]
    for L in lengths:
        f_nc, f_c = ("favor", "noncausal", L), ("favor", "causal", L)
        p_nc, p_c = ("performer_pytorch", "noncausal", L), ("performer_pytorch", "causal", L)
        t = lambda r: r["time_s"]  # noqa: E731
        vals = [ratio(p_nc, f_nc, t), ratio(p_c, f_c, t), ratio(f_c, f_nc, t),
                ratio(p_nc, f_nc, memory_mib), ratio(p_c, f_c, memory_mib), ratio(f_c, f_nc, memory_mib)]
        lines.append(f"| {L} | " + " | ".join(vals) + " |")
    frac = get.get(("favor", "noncausal", 8192), {}).get("frac_of_matmul")
    lines += ["", f"- favor faster than sdpa from (noncausal): {crossover(rows, 'noncausal')}",
              f"- favor faster than sdpa from (causal): {crossover(rows, 'causal')}",
              "- favor noncausal at L=8192: " + (f"{frac:.1%} of matmul peak" if frac else "not measured")]
    lines += against_references(rows, [L for L in (4096, 16384) if L in lengths] or lengths[-2:])
    return lines


REFERENCES = ("softmax", "favor")


def against_references(rows: list[dict[str, Any]], lengths: list[int]) -> list[str]:
    """Every attention's forward+backward time at ``lengths``, and its ratio to softmax and favor
    (same mode, same run; > 1 = slower than the reference)."""
    get = {(r["attention"], r["mode"], r["L"]): r for r in rows}
    names = list(dict.fromkeys(r["attention"] for r in rows if r["mode"] in ("causal", "noncausal")))
    if not names:
        return []

    def show(row: dict | None) -> str:
        return "–" if row is None else (f"{row['time_s'] * 1e3:.1f}" if row["status"] == "ok" else row["status"])

    def ratio(row: dict | None, ref: dict | None) -> str:
        ok = row and ref and row["status"] == ref["status"] == "ok"
        return f"{row['time_s'] / ref['time_s']:.2f}×" if ok else "–"

    head = ["| attention | mode |"] + [f" L={L} ms | ÷softmax | ÷favor |" for L in lengths]
    lines = ["", "## Every attention against softmax and favor (forward+backward, same run)", "",
             "".join(head), "|" + "---|" * (2 + 3 * len(lengths))]
    for name in names:
        for mode in ("noncausal", "causal"):
            cells = []
            for L in lengths:
                row = get.get((name, mode, L))
                cells += [show(row), *(ratio(row, get.get((ref, mode, L))) for ref in REFERENCES)]
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return lines


def flex_table(rows: list[dict[str, Any]], lengths: list[int]) -> list[str]:
    """The forward alone (no autograd, ms) of sliding_window against ``flex_window`` and of softmax against
    ``flex`` (compiled FlexAttention, :mod:`~efficient_attn_tasks.bench.flex`), with their ratios (same run;
    > 1 = ours slower) and sdpa's forward beside them; nothing when the run has no FlexAttention row."""
    get = {(r["attention"], r["mode"], r["L"]): r for r in rows}
    flexed = {r["mode"] for r in rows if r["attention"] in FLEX_BASELINES}
    modes = [m for m in ("causal", "noncausal") if m in flexed]
    if not modes:
        return []

    def forward_s(key: tuple) -> float | None:
        row = get.get(key)
        return row.get("forward_s") if row and row["status"] in ("ok", FORWARD_ONLY) else None

    def show(key: tuple) -> str:
        row, seconds = get.get(key), forward_s(key)
        return f"{seconds * 1e3:.1f}" if seconds else ("–" if row is None else row["status"])

    def ratio(ours: tuple, flex: tuple) -> str:
        a, b = forward_s(ours), forward_s(flex)
        return f"{a / b:.2f}×" if a and b else "–"

    lines = ["", "## Forward alone against compiled FlexAttention (ms, no autograd, same run)", "",
             "flex_window: sliding_window's band (same window and convention); flex: softmax attention; both "
             "torch.compile'd, compiled and block mask built before the timing. ÷ = ours / FlexAttention's "
             "(> 1: ours slower).", "",
             "| mode | L | sliding_window | flex_window | ÷ | softmax | flex | ÷ | sdpa |", "|" + "---|" * 9]
    for mode in modes:
        for L in lengths:
            key = {n: (n, mode, L) for n in ("sliding_window", "flex_window", "softmax", "flex", "sdpa")}
            cells = [show(key["sliding_window"]), show(key["flex_window"]),
                     ratio(key["sliding_window"], key["flex_window"]), show(key["softmax"]), show(key["flex"]),
                     ratio(key["softmax"], key["flex"]), show(key["sdpa"])]
            lines.append(f"| {mode} | {L} | " + " | ".join(cells) + " |")
    return lines


def decode_table(rows: list[dict[str, Any]], lengths: list[int], batch: int = 1) -> list[str]:
    """Decoding: ms per step (one token for each of the B sequences) after an L-token prefix, the
    state one layer keeps, the speed-up over the registry's softmax KV cache (same run), and the
    prefix length from which each attention decodes faster than softmax and than sdpa's
    preallocated cache."""
    get = {(r["attention"], r["L"]): r for r in rows if r["mode"] == "decode"}
    names = list(dict.fromkeys(name for name, _ in get))
    if not names:
        return []
    lines = ["", f"## Decoding (ms per step of B = {batch} tokens after an L-token prefix · state MiB per layer · "
             "speed-up over softmax)", "",
             "| attention | " + " | ".join(f"L={L}" for L in lengths) + " |", "|" + "---|" * (1 + len(lengths))]
    for name in names:
        cells = []
        for L in lengths:
            row, ref = get.get((name, L)), get.get(("softmax", L))
            if row is None or row["status"] != "ok":
                cells.append("–" if row is None else row["status"])
                continue
            speed = f" · {ref['time_s'] / row['time_s']:.1f}×" if ref and ref["status"] == "ok" else ""
            cells.append(f"{row['time_s'] * 1e3:.3g} · {row['state_mib']:.3g}{speed}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Faster per token than softmax's KV cache / than sdpa's preallocated cache from (every longer "
              "prefix too):", ""]
    lines += [f"- {name}: {crossover(rows, 'decode', name, 'softmax')} / {crossover(rows, 'decode', name, 'sdpa')}"
              for name in names if name not in ("softmax", "sdpa")]
    return lines


def machine_info(device: str, threads: int) -> tuple[str, str]:
    """(description, file-name slug) of the device."""
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
        return f"{gpu}; host {desc}", re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    return desc, "cpu"
