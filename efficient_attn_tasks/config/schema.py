"""Config schemas: what check_config validates before anything heavy loads (no Lightning, no task code).

The model, optimiser and attention sections; each task's ``task:`` section (``tasks/<name>.py`` uses
its class as ``Config``) and the attention sites its model has; the attention-spec resolution shared
by the checks and the models. Importing it loads neither torch nor Lightning; the model section and
the attention specs load torch (:mod:`efficient_attn.transformer`) when first used.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks import config_dir

if TYPE_CHECKING:
    from efficient_attn.transformer import AttentionSpec, TransformerConfig

TASK_SITES = {  # each task model's attention sites (check_config)
    "translation": ("encoder", "decoder", "cross"),
    "listops": ("encoder",),
    "lm": ("decoder",),
    "mqar": ("decoder",),
}
MIN_ARGS = 2  # ListOps arguments per operator: MIN_ARGS..max_args, as LRA's generator (randint(2, max_args))
LM_DATASETS = ("tinyshakespeare", "enwik8", "file")
SCHEDULES = ("inverse_sqrt", "cosine", "constant")  # efficient_attn_tasks/tasks/base.py TaskModule._lr_factor
TRANSLATION_SOURCES = ("multi30k", "files", "hf", "synthetic")
TOKENIZERS = ("bpe", "unigram", "char")  # SentencePiece model types
TRANSLATION_MAX_LEN = 1024  # translation's default model.max_len: fairseq's default --max-{source,target}-positions


@functools.lru_cache(maxsize=1)
def _model_config() -> type:
    from efficient_attn.transformer import TransformerConfig

    @dataclass
    class ModelConfig(TransformerConfig):
        """Architecture plus optional per-site attention overrides (null = the top-level ``attention``)
        and ``layer_attentions``: one attention per self-attention layer (see :func:`attention_spec`)."""

        encoder_attention: Any = None
        decoder_attention: Any = None
        cross_attention: Any = None
        layer_attentions: Any = None

    ModelConfig.__qualname__ = "ModelConfig"
    return ModelConfig


def __getattr__(name: str) -> Any:
    """``ModelConfig`` extends torch-backed ``TransformerConfig``: built on first use, so the task,
    optimiser, trainer and logger sections are checked before torch loads."""
    if name == "ModelConfig":
        return _model_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 1000
    schedule: str = "inverse_sqrt"  # inverse_sqrt (Vaswani et al.) | cosine | constant
    total_steps: int | None = None  # cosine's horizon; None = the trainer's (max_steps, or max_epochs x batches)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"optim.total_steps must be null or an int >= 1, got {self.total_steps!r}")


@dataclass
class AttentionConfig:
    """One registered attention (``name``, ``kwargs``), or a per-layer hybrid: ``layers`` a list of
    attentions (``{name, kwargs}`` or attention config names), a pattern tiled over each
    self-attention stack; ``name`` is then only the label (e.g. ``based``) and ``kwargs`` empty.
    ``config``: the name of the attention config file (``configs/attention/<config>.yaml`` sets it to its
    own name), which tells apart variants of one registered attention (favor_plus, favor_relu: ``favor``)."""

    name: str = "softmax"
    config: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    layers: Any = None


ATTENTION_CONFIG_DIR = config_dir() / "attention"  # the CLI's group
_ENTRY_KEYS = {"name", "kwargs"}


def model_max_len(cfg: DictConfig) -> int:
    """``model.max_len``; null (the task's longest sequence) is filled in by efficient_attn_tasks.config.checks.check_config."""
    if cfg.model.get("max_len") is None:
        raise ValueError("model.max_len is null (the task's longest sequence): run efficient_attn_tasks.commands.train.check_config(cfg) "
                         "first, which fills it in, or set model.max_len")
    return int(cfg.model.max_len)


def transformer_config(cfg: DictConfig) -> TransformerConfig:
    from efficient_attn.transformer import TransformerConfig

    model_max_len(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    fields = {k: v for k, v in model.items() if not k.endswith("_attention") and k != "layer_attentions"}
    return TransformerConfig(**fields)


def attention_spec(cfg: DictConfig, site: str) -> AttentionSpec | list[AttentionSpec]:
    from efficient_attn.transformer import AttentionSpec

    """The attention for one site (``encoder``, ``decoder`` or ``cross``): one spec, or one per layer.

    First match wins: ``model.<site>_attention``; for self-attention sites ``model.layer_attentions``
    (exactly one entry per layer of the site's stack; translation: encoder and decoder alike);
    ``attention``. An attention with ``layers`` (a hybrid, ``attention=based``) has its pattern
    tiled over the stack: layer i uses ``layers[i % len(layers)]``. Entries are attention config
    names (``configs/attention/<name>.yaml``, its kwargs applied) or ``{name, kwargs}``.
    Cross-attention takes one attention: a hybrid there is a ``ValueError`` saying what to set.
    """
    override = cfg.model.get(f"{site}_attention")
    per_layer = cfg.model.get("layer_attentions")
    if not override and per_layer is not None and site != "cross":
        entries = _entries(per_layer, "model.layer_attentions")
        count = _num_layers(cfg, site)
        if len(entries) != count:
            raise ValueError(
                f"model.layer_attentions has {len(entries)} entries but the {site} has {count} layers "
                f"(model.{site}_layers); give exactly one attention per layer"
            )
        return [layer_entry(e, f"model.layer_attentions[{i}]") for i, e in enumerate(entries)]
    where = f"model.{site}_attention" if override else "attention"
    node = _container(override or cfg.attention)
    if not isinstance(node, dict):
        raise ValueError(f"{where} must be {{name, kwargs}}, got {node!r}")
    if node.get("layers") is None:
        return AttentionSpec(node["name"], dict(node.get("kwargs") or {}))
    pattern = _entries(node["layers"], f"{where}.layers")
    if not pattern:
        raise ValueError(f"{where}.layers is empty; give at least one attention, or null for a single attention")
    if node.get("kwargs"):
        raise ValueError(f"{where}: a per-layer hybrid ({node['name']!r}) takes no kwargs of its own; "
                         f"set each layer's kwargs in {where}.layers")
    if site == "cross":
        raise ValueError(
            f"{where} {node['name']!r} is a per-layer hybrid of self-attentions; cross-attention takes one "
            "attention: set model.cross_attention, e.g. ++model.cross_attention={name: softmax, kwargs: {}}"
        )
    specs = [layer_entry(e, f"{where}.layers[{i}]") for i, e in enumerate(pattern)]
    return [specs[i % len(specs)] for i in range(_num_layers(cfg, site))]


def layer_entry(entry: Any, where: str) -> AttentionSpec:
    from efficient_attn.transformer import AttentionSpec

    """One layer's attention: a config name (``configs/attention/<name>.yaml``) or ``{name, kwargs}``."""
    if isinstance(entry, str):
        path = ATTENTION_CONFIG_DIR / f"{entry}.yaml"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry) or not path.is_file():
            raise ValueError(
                f"{where}: unknown attention config {entry!r}; choose one of {attention_config_names()} "
                "(configs/attention/), or give {name: <registered attention>, kwargs: {...}}"
            )
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    elif isinstance(entry, dict):
        node = entry
        unknown = sorted(set(node) - _ENTRY_KEYS - {"layers"})
        if unknown or "name" not in node:
            raise ValueError(f"{where}: a layer's attention is {{name, kwargs}}, got keys {sorted(node)}")
    else:
        raise ValueError(f"{where}: expected an attention config name or {{name, kwargs}}, got {entry!r}")
    if node.get("layers") is not None:
        raise ValueError(f"{where}: {node.get('name')!r} is itself a per-layer hybrid; a layer takes one attention")
    return AttentionSpec(node["name"], dict(node.get("kwargs") or {}))


def attention_config_names() -> list[str]:
    """The single-attention configs a layer can name (``configs/attention/*.yaml`` without ``layers``)."""
    paths = sorted(ATTENTION_CONFIG_DIR.glob("*.yaml"))
    return [p.stem for p in paths if OmegaConf.load(p).get("layers") is None]


def attention_label(cfg: DictConfig) -> str:
    """The attention's name in results rows: ``attention.name`` (``based`` for the hybrid config), or
    the ``model.layer_attentions`` entries joined by ``+`` when those override it."""
    per_layer = cfg.model.get("layer_attentions")
    if per_layer is None:
        return str(cfg.attention.name)
    entries = _entries(per_layer, "model.layer_attentions")
    return "+".join(e if isinstance(e, str) else str(e.get("name")) for e in entries)


def config_label(name: str, config: str | None) -> str:
    """An attention's label: its config file's name (``favor_relu`` for ``name: favor``), unless a
    command-line ``attention.name=X`` replaced the file's attention (then ``X``). Also the ``${attention_label:…}``
    resolver of ``hydra.run.dir`` and ``hydra.sweep.subdir`` (registered by :mod:`.checks`)."""
    if not config:
        return str(name)
    path = ATTENTION_CONFIG_DIR / f"{config}.yaml"
    named = OmegaConf.load(path).get("name") if path.is_file() else None
    return str(name) if named is not None and named != name else str(config)


def attention_config(cfg: DictConfig) -> str:
    """The attention config a run used, for run dirs, W&B tags and results.json: ``attention.config``
    (the file's name: ``favor_relu`` where ``attention.name`` is ``favor``), else ``attention.name``;
    with ``model.layer_attentions`` set, :func:`attention_label` (those entries joined by ``+``)."""
    if cfg.model.get("layer_attentions") is not None:
        return attention_label(cfg)
    return str(cfg.attention.get("config") or cfg.attention.name)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _entries(node: Any, where: str) -> list[Any]:
    value = _container(node)
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of attentions, got {value!r}")
    return value


def _num_layers(cfg: DictConfig, site: str) -> int:
    return int(cfg.model.get(f"{site}_layers"))



# ----------------------------------------------------------------------------- task sections
@dataclass
class TranslationConfig:
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
        # 0 used to skip test decoding, so results.json silently had no test BLEU
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"task.beam_size must be an int >= 1 (1 = greedy decoding of the test split), "
                             f"got {self.beam_size!r}; set test=false to skip testing")
        if self.source not in TRANSLATION_SOURCES:
            raise ValueError(f"task.source must be one of {list(TRANSLATION_SOURCES)}, got {self.source!r}")
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
        for name in ("vocab_size", "max_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be a positive int, got {getattr(self, name)!r}")
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
        lengths are checked on the tokenised data (efficient_attn_tasks/tasks/translation.py ``check_lengths``), and the default is
        fairseq's 1024 positions, or BOS + max_tokens when that is more (every kept training pair fits)."""
        return max(TRANSLATION_MAX_LEN, self.max_tokens + 1)


