"""``efficient-attn-report``: tables (and plots) from run records, results.json, under run or multirun dirs
(the work: efficient_attn_tasks/report/tables.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from efficient_attn_tasks.commands.cli import existing, run_command, writable_folder
from efficient_attn_tasks.commands.cli import parser as cli_parser

HELP = """\
Tables from efficient-attn run records (results.json) under run or multirun dirs, never from W&B files:
rows group runs by --rows, cells are mean ± std (or ± 95% CI) over the row's runs (seeds) with n;
a failed run (results.json status failed) or a run dir without results.json (crashed, killed, running)
gets a row saying so.
Details: efficient_attn_tasks/report/tables.py.

examples:
  efficient-attn-report multirun/2026-11-21 --rows attention --ci --out tables/quickstart
  efficient-attn-report runs/ --rows attention --baseline softmax            # Δ and Welch t-test p per row
  efficient-attn-report multirun/mqar --rows attention,config.task.seq_len --tune config.optim.lr --ci --per-seed \
      --success "test/acc>=0.9" --paired softmax   # bounded intervals, successes, Holm-corrected paired tests

outputs:
  the Markdown table on stdout; a "wrote <path>" line for every file written:
  --out X        X.md (the table), X.csv, X_stats.csv (per row: n, <metric>_mean, <metric>_ci, for plots)
  --plot P.png   the plot
  --wandb PROJ   the table as a wandb.Table in a W&B run with job_type report
