"""Benchmark mode ``train``: end-to-end LM training throughput of every attention against context L.

A byte-level :class:`~efficient_attn.transformer.TransformerLM` trains on random tokens with the tokens per
batch fixed (batch = tokens / L), so only the attention's cost changes with L; or (``--train-batch B``)
with the batch fixed, so the tokens per step grow with L (B·L): the series where a quadratic attention's
memory grows faster than the tokens and a linear-time one's must not. Owns the train mode's options,
the worker that times one point (tokens/s, peak memory, and the share of the step spent in the core attention:
:class:`AttentionClock`), the series run one L at a time (softmax re-checked at each L to show the machine's
drift) and their CSV. The report is :mod:`efficient_attn_tasks.bench.train_report`. No torch at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from efficient_attn_tasks.bench import points
from efficient_attn_tasks.bench.flex import FLEX_BASELINES
from efficient_attn_tasks.bench.sdpa import SDPA_BACKENDS, sdpa_backend, sdpa_unavailable

VOCAB = 256  # byte-level tokens
PROFILE_STEPS = 3  # steps timed with the attention hooks after the timed steps (median share); --profile-steps
REFERENCE = "softmax"
FULL = {"d_model": 256, "layers": 4, "train_heads": 4, "d_ff": 1024, "tokens_per_batch": 16384, "steps": 10,
        "warmup": 3, "profile_steps": PROFILE_STEPS}
QUICK = {"d_model": 64, "layers": 2, "train_heads": 4, "d_ff": 128, "tokens_per_batch": 1024, "steps": 2, "warmup": 1,
         "profile_steps": PROFILE_STEPS}
FIELDS = ["attention", "mode", "L", "batch", "tokens_per_batch", "d_model", "layers", "heads", "d_ff", "num_features",
          "dtype", "device", "threads", "warmup", "steps", "status", "time_s", "time_min_s", "tokens_per_s",
          "attention_s", "attention_share", "peak_rss_mib", "base_rss_mib", "peak_cuda_mib", "recheck_tokens_per_s",
          "torch_version", "machine", "message"]
NOT_TRAINED = {"sdpa": "softmax is the model on F.scaled_dot_product_attention's default dispatch",
               "performer_pytorch": "not a registered attention, so not an LM core"} | {
    name: "a kernel baseline (compiled FlexAttention), not an LM core" for name in FLEX_BASELINES}


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train mode's options (a group of ``efficient-attn-bench``); None = the full or --quick value."""
    g = p.add_argument_group("train mode (--modes train)")
    g.add_argument("--d-model", type=int, help=f"model width (default: {FULL['d_model']}; --quick {QUICK['d_model']})")
    g.add_argument("--layers", type=int, help=f"decoder layers (default: {FULL['layers']}; --quick {QUICK['layers']})")
    g.add_argument("--train-heads", type=int, metavar="H",
                   help=f"heads of the model (default: {FULL['train_heads']}; --heads is the kernel modes')")
    g.add_argument("--d-ff", type=int, help=f"feed-forward width (default: {FULL['d_ff']}; --quick {QUICK['d_ff']})")
    g.add_argument("--tokens-per-batch", type=int, metavar="T",
                   help=f"tokens per step, batch = T / L; a multiple of every L (default: {FULL['tokens_per_batch']}; "
                        f"--quick {QUICK['tokens_per_batch']})")
    g.add_argument("--train-batch", type=int, metavar="B",
                   help="fixed batch B at every L instead of fixed tokens: B·L tokens per step (--tokens-per-batch "
                        "is then unused), the series in which memory grows with L")
    g.add_argument("--profile-steps", type=int, metavar="N",
                   help=f"steps timed with the attention hooks after the timed ones, for the attention share (default "
                        f"{PROFILE_STEPS}; 0 = no share, e.g. for a memory-only run)")
    g.add_argument("--steps", type=int, help=f"timed training steps per point (default: {FULL['steps']}; "
                                             f"--quick {QUICK['steps']})")
    g.add_argument("--summarize", action="store_true",
                   help="measure nothing: redraw the PNG and rewrite the summary from --out's train_<device>.csv")
    g.add_argument("--warmup", type=int, help=f"untimed steps before them (default: {FULL['warmup']}; "
                                              f"--quick {QUICK['warmup']})")


