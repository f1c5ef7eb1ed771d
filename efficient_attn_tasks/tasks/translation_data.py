"""Translation's data helpers: the parallel text (Multi30k, parallel files, HF ``datasets`` corpora, or generated
copy/reverse), the joint SentencePiece tokenizer trained on its training split (cached by content hash), the
length checks and decoding limits, and the batches. The task itself (its config, :class:`TranslationData`, the
Lightning module) is efficient_attn_tasks/tasks/translation.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm
import torch

from efficient_attn_tasks.tasks.base import SPLITS
from efficient_attn_tasks.tasks.data import RESOURCES, DataError, data_dir, fetch_all, read_lines

if TYPE_CHECKING:
    from efficient_attn_tasks.tasks.translation import Config

PAD, UNK, BOS, EOS = 0, 1, 2, 3
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}


# ----------------------------------------------------------------------------- raw text pairs
def load_pairs(t: Config, root: Path | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """{split: (source lines, target lines)} for the configured corpus; Multi30k is read from (or downloaded
    into) the data dir ``root`` (default: efficient_attn_tasks/tasks/data.py ``data_dir()``)."""
    if t.source == "multi30k":
        root = root or data_dir()
        langs = (t.src_lang, t.tgt_lang)
        keys = {(s, lang): f"multi30k/{MULTI30K_SPLITS[s]}.{lang}.gz" for s in SPLITS for lang in langs}
        unknown = [k for k in keys.values() if k not in RESOURCES]
        if unknown:
            raise DataError(f"Multi30k has no {', '.join(unknown)}; task.src_lang / task.tgt_lang must be en, de or fr")
        paths = fetch_all(list(keys.values()), root)  # every missing file named in one error
        lines = {where: read_lines(paths[key]) for where, key in keys.items()}  # (split, lang) -> lines
        return {s: _checked(lines[s, t.src_lang], lines[s, t.tgt_lang], s) for s in SPLITS}
    if t.source == "files":
        if not t.files or set(t.files) != set(SPLITS):
            raise ValueError("task.source=files needs task.files="
                             "{train: [src, tgt], val: [src, tgt], test: [src, tgt]}")
        return {s: _checked(read_lines(Path(t.files[s][0])), read_lines(Path(t.files[s][1])), s) for s in SPLITS}
    if t.source == "hf":
        return _load_hf(t)
    if t.source == "synthetic":
        return _synthetic(t)
    raise ValueError(f"task.source must be multi30k, files, hf or synthetic, got {t.source!r}")


def _checked(src: list[str], tgt: list[str], split: str) -> tuple[list[str], list[str]]:
    if len(src) != len(tgt):
        raise DataError(f"{split}: source has {len(src)} lines but target has {len(tgt)}; parallel files must align")
    return src, tgt


def _load_hf(t: Config) -> dict[str, tuple[list[str], list[str]]]:
    try:
        import datasets
    except ImportError:
        raise DataError("task.source=hf needs the `datasets` package: pip install datasets") from None
    if not t.hf_name:
        raise ValueError("task.source=hf needs task.hf_name (e.g. wmt14) and task.hf_config (e.g. de-en)")
    corpus = datasets.load_dataset(t.hf_name, t.hf_config)
    names = {"train": "train", "val": "validation", "test": "test"}
    out = {}
    for split, hf_split in names.items():
        rows = corpus[hf_split]["translation"]
        out[split] = ([r[t.src_lang] for r in rows], [r[t.tgt_lang] for r in rows])
    return out


def _synthetic(t: Config) -> dict[str, tuple[list[str], list[str]]]:
    """Random space-separated letters (so BLEU sees words); the target copies or reverses them."""
    if t.synthetic not in ("copy", "reverse"):
        raise ValueError(f"task.synthetic must be copy or reverse, got {t.synthetic!r}")
    lo, hi = t.synthetic_length
    if not 1 <= lo <= hi or not 1 <= t.synthetic_symbols <= 26:
        raise ValueError("task.synthetic_length must be [min, max] with 1 <= min <= max; synthetic_symbols in 1..26")
    letters = [chr(ord("a") + i) for i in range(t.synthetic_symbols)]
    out = {}
    for i, (split, n) in enumerate(zip(SPLITS, t.synthetic_sizes)):
        rng = random.Random(t.data_seed * 1000 + i)
        src = [[rng.choice(letters) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
        tgt = src if t.synthetic == "copy" else [s[::-1] for s in src]
        out[split] = ([" ".join(s) for s in src], [" ".join(s) for s in tgt])
    return out


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(pairs: tuple[list[str], list[str]], t: Config, root: Path) -> spm.SentencePieceProcessor:
    """A joint SentencePiece model over both sides of the training split, cached by content hash."""
    key = hashlib.sha256()
    for line in (*pairs[0], *pairs[1]):
        key.update(line.encode() + b"\n")
    key.update(f"{t.tokenizer}|{t.vocab_size}".encode())
    path = root / "sentencepiece" / f"{key.hexdigest()[:16]}.model"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name no seeded RNG can repeat: concurrent runs (same seed) must not share it
        tmp = path.with_suffix(f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([s for s in (*pairs[0], *pairs[1]) if s.strip()]),
            model_prefix=str(tmp),
            vocab_size=t.vocab_size,
            model_type=t.tokenizer,
            character_coverage=1.0,
            hard_vocab_limit=False,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            num_threads=2,
            minloglevel=2,
        )
        Path(f"{tmp}.model").replace(path)
        Path(f"{tmp}.vocab").unlink(missing_ok=True)
    return spm.SentencePieceProcessor(model_file=str(path))


# ----------------------------------------------------------------------------- batches
def collate_indexed(items: list[tuple[int, tuple[list[int], list[int], str]]]) -> dict:
    """:func:`collate` of the rows, plus ``ids``: their indices in the split."""
    return {**collate([row for _, row in items]), "ids": [i for i, _ in items]}


def check_lengths(split: str, rows: list[tuple[list[int], list[int], str]], max_len: int, max_tokens: int) -> None:
    """Every pair fits the model's ``max_len`` positions: the source (encoder), and BOS + target (decoder
    input; target + EOS is as long). Checked once tokenised, so a long test sentence stops the run before
    training, not after it; validation and test pairs are never dropped, so the fix is a longer model."""
    src = max(len(s) for s, _, _ in rows)
    tgt = max(len(t) for _, t, _ in rows) + 1
    if max(src, tgt) <= max_len:
        return
    from efficient_attn_tasks.config.checks import ConfigError

    over = sum(len(s) > max_len or len(t) + 1 > max_len for s, t, _ in rows)
    fix = (f"lower task.max_tokens to <= {max_len - 1} (longer training pairs are dropped) or raise model.max_len "
           f"to >= {max(src, tgt)}" if split == "train" else f"raise model.max_len to >= {max(src, tgt)}")
    raise ConfigError(f"translation: {over} of {len(rows)} {split} pairs exceed model.max_len={max_len} positions "
                      f"(longest source {src} tokens, longest BOS + target {tgt}; task.max_tokens={max_tokens}); {fix}")


def decoding_limit(src_len: int, max_len: int, a: float, b: int) -> int:
    """Most tokens generated for a source of ``src_len`` tokens: a·|src| + b (task.max_len_a, max_len_b),
    capped at ``max_len`` (model.max_len): decoding feeds BOS and the generated tokens at positions
    0..limit-1. The cap only cuts a hypothesis longer than any reference the model can take (each has at
    most max_len - 1 tokens + EOS, :func:`check_lengths`), so it is applied with a note, not refused."""
    return min(max_len, int(a * src_len + b))


def decoding_cap_note(split: str, src_lens: list[int], max_len: int, a: float, b: int) -> str | None:
    """A line saying how many sources of ``split`` have their decoding limit capped at model.max_len, or None."""
    capped = [n for n in src_lens if int(a * n + b) > max_len]
    if not capped:
        return None
    return (f"translation: {len(capped)} of {len(src_lens)} {split} sources have task.max_len_a·|src| + "
            f"task.max_len_b > model.max_len={max_len} (up to {int(a * max(capped) + b)}); their hypotheses are "
            f"capped at {max_len} tokens, which still fits every reference (at most {max_len - 1} tokens + EOS)")


def collate(rows: list[tuple[list[int], list[int], str]]) -> dict:
    """src (B, S); tgt_in = BOS + y and tgt_out = y + EOS (B, T); masks True at padding."""
    src = _pad([s for s, _, _ in rows])  # (B, S)
    tgt_in = _pad([[BOS] + t for _, t, _ in rows])  # (B, T)
    tgt_out = _pad([t + [EOS] for _, t, _ in rows])  # (B, T)
    return {"src": src, "src_mask": src == PAD, "tgt_in": tgt_in, "tgt_out": tgt_out,
            "tgt_mask": tgt_out == PAD, "refs": [r for _, _, r in rows]}


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