def longest_expression(max_depth: int, max_args: int) -> int:
    """Tokens in the largest expression: a full max_args-ary tree, operators at depths 1..max_depth-1."""
    operators = sum(max_args**d for d in range(max_depth - 1))
    return 2 * operators + max_args ** (max_depth - 1)


def check_params(min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    """ValueError saying what to change if no expression can satisfy the parameters."""
    if max_depth < 2:
        raise ValueError(f"max_depth={max_depth} leaves no room for an operator; use max_depth >= 2")
    if max_args < MIN_ARGS:
        raise ValueError(f"max_args={max_args} must be >= {MIN_ARGS}")
    if min_length >= max_length - 1:
        raise ValueError(
            f"min_length={min_length} and max_length={max_length}: lengths are strictly between them, "
            "so max_length must exceed min_length + 1"
        )
    shortest = MIN_ARGS + 2  # e.g. [MAX 1 2 ]
    if max_length <= shortest:
        raise ValueError(f"max_length={max_length}: the shortest expression has {shortest} tokens; raise max_length")
    longest = longest_expression(max_depth, max_args)
    if longest <= min_length:
        raise ValueError(
            f"min_length={min_length}: the longest expression with max_depth={max_depth} and "
            f"max_args={max_args} has {longest} tokens; lower min_length or raise max_depth / max_args"
        )


@dataclass
class ListOpsConfig:
    name: str = "listops"
    train_size: int = 96000
    val_size: int = 2000
    test_size: int = 2000
    min_length: int = 500  # tokens, exclusive
    max_length: int = 2000  # tokens, exclusive
    max_depth: int = 10
    max_args: int = 10
    data_seed: int = 1234
    batch_size: int = 32
    pooling: str = "mean"  # mean | cls (prepends <cls>)
    num_workers: int = 0

    longest_from = "task.max_length - 1, +1 with task.pooling=cls"  # what longest_sequence follows (errors)

    def __post_init__(self) -> None:
        for name in ("train_size", "val_size", "test_size", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"task.pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.num_workers < 0:
            raise ValueError(f"task.num_workers must be >= 0, got {self.num_workers}")
        check_params(self.min_length, self.max_length, self.max_depth, self.max_args)

    @property
    def longest_sequence(self) -> int:
        """Most tokens the model sees in one sequence, <cls> included (the default model.max_len)."""
        return self.max_length - 1 + (self.pooling == "cls")


@dataclass
class LMConfig:
    """The ``task:`` group for ``task=lm`` (configs/task/lm.yaml)."""

    name: str = "lm"
    dataset: str = "tinyshakespeare"  # tinyshakespeare | enwik8 | file
    path: str | None = None  # the text file when dataset=file
    context_length: int = 1024
    batch_size: int = 16
    train_batches_per_epoch: int = 1000
    eval_batches: int | None = None  # cap on val/test batches; None = the whole split
    split: tuple[float, float] = (0.9, 0.05)  # train, val fractions; test = the rest (not enwik8)
    num_workers: int = 0

    longest_from = "task.context_length"

    def __post_init__(self) -> None:
        if self.dataset not in LM_DATASETS:
            raise ValueError(f"task.dataset must be one of {list(LM_DATASETS)}, got {self.dataset!r}")
        if self.dataset == "file" and not self.path:
            raise ValueError("task.dataset=file needs task.path (a UTF-8 text file)")
        for name in ("context_length", "batch_size", "train_batches_per_epoch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"task.eval_batches must be a positive int or null, got {self.eval_batches!r}")
        self.split = tuple(float(f) for f in self.split)
        if len(self.split) != 2 or min(self.split) <= 0 or sum(self.split) >= 1:
            raise ValueError(f"task.split must be two positive fractions (train, val) summing to < 1, got {self.split}")

    @property
    def longest_sequence(self) -> int:
        """Tokens in one window (the default model.max_len)."""
        return self.context_length


@dataclass
class MQARConfig:
    """The ``task:`` group for ``task=mqar`` (configs/task/mqar.yaml)."""

    name: str = "mqar"
    vocab_size: int = 8192
    seq_len: int = 64  # L, tokens per sequence
    num_kv_pairs: int = 4
    power_a: float = 0.01  # query-gap power law (zoology's default)
    random_non_queries: bool = False  # filler: random tokens (True) or token 0 (zoology's Figure 2 configs)
    train_size: int = 100_000
    val_size: int = 3_000  # picks the checkpoint and, in sweeps, the learning rate
    test_size: int = 3_000
    data_seed: int = 1234
    batch_size: int = 64
    num_workers: int = 0

    longest_from = "task.seq_len"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_kv_pairs", "train_size", "val_size", "test_size", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.seq_len % 2:
            raise ValueError(f"task.seq_len must be even (queries sit at even offsets), got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(
                f"task.num_kv_pairs={self.num_kv_pairs} needs seq_len >= 4·num_kv_pairs = {4 * self.num_kv_pairs} "
                f"(2·kv context tokens, then kv query slots at even offsets), got seq_len={self.seq_len}"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"task.vocab_size={self.vocab_size} leaves fewer than num_kv_pairs distinct keys")
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"task.power_a must be in (0, 1], got {self.power_a}")

    @property
    def longest_sequence(self) -> int:
        """Tokens in one sequence (the default model.max_len)."""
        return self.seq_len


TASK_SCHEMAS = {"translation": TranslationConfig, "listops": ListOpsConfig, "lm": LMConfig, "mqar": MQARConfig}
