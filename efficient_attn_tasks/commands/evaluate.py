"""``efficient-attn-eval``: score a trained checkpoint of any task on a split of its run's data or on given
files (the work: efficient_attn_tasks/inference/evaluate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from efficient_attn_tasks.commands.cli import (
    CommandError,
    check_checkpoint_args,
    checkpoint_parser,
    close_options,
    group_options,
    run_command,
    writable_folder,
)

HELP = """\
Score a trained checkpoint of any task (translation: sacreBLEU; listops, mqar: accuracy; lm: bits per byte)
on a split of its run's data or on given files, and write a JSON record beside it. The checkpoint
runs alone: its config and tokenizer are inside it.

examples:
  efficient-attn-eval outputs/<date>/<run>             # the run's best checkpoint on its test split
  efficient-attn-eval <run>/checkpoints/last.ckpt --split val --attention favor_plus --attention-kwargs num_features=64
  efficient-attn-eval <run> --files newstest2014.en newstest2014.de   # translation: source, reference

outputs:
  --out, the record (default: beside the checkpoint, <ckpt stem>.eval_<split, or the first file's name>.json;
    with --attention: <ckpt stem>.eval_<split>.swap_<NAME>[.<key>=<value>...].json):
    metrics, the checkpoint used and why, data, beam, batch size, sacreBLEU signature, versions,
    swapped_in (--attention: the attention config and kwargs, tensors loaded, kept fresh, dropped)
  translation: the hypotheses too, one per line, in <record stem>.hyp.txt
  --attention NAME: the model rebuilt with attention config NAME (its kwargs, --attention-kwargs on top) and
    scored with the run's weights outside the attention cores; the new attention's own are drawn from the seed
  stdout: one summary line, then the path of each file written
"""


def parser() -> argparse.ArgumentParser:
    p = checkpoint_parser("efficient-attn-eval", HELP, "a .ckpt file")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="the split of the run's own data to score (unless --files)")
    p.add_argument("--files", type=Path, nargs="+", metavar="FILE",
                   help="score these files instead: translation SRC REF (one sentence per line), lm TEXT (any "
                        "UTF-8 file, all of it) (default: none, the run's --split)")
    p.add_argument("--beam", type=int, metavar="N",
                   help="translation: beam size, 1 = greedy (default: the run's task.beam_size)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="examples per batch (default: the run's task.batch_size)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="the JSON record (default: beside the checkpoint, see outputs)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the run's data is (default: the run's data_dir, else as efficient-attn-train: "
                        "$EFFICIENT_ATTN_DATA, else <cache dir>/data)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="generated data such as ListOps splits (default: the run's cache_dir, else "
                        "$EFFICIENT_ATTN_CACHE, else ~/.cache/efficient_attn)")
    p.add_argument("--attention", metavar="NAME",
                   help="swap-in: rebuild the model with attention config NAME (configs/attention/NAME.yaml, as "
                        "attention=NAME in training) at every site, load every weight outside the attention "
                        "cores, draw the new attention's own from the run's seed, and score")
    p.add_argument("--attention-kwargs", nargs="+", metavar="KEY=VALUE",
                   help="with --attention: override its kwargs, e.g. num_features=4096 (values as YAML)")
    p.add_argument("--precision", help="Lightning precision, e.g. 32-true, bf16-mixed (default: the run's "
                                       "trainer.precision, else 32-true)")
    return p


def main(argv: list[str] | None = None) -> None:
    run_command(parser, argv, _score, check=check)


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """What needs no checkpoint to check, before torch loads: the paths, the numbers, the count of --files."""
    check_checkpoint_args(a, positive=("beam", "batch_size"))
    if a.files is not None:
        if len(a.files) not in (1, 2):
            raise CommandError(f"--files takes SRC REF (translation) or TEXT (lm), got {len(a.files)} files")
        missing = [str(f) for f in a.files if not f.is_file()]
        if missing:
            raise CommandError(f"--files: no such file {', '.join(missing)}")
    if a.out is not None:
        writable_folder(a.out, "--out", file=True)
    if a.attention_kwargs and not a.attention:
        raise CommandError("--attention-kwargs changes the attention swapped in: give --attention NAME too")
    if a.attention is not None and a.attention not in (names := group_options("attention")):
        close = close_options(a.attention, names)
        fix = f"did you mean {', '.join(close)}?" if close else f"choose one of {names}"
        raise CommandError(f"--attention {a.attention}: no attention config {a.attention!r} (configs/attention/); "
                           f"{fix}")


def _score(a: argparse.Namespace) -> None:
    from efficient_attn_tasks.inference.evaluate import run  # torch and Lightning load here

    run(a)


if __name__ == "__main__":
    main()