"""


def parser() -> argparse.ArgumentParser:
    p = cli_parser("efficient-attn-report", HELP)
    p.add_argument("dirs", nargs="+", type=Path, help="run or multirun dirs (searched recursively)")
    p.add_argument("--rows", default="name,task,attention",
                   help="comma-separated grouping keys: record fields (attention, row, seed, task), "
                        "config.<dotted.key>, choices.<group>")
    compare = p.add_mutually_exclusive_group()
    compare.add_argument("--baseline", metavar="ROW",
                         help="a row label: adds Δ and Welch t-test p for every val/ and test/ metric")
    compare.add_argument("--paired", metavar="ATTENTION|KEY=VALUE,...",
                         help="adds Δ and paired (by seed) t-test p against the row with this attention (or these "
                              "--rows values, e.g. name=scratch or every key to pair all rows with one) and the "
                              "same other --rows values")
    p.add_argument("--default", action="append", metavar="KEY=VALUE",
                   help="e.g. config.transfer_steps=0 (repeatable): the value of a config key for the records "
                        "written before it existed (a record that has it keeps its own)")
    p.add_argument("--metrics", help='comma-separated metric columns to keep, e.g. "val/bleu (last),val/ppl (last)" '
                                     "(default: every metric)")
    p.add_argument("--tune", metavar="KEY", help="e.g. config.optim.lr (not a --rows key): per row, keep the runs of "
                                                 "the value with the best mean val_best over seeds")
    p.add_argument("--ci", action="store_true",
                   help="cells are mean ± 95%% CI half-width (t) instead of ± std; a bounded metric (--bounds, or "
                        "acc/accuracy with values in [0, 1]) gets mean [lo, hi], a bootstrap interval inside its range")
    p.add_argument("--bounds", action="append", metavar="METRIC=LO,HI",
                   help="the range of a metric for --ci intervals, e.g. test/bleu=0,100 (repeatable)")
    p.add_argument("--per-seed", action="store_true",
                   help='a "<metric> by seed" column per val/ and test/ metric: values in seed order, '
                        'e.g. 0.99/0.13/0.98')
    p.add_argument("--success", action="append", metavar="METRIC>=THRESHOLD",
                   help="e.g. test/acc>=0.9 (or <=; repeatable): successes/n with an exact Clopper-Pearson 95%% "
                        "interval and the mean of the successful runs; with --paired an exact McNemar test")
    p.add_argument("--pivot", choices=["task"], help="columns = tasks (each task's headline test metric); "
                                                       "default: one column per metric")
    p.add_argument("--avg", action="store_true", help="with --pivot: an Avg column over tasks")
    p.add_argument("--out", type=Path, help="write <out>.md, <out>.csv and <out>_stats.csv (numbers for plots); "
                                            "default: print only")
    p.add_argument("--wandb", metavar="PROJECT", help="also log the table to this W&B project (job_type report)")
    plot = p.add_argument_group("plot", "a line plot of the table rows (after --tune): mean and a 95% CI band")
    plot.add_argument("--plot", type=Path, metavar="OUT.png", help="write the plot here")
    plot.add_argument("--x", metavar="KEY", help="x: a --rows key (e.g. config.task.seq_len) or a metric "
                                                 "(e.g. test/state_size: its mean per row)")
    plot.add_argument("--y", metavar="METRIC", help="y metric (default: the task's headline, e.g. test/acc)")
    plot.add_argument("--panel", metavar="KEYS", help="comma-separated --rows keys: one panel per value")
    plot.add_argument("--series", metavar="KEYS", default="attention",
                      help="comma-separated --rows keys: one line per value (default attention)")
    plot.add_argument("--logx", action="store_true", help="logarithmic x axis")
    plot.add_argument("--xlabel-key", metavar="KEY", help="a --rows key printed under each x tick, e.g. "
                                                          "config.task.num_kv_pairs")
    p.add_argument("--curves", nargs="?", const="", metavar="OUT.png",
                   help="learning curves (efficient_attn_tasks/report/curve_bands.py): per table row the "
                        "validation metric against steps, mean ± std band over seeds; no file: <out>_curves.png "
                        "beside the tables")
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option combinations that cannot work, as argparse errors; a missing dir or an output that cannot be
    written, one line."""
    rows = args.rows.split(",")
    if args.pivot and args.metrics:
        p.error("--metrics selects columns of the grouped table; --pivot shows each task's headline metric")
    if args.pivot and (args.tune or args.ci or args.paired or args.plot or args.per_seed or args.success
                       or args.bounds):
        p.error("--tune, --ci, --paired, --per-seed, --success, --bounds and --plot work on the grouped table, "
                "not --pivot")
    if args.tune and args.tune in rows:
        p.error(f"--tune {args.tune} is a --rows key: each row would have one value to choose from")
    if args.paired:
        from efficient_attn_tasks.report.compare import paired_spec

        outside = [k for k in paired_spec(args.paired) if k not in rows]
        if outside:
            p.error(f"--paired {args.paired}: {outside} not in --rows; it pairs rows that differ only in its keys")
    plot_only = {"--x": args.x, "--y": args.y, "--panel": args.panel, "--logx": args.logx,
                 "--xlabel-key": args.xlabel_key}
    if not args.plot and any(plot_only.values()):
        p.error(f"{[k for k, v in plot_only.items() if v]} need --plot")
    if args.plot and not args.x:
        p.error("--plot needs --x")
    if args.plot:
        plot_keys = [*_keys(args.panel), *_keys(args.series), *([args.xlabel_key] if args.xlabel_key else [])]
        unknown = [k for k in plot_keys if k not in rows]
        if unknown:
            p.error(f"--panel/--series/--xlabel-key must be --rows keys; not in --rows: {unknown}")
    for d in args.dirs:
        existing(d, "", "run or multirun dir")
    for option, out in (("--out", args.out), ("--plot", args.plot), ("--curves", args.curves or None)):
        if out is not None:
            writable_folder(Path(out), option, file=True)


def main(argv: list[str] | None = None) -> None:
    run_command(parser, argv, _report, check=check)


def _report(args: argparse.Namespace) -> None:
    from efficient_attn_tasks.report import tables

    tables.run(args)


def _keys(text: str | None) -> list[str]:
    return [k.strip() for k in text.split(",")] if text else []


if __name__ == "__main__":
    main()