def resolve(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Fill the train options left unset from FULL or QUICK; with ``--modes train``, reject sizes that
    cannot be run as asked (one ``error:`` line naming the option and the fix)."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "train" not in args.modes.split(","):
        return
    for key in ("d_model", "layers", "train_heads", "d_ff", "tokens_per_batch", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0 or args.profile_steps < 0:
        p.error(f"--warmup and --profile-steps must be >= 0, got {args.warmup}, {args.profile_steps}")
    if args.train_batch is not None and args.train_batch < 1:
        p.error(f"--train-batch must be >= 1, got {args.train_batch}")
    if args.d_model % args.train_heads:
        p.error(f"--d-model {args.d_model} is not divisible by --train-heads {args.train_heads}; change one of them")
    bad = [L for L in args.lengths if args.tokens_per_batch % L]
    if bad and args.train_batch is None:
        p.error(f"--tokens-per-batch {args.tokens_per_batch} is not a multiple of L = {bad} (batch = tokens / L is "
                "fixed); raise --tokens-per-batch to a multiple of every --lengths value or drop those lengths")


# ---------------------------------------------------------------- worker side (one point per process)

class AttentionClock:
    """Seconds spent inside every core attention of ``model``, forward and backward, while entered.

    Forward: pre-hook to hook. Backward: full-backward pre-hook (the output's gradient arrived) to
    full-backward hook (every input gradient computed); in between the autograd engine runs only the core's
    own backward nodes. A profiler range would miss the backward, which runs later in the engine (on CUDA in
    its own thread). ``sync`` runs at each boundary (CUDA: the device's time), which slows a step, so the
    timed steps run without the clock. ``clock`` is the time source (a test passes a fake one).
    """

    def __init__(self, model: Any, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> None:
        from efficient_attn.attention.base import Attention

        self.cores = [m for m in model.modules() if isinstance(m, Attention)]
        self.sync, self.clock, self.seconds = sync, clock, 0.0
        self._started: dict[int, float] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "AttentionClock":
        for core in self.cores:
            self._handles += [core.register_forward_pre_hook(self._begin), core.register_forward_hook(self._end),
                              core.register_full_backward_pre_hook(self._begin),
                              core.register_full_backward_hook(self._end)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _begin(self, module: Any, *_: Any) -> None:
        self.sync()
        self._started[id(module)] = self.clock()

    def _end(self, module: Any, *_: Any) -> None:
        self.sync()
        self.seconds += self.clock() - self._started.pop(id(module))


def attention_kwargs(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Options of the core ``name`` as the kernel modes set them: ``num_features`` where it has one,
    cosFormer's ``max_len`` covering L."""
    import efficient_attn as ea

    options = ea.attention_options(name)
    kwargs = {"num_features": spec["num_features"]} if spec.get("num_features") and "num_features" in options else {}
    if "max_len" in options:
        kwargs["max_len"] = spec["L"]
    return kwargs


def run_train_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the LM for ``warmup`` + ``steps`` + PROFILE_STEPS steps at context L; returns the measured fields."""
    import torch
    import torch.nn.functional as F

    import efficient_attn as ea
    from efficient_attn.transformer import AttentionSpec, TransformerConfig, TransformerLM

    torch.set_num_threads(spec["threads"])
    device, cuda = torch.device(spec["device"]), spec["device"].startswith("cuda")
    name, length, batch = spec["attention"], spec["L"], spec["batch"]
    core = "softmax" if name in SDPA_BACKENDS else name
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=spec["d_model"], num_heads=spec["heads"], d_ff=spec["d_ff"], encoder_layers=0,
                            decoder_layers=spec["layers"], max_len=length)
    model = TransformerLM(cfg, VOCAB, attention=AttentionSpec(core, attention_kwargs(core, spec))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch, length + 1), generator=gen, device=device)  # (B, L + 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    dtype = getattr(torch, points.DTYPES[spec["dtype"]])
    mixed = dtype != torch.float32  # bf16/fp16: autocast over fp32 weights and AdamW (mixed precision)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(device.type, dtype=dtype) if mixed else contextlib.nullcontext()
        with sdpa_backend(name), autocast:
            logits = model(inputs)  # (B, L, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            aux = ea.attention_aux_loss(model)
            loss = loss if aux is None else loss + aux
        loss.backward()
        optimizer.step()
        ea.attention_optimizer_step(model)
        sync()

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    base_rss = points.rss_mib()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    attention, shares = [], []
    with AttentionClock(model, sync) as clock:
        for _ in range(spec.get("profile_steps", PROFILE_STEPS)):
            clock.seconds, start = 0.0, time.perf_counter()
            step()
            attention.append(clock.seconds)
            shares.append(clock.seconds / (time.perf_counter() - start))
    median = statistics.median(times)
    return {
        "status": "ok", "time_s": median, "time_min_s": min(times), "tokens_per_s": batch * length / median,
        "attention_s": statistics.median(attention) if attention else None,
        "attention_share": statistics.median(shares) if shares else None,
        "base_rss_mib": base_rss, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


# ---------------------------------------------------------------- parent side

class Series:
    """One attention's points, one L per ``next`` of :meth:`points` (:func:`run` interleaves the attentions).

    As the kernel modes' series: ``n/a`` where the attention cannot be an LM's causal core; after a
    failure (or a skip) the larger L are skipped; a point predicted (linearly in L from the last one:
    with the tokens per batch fixed, softmax's step grows about linearly) to overrun the time limit is
    skipped, and so is one whose estimated memory exceeds free RAM on CPU.
    """

    def __init__(self, name: str, cfg: dict[str, Any]) -> None:
        import efficient_attn as ea

        self.name, self.cfg = name, cfg
        self.core = "softmax" if name in SDPA_BACKENDS else name
        self.features = cfg["num_features"] if "num_features" in ea.attention_options(self.core) else None
        self.reason = sdpa_unavailable(name, cfg["device"], cfg["dtype"]) or points.not_applicable(self.core, "causal")
        self.stop: str | None = None
        self.last: tuple[int, float] | None = None  # (L, seconds per step) of the last measured point
        self.runs = cfg["warmup"] + cfg["steps"] + cfg.get("profile_steps", PROFILE_STEPS)  # steps a worker runs

    def spec(self, length: int) -> dict[str, Any]:
        """The worker's description of the point at ``length``."""
        cfg = self.cfg
        batch = cfg.get("train_batch") or cfg["tokens_per_batch"] // length
        return {"attention": self.name, "mode": "train", "L": length, "batch": batch,
                "tokens_per_batch": batch * length, "heads": cfg["train_heads"], "num_features": self.features,
                "imports": cfg.get("imports", []),
                "profile_steps": cfg.get("profile_steps", PROFILE_STEPS)} | {
                    key: cfg[key] for key in ("d_model", "layers", "d_ff", "dtype", "device", "threads", "steps",
                                              "warmup")}

    def measure(self, length: int) -> dict[str, Any]:
        """Run (or skip) the point at ``length``; return its CSV row."""
        cfg, spec, runs = self.cfg, self.spec(length), self.runs
        estimate = points.estimate_bytes(self.core, length, spec)
        step = self.last[1] * length / self.last[0] if self.last else 0.0  # predicted seconds per step
        limit = points.time_left(cfg)
        result = points.not_run(self.reason, self.stop, limit, cfg["device"], estimate and estimate * cfg["layers"],
                         step * runs, f"predicted {step:.1f} s per step x {runs} > time limit")
        if result is None:
            result = points.run_subprocess(spec, limit)
        if result["status"] == "ok":
            self.last = (length, result["time_s"])
        self.stop = points.next_stop(result, self.stop, length)
        row = {key: spec.get(key, cfg.get(key)) for key in FIELDS} | {key: result.get(key) for key in FIELDS
                                                                       if key in result}
        shown = result.get("message", "")
        if result["status"] == "ok":
            share = result["attention_share"]
            shown = (f"{result['tokens_per_s']:.0f} tok/s, attention " + ("-" if share is None else f"{share:.0%}")
                     + f", peak RSS {result['peak_rss_mib']:.0f} MiB")
        print(f"  {self.name:<18} train     L={length:<6} {result['status']:<8} {shown}", file=sys.stderr, flush=True)
        return row

    def points(self) -> Iterator[dict[str, Any]]:
        """The rows at every L, one per ``next``."""
        for length in self.cfg["lengths"]:
            yield self.measure(length)

    def recheck(self, row: dict[str, Any]) -> None:
        """Measure ``row``'s point again (after the other attentions at that L) into ``recheck_tokens_per_s``:
        how far the machine's speed drifted while the others ran."""
        limit = points.time_left(self.cfg)
        if row["status"] != "ok" or limit < 2 * row["time_s"] * self.runs:
            return
        result = points.run_subprocess(self.spec(row["L"]), limit)
        if result["status"] == "ok":
            row["recheck_tokens_per_s"] = result["tokens_per_s"]
            print(f"  {self.name:<18} re-check  L={row['L']:<6} ok       {result['tokens_per_s']:.0f} tok/s "
                  f"({result['tokens_per_s'] / row['tokens_per_s'] - 1:+.0%})", file=sys.stderr, flush=True)


def trainable(names: list[str]) -> list[str]:
    """The names the train mode runs: registered attentions and pinned-backend SDPA baselines (a note
    on stderr for each dropped one, with why)."""
    kept = []
    for name in names:
        if name in NOT_TRAINED:
            print(f"note: train mode skips {name}: {NOT_TRAINED[name]}", file=sys.stderr)
        else:
            kept.append(name)
    return kept


def run(names: list[str], cfg: dict[str, Any], machine: str, path: Path) -> list[dict[str, Any]]:
    """Run the train mode for ``names``, one L at a time (every attention at that L, then the reference
    once more: its re-check bounds the drift between points compared in the same run); write the rows
    to the CSV ``path`` and return them (the report is :func:`efficient_attn_tasks.bench.train_report.report`)."""
    series = [Series(name, cfg) for name in trainable(names)]
    reference = next((s for s in series if s.name == REFERENCE), None)

    def recheck(measured: list[dict[str, Any]]) -> None:
        if reference is not None and len(series) > 1:
            reference.recheck(measured[series.index(reference)])

    rows = points.by_length([s.points() for s in series], cfg["lengths"], recheck)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(row | {"machine": machine} for row in rows)
    return rows
