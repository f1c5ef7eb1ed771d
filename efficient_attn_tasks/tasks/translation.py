"""Translation: Multi30k (default), any parallel text files, HF `datasets` corpora, or generated copy/reverse.

This module is the task: its config, the data module, the Lightning module and ``build``/``restore``; reading the
text, the tokenizer, the length checks and the batches are efficient_attn_tasks/tasks/translation_data.py.
Tokenization is one joint SentencePiece model trained on the training split and cached; every
checkpoint holds its bytes, so a checkpoint runs alone (``restore``, efficient_attn_tasks/inference/checkpoint.py).
Validation decodes greedily for BLEU; test decodes with beam search from the best checkpoint.
BLEU is sacreBLEU on detokenized output against the raw references; its signature is recorded.
On several processes (DDP) each decodes its share of the sentences (whole batches, as one process
batches them) and all gather the results in corpus order: the same loss, BLEU and hypotheses as one process.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import sacrebleu
import sentencepiece as spm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from efficient_attn.generate import beam_search, greedy_search
from efficient_attn.transformer import Seq2SeqTransformer
from efficient_attn_tasks.config.schema import attention_spec, transformer_config
from efficient_attn_tasks.run.distributed import all_gather_objects
from efficient_attn_tasks.tasks import register_task
from efficient_attn_tasks.tasks.base import TaskData, TaskModule, check_positive, data_options, task_section
from efficient_attn_tasks.tasks.data import DataError
from efficient_attn_tasks.tasks.sampling import GlobalBatches, by_length, sharded_eval_loader
from efficient_attn_tasks.tasks.translation_data import (
    BOS,
    EOS,
    PAD,
    UNK,
    check_lengths,
    collate,
    collate_indexed,
    decoding_cap_note,
    decoding_limit,
    load_pairs,
    train_tokenizer,
)

ATTENTION_SITES = ("encoder", "decoder", "cross")  # the model's attention sites (check_config)
SOURCES = ("multi30k", "files", "hf", "synthetic")
TOKENIZERS = ("bpe", "unigram", "char")  # SentencePiece model types
DEFAULT_MAX_LEN = 1024  # model.max_len when null: fairseq's default --max-{source,target}-positions


@register_task("translation")
@dataclass
class Config:
    """The ``task:`` section for ``task=translation`` (configs/task/translation.yaml)."""

    name: str = "translation"
    source: str = "multi30k"  # multi30k | files | hf | synthetic
    src_lang: str = "en"
    tgt_lang: str = "de"
    files: dict[str, list[str]] | None = None  # source=files: {train: [src, tgt], val: [...], test: [...]}
    hf_name: str | None = None  # source=hf, e.g. wmt14 / iwslt2017
    hf_config: str | None = None  # e.g. de-en / iwslt2017-en-de
    synthetic: str = "reverse"  # source=synthetic: copy | reverse
    synthetic_sizes: list[int] = field(default_factory=lambda: [4000, 200, 200])
    synthetic_symbols: int = 16
    synthetic_length: list[int] = field(default_factory=lambda: [4, 12])
    data_seed: int = 1234
    tokenizer: str = "bpe"  # SentencePiece model type: bpe | unigram | char
    vocab_size: int = 8000
    max_tokens: int = 128  # training pairs longer than this (either side) are dropped, with a count
    batch_size: int = 64
    label_smoothing: float = 0.1
    val_bleu: bool = True  # greedy-decode the validation set for BLEU (the checkpoint metric)
    beam_size: int = 4  # test decoding; 1 = greedy
    length_penalty: float = 0.6  # α: beams score sum log p / |y|**α, |y| tokens incl. EOS (fairseq, HF)
    max_len_a: float = 1.5  # generate at most a·|src| + b tokens (and at most model.max_len)
    max_len_b: int = 10
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"task.beam_size must be an int >= 1 (1 = greedy decoding of the test split), "
                             f"got {self.beam_size!r}; set test=false to skip testing")
        if self.source not in SOURCES:
            raise ValueError(f"task.source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.source == "files" and (not isinstance(self.files, dict) or set(self.files) != {"train", "val", "test"}
                                       or any(len(pair) != 2 for pair in self.files.values())):
            raise ValueError("task.source=files needs task.files="
                             "{train: [src, tgt], val: [src, tgt], test: [src, tgt]}")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("task.source=hf needs task.hf_name (e.g. wmt14) and task.hf_config (e.g. de-en)")
        if self.synthetic not in ("copy", "reverse"):
            raise ValueError(f"task.synthetic must be copy or reverse, got {self.synthetic!r}")
        if len(self.synthetic_sizes) != 3 or any(not isinstance(n, int) or n < 1 for n in self.synthetic_sizes):
            raise ValueError(f"task.synthetic_sizes must be three positive ints [train, val, test], "
                             f"got {list(self.synthetic_sizes)}")
        length = list(self.synthetic_length)
        if len(length) != 2 or not 1 <= length[0] <= length[1] or not 1 <= self.synthetic_symbols <= 26:
            raise ValueError("task.synthetic_length must be [min, max] with 1 <= min <= max; "
                             "synthetic_symbols in 1..26")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"task.tokenizer must be one of {list(TOKENIZERS)}, got {self.tokenizer!r}")
        check_positive(self, ("vocab_size", "max_tokens", "batch_size"))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_len_a < 0 or not isinstance(self.max_len_b, int) or self.max_len_b < 0:
            raise ValueError(f"task.max_len_a and task.max_len_b must be >= 0 (max_len_b an int), "
                             f"got {self.max_len_a!r} and {self.max_len_b!r}")
        if int(self.max_len_a + self.max_len_b) < 1:
            raise ValueError(f"task.max_len_a={self.max_len_a}, task.max_len_b={self.max_len_b} let a one-token source "
                             "generate no token; raise task.max_len_b (e.g. 10)")
        if self.num_workers < 0:
            raise ValueError(f"task.num_workers must be >= 0, got {self.num_workers}")

    @property
    def default_max_len(self) -> int:
        """model.max_len when it is null. No config key bounds the pairs (training pairs are cut at
        max_tokens, often far above their real length; validation and test pairs are never cut), so the
        lengths are checked on the tokenised data (:func:`check_lengths`), and the default is fairseq's 1024
        positions, or BOS + max_tokens when that is more (every kept training pair fits)."""
        return max(DEFAULT_MAX_LEN, self.max_tokens + 1)


def task_config(cfg: DictConfig) -> Config:
    """The ``task:`` group as a checked :class:`Config` (unknown keys are a TypeError, bad values a ValueError)."""
    return task_section(cfg, Config)


# ----------------------------------------------------------------------------- data module
class TranslationData(TaskData):
    """Encodes each split once; training batches group sentences of similar length."""

    collate_fn = staticmethod(collate)
    sp: spm.SentencePieceProcessor | None = None  # set before ``setup`` when restored from a checkpoint (``restore``)

    def prepare_data(self) -> None:
        self.setup()

    def load_splits(self) -> dict[str, list[tuple[list[int], list[int], str]]]:
        pairs = load_pairs(self.task, self.data_root)
        if self.sp is None:
            self.sp = train_tokenizer(pairs["train"], self.task, self.cache_root)
        data = {split: self._encoded(split, src, tgt) for split, (src, tgt) in pairs.items()}
        if self.max_len is None:
            raise ValueError("model.max_len is null (the task's longest sequence): run "
                             "efficient_attn_tasks.config.checks.check_config(cfg) first, which fills it in, "
                             "or set model.max_len")
        for split, rows in data.items():
            check_lengths(split, rows, self.max_len, self.task.max_tokens)
        for split in ("val", "test"):
            note = decoding_cap_note(split, [len(s) for s, _, _ in data[split]], self.max_len,
                                     float(self.task.max_len_a), int(self.task.max_len_b))
            if note:
                print(note)
        return data

    def _encoded(self, split: str, src: list[str], tgt: list[str]) -> list[tuple[list[int], list[int], str]]:
        """(source ids, target ids, target text) rows; training drops empty and overlong pairs, and says how many."""
        rows = list(zip(self.sp.encode(src), self.sp.encode(tgt), tgt))
        if split == "train":
            limit = self.task.max_tokens
            keep = [r for r in rows if 0 < len(r[0]) <= limit and 0 < len(r[1]) <= limit]
            self.dropped[split] = len(rows) - len(keep)
            if self.dropped[split]:
                print(f"translation: dropped {self.dropped[split]} of {len(rows)} training pairs "
                      f"(empty, or longer than task.max_tokens={limit})")
            rows = keep
        if not rows:
            raise DataError(f"translation: the {split} split is empty")
        return rows

    @property
    def vocab_size(self) -> int:
        self.setup()
        return self.sp.get_piece_size()

    def train_batches(self, rows: list) -> tuple[GlobalBatches, int]:
        """Batches of pairs of similar length (source + target tokens), in a seeded order."""
        lengths = [len(s) + len(t) for s, t, _ in rows]
        size = self.task.batch_size
        return by_length(lengths, size, self.seed), -(-len(rows) // size)

    def eval_dataloader(self, split: str) -> DataLoader:
        """This process's share of the split; batches also hold each sentence's index (``ids``)."""
        try:
            return sharded_eval_loader(self.splits[split], self.task.batch_size, self.trainer,
                                       **self.loader_args(collate_indexed))
        except ValueError as err:
            raise DataError(f"translation: the {split} split: {err}; run on fewer processes "
                            "(trainer.devices × trainer.num_nodes)") from None


# ----------------------------------------------------------------------------- Lightning module
def gathered_in_order(rows: list[tuple]) -> list[tuple]:
    """Every process's evaluation batches (``(ids, ...)`` each), in corpus order: on every process the
    same list, as one process would have made it. Each sentence must come once (none padded in twice)."""
    rows = sorted((r for shard in all_gather_objects(rows) for r in shard), key=lambda r: r[0][0])
    ids = [i for r in rows for i in r[0]]
    if ids != sorted(set(ids)):
        raise RuntimeError(f"evaluation batches overlap or are out of order: sentence ids {ids[:20]}...")
    return rows


def _strip(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else [i for i in ids if i != PAD]


class TranslationModule(TaskModule):
    """Label-smoothed cross-entropy; BLEU (greedy on val, beam on test) and perplexity."""

    eval_means = ("loss",)  # weighted by target tokens; ppl = exp(loss)
    eval_dtype = torch.float64  # summed in double, as this task always summed its loss

    def __init__(self, cfg: DictConfig, vocab_size: int, sp: spm.SentencePieceProcessor) -> None:
        super().__init__(cfg)
        self.task, self.sp = task_config(cfg), sp
        self.model = Seq2SeqTransformer(
            transformer_config(cfg), vocab_size,
            encoder_attention=attention_spec(cfg, "encoder"),
            decoder_attention=attention_spec(cfg, "decoder"),
            cross_attention=attention_spec(cfg, "cross"),
        )
        self.monitor, self.monitor_mode = ("val/bleu", "max") if self.task.val_bleu else ("val/loss", "min")
        # BLEU is a corpus score, not a mean over batches: each split's hypotheses and references are kept
        # (on every process, its share) and gathered in corpus order at the epoch's end (one list by necessity)
        self._outputs: dict[str, list] = {}
        self.bleu_signature: str | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Also the SentencePiece model's bytes: the checkpoint runs without the data or the tokenizer cache."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokenizer"] = self.sp.serialized_model_proto()

    def batch_tokens(self, batch: dict) -> int:
        return int((~batch["src_mask"]).sum() + (~batch["tgt_mask"]).sum())

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["src"], batch["tgt_in"], batch["src_mask"], batch["tgt_mask"])  # (B, T, V)

    def _nll(self, batch: dict, smoothing: float) -> tuple[torch.Tensor, int]:
        logits = self(batch)  # (B, T, V)
        # bf16/fp16 up; a float64 run stays float64
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=PAD,
                               label_smoothing=smoothing)
        return loss, int((~batch["tgt_mask"]).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n = self._nll(batch, self.task.label_smoothing)
        loss, logged = self.global_mean(loss, n)  # over the global batch's target tokens, on any number of processes
        self.log("train/loss", logged, prog_bar=True, batch_size=n)
        return loss

    def eval_step(self, batch: dict, split: str) -> None:
        """The loss, and the hypotheses for BLEU: beam search on test, greedy on val when ``task.val_bleu``."""
        beam = self.task.beam_size if split == "test" else int(self.task.val_bleu)
        nll, n = self._nll(batch, 0.0)
        self.accumulate(split, "loss", nll, n)
        self._outputs.setdefault(split, []).append((batch["ids"], self.translate(batch, beam) if beam else [],
                                                    batch["refs"]))

    def translate(self, batch: dict, beam: int) -> list[str]:
        """Detokenized hypotheses for a batch (beam=1: greedy)."""
        src, mask = batch["src"], batch["src_mask"]
        lengths = (~mask).sum(1)
        max_len = decoding_limit(int(lengths.max()), self.model.cfg.max_len, self.task.max_len_a,
                                 self.task.max_len_b)
        state = self.model.start(src, mask)
        kw = dict(bos=BOS, eos=EOS, pad=PAD, unk=UNK, max_len=max_len)
        if beam <= 1:
            ids = greedy_search(self.model, state, src.shape[0], **kw)
        else:
            ids = beam_search(self.model, state, src.shape[0], beam_size=beam,
                              length_penalty=self.task.length_penalty, **kw)
        return [self.sp.decode(_strip(row.tolist())) for row in ids]

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, split: str) -> None:
        means = self.log_means(split)
        if "loss" in means:
            self.log(f"{split}/ppl", means["loss"].exp())
        rows = gathered_in_order(self._outputs.pop(split, []))
        hyps = [h for r in rows for h in r[1]]
        if hyps:
            refs = [x for r in rows for x in r[2]]
            bleu = sacrebleu.metrics.BLEU()
            self.log(f"{split}/bleu", bleu.corpus_score(hyps, [refs]).score)
            self.bleu_signature = str(bleu.get_signature())
            if split == "test":
                self.test_hypotheses = hyps


def build(cfg: DictConfig) -> tuple[TranslationData, TranslationModule]:
    """The data module (set up: the tokenizer is made from its training split) and the Lightning module."""
    data = TranslationData(task_config(cfg), **data_options(cfg))
    data.setup()
    return data, TranslationModule(cfg, data.vocab_size, data.sp)


def restore(cfg: DictConfig, checkpoint: dict) -> tuple[TranslationData, TranslationModule]:
    """``build`` for a saved checkpoint (efficient_attn_tasks/inference/checkpoint.py): the tokenizer from the
    checkpoint's bytes; the data is read only if the data module is set up. A checkpoint that holds no
    tokenizer gets it from the training data, as ``build``."""
    if "tokenizer" not in checkpoint:
        print("note: this checkpoint holds no tokenizer; rebuilding it from the training data", file=sys.stderr)
        return build(cfg)
    data = TranslationData(task_config(cfg), **data_options(cfg))
    data.sp = spm.SentencePieceProcessor(model_proto=checkpoint["tokenizer"])
    return data, TranslationModule(cfg, data.sp.get_piece_size(), data.sp)
