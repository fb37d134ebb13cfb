"""Typed run configuration: YAML + `key.sub=value` overrides, validated against dataclasses.

Every error names the offending key, so a typo never silently falls back to a default."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import UserError


# ----------------------------------------------------------------------------- schema
@dataclass
class CorpusSource:
    """One raw-text corpus. `path`: file, glob, list of them, a HF hub dataset name, or `builtin:grammar`."""
    path: Union[str, list] = ""
    text_field: str = "text"  # for jsonl/csv/tsv/parquet/hub
    format: str = "auto"  # auto | txt | jsonl | csv | tsv | parquet | hub
    doc_separator: str = "line"  # txt only: `line` (one doc per line) or `blank` (blank-line separated)
    weight: float = 1.0  # samples drawn per epoch = weight × corpus size
    hub_split: str = "train"
    hub_config: Optional[str] = None


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # local dir or hub name; None → random init from `config`
    config: Optional[dict] = None  # architecture kwargs (e.g. model_type: bert, hidden_size: 64) for random init
    tokenizer: Optional[str] = None  # path/hub name; default name_or_path; `builtin` → trained on the corpus
    tokenizer_vocab_size: int = 2000  # for the builtin tokenizer
    # auto: accelerate's --mixed_precision / config (bf16 | fp16) if it sets one, else fp32
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    # auto: sdpa where the model supports it, else eager (logged); an explicit choice the model lacks is an error;
    # unpadded (fine-tuning): a batch packed into one row, attention per sequence (trainer/unpadded.py)
    attn_implementation: str = "auto"  # auto | sdpa | eager | unpadded
    tokenizer_mismatch_ok: bool = False  # allow a tokenizer whose vocabulary differs from the pretrained model's
    compile: bool = False  # torch.compile the model (GPU throughput; not with ZeRO-3)


@dataclass
class PretrainDataConfig:
    corpora: list = field(default_factory=list)  # list[CorpusSource]
    seq_len: int = 128
    cache_dir: Optional[str] = None  # default: $BERT_RECIPE_CACHE or ~/.cache/bert-recipe/corpus
    num_proc: int = 1  # tokenizer worker processes during preparation
    mlm_probability: float = 0.15
    whole_word_mask: bool = False
    nsp: bool = False
    max_predictions: Optional[int] = None  # cap on masked positions per sequence (paper: 20)
    num_workers: int = 1  # DataLoader workers per rank


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps; -1 → run `epochs`
    epochs: float = 1.0
    # per rank, per forward pass; auto (fine-tuning): the largest that fits, tried on the device with the
    # longest examples, keeping train.global_batch_size (trainer/micro_batch.py)
    micro_batch_size: Union[int, str] = 8
    grad_accum: Optional[int] = None  # None: accelerate's gradient_accumulation_steps if set, else 1
    # samples per optimizer step, all ranks together; when set, grad_accum is derived from it
    global_batch_size: Optional[int] = None
    max_grad_norm: Optional[float] = None  # None: accelerate's gradient_clipping if set, else 1.0; 0 disables
    log_every: int = 10
    save_every: int = 500  # 0 → only at the end
    keep_last: int = 3
    eval_every: int = 0  # fine-tuning: dev evaluation every N steps; 0 → once per epoch
    stop_at_step: int = 0  # >0: checkpoint and exit after this step, schedule unchanged (time-boxed jobs)
    # per rank, <output_dir>/samples/rank<r>.txt: stream positions (pre-training), step task examples (fine-tuning)
    trace_samples: bool = False
    # pre-training only: the first N steps train the MLM head alone (encoder lr 0), then everything trains.
    # -1 auto: when the starting checkpoint lacks MLM-head weights, 10 % of the run's steps but at least 100
    # (at most half the run) and at most 1000; otherwise (head loaded, or random init from model.config) 0.
    # 0: off. Fine-tuning ignores it.
    head_warmup_steps: int = -1
    # the head's lr during the warm-up (constant; optim.lr's schedule starts after it). The head alone is a
    # shallow readout that fits fast at a larger lr than an encoder tolerates: all-MiniLM-L6-v2 on IMDb, head
    # only, lr 1e-3: MLM loss 7.97 → 6.70 in 100 steps, flat from ~70 on.
    head_warmup_lr: float = 1.0e-3


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    num_cycles: float = 1.0  # cosine: half-waves (1 = decay to 0); cosine_with_restarts: number of cycles
    power: float = 1.0  # polynomial
    min_lr_ratio: float = 0.0  # polynomial: final lr as a fraction of each group's lr
    layer_decay: float = 1.0  # ξ: layer l of L gets lr·ξ^(L−l), embeddings lr·ξ^L, head/pooler lr (paper Table 4)


@dataclass
class ClassificationDataConfig:
    """A classification task: files (jsonl/csv/tsv/parquet, .gz too), a HF hub dataset name, or builtin:topics."""
    train: str = ""
    dev: Optional[str] = None  # None → a stratified, seeded `dev_ratio` of train
    test: Optional[str] = None
    text_fields: list = field(default_factory=lambda: ["text"])  # one field, or two for sentence pairs
    label_field: str = "label"
    format: str = "auto"  # auto | jsonl | csv | tsv | parquet | hub
    hub_config: Optional[str] = None
    hub_revision: Optional[str] = None  # a branch, tag or commit of a hub dataset (default: main)
    hub_splits: dict = field(default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"})
    num_proc: int = 1  # tokenizer worker processes while preparing (once per cache entry)
    dev_ratio: float = 0.1
    few_shot_fraction: Optional[float] = None  # stratified, seeded fraction of train (paper Fig. 4)
    few_shot_per_class: Optional[int] = None  # or N examples per class (multi-label: per rarest label)
    eval_batch_size: int = 64
    # what a text is labelled with (trainer/problems.py): one class | a list of labels | a number
    problem_type: str = "single_label"  # single_label | multi_label | regression
    label_separator: str = ","  # multi_label in csv / tsv: the label cell is split on it ("a,b"); "" → no split
    class_weights: Optional[Union[str, list]] = None  # single_label: balanced | [weight per class] (cross-entropy)
    pos_weight: Optional[Union[str, list]] = None  # multi_label: balanced | [weight per label] (BCE positives)
    threshold: float = 0.5  # multi_label: the probability a label needs to be predicted
    tune_thresholds: bool = False  # multi_label: per label, the threshold with the best dev F1 (saved with the model)


@dataclass
class TextConfig:
    """Long-text handling on word pieces (paper Table 2); max_len includes [CLS]/[SEP]."""
    strategy: str = "head"  # head | tail | head_tail | hierarchical
    max_len: int = 512
    head_tokens: int = 128  # head_tail: first head_tokens + last (max_len - 2 - head_tokens)
    max_chunks: int = 8  # hierarchical: cap on chunks per document (first ones kept)
    chunk_pool: str = "mean"  # hierarchical: mean | max | attention


@dataclass
class HeadConfig:
    """Which layer(s) the classifier reads (paper Table 3): 0 = embeddings … L; negatives count from the top."""
    layers: Union[int, list, str] = -1  # an index, a list of indexes, or first4 | last4 | all
    layer_pool: str = "concat"  # several layers: concat | mean | max
    pooler: bool = True  # last layer alone: go through the encoder's pooler, as BERT's own classifier
    dropout: float = 0.1
    freeze_encoder: bool = False  # BERT-Feat baseline: train the head only


@dataclass
class EvalConfig:
    """How fine-tuning picks its model on dev (trainer/problems.py, trainer/loop.py)."""
    # auto: each task's kind's default — error_rate (single_label), micro_f1 (multi_label), pearson (regression);
    # or one metric every task has: error_rate | accuracy | macro_f1 | micro_f1 | exact_match | pearson | spearman |
    # mse | mae. Several tasks: the mean shortfall from perfect (1 − metric where higher is better)
    select_metric: str = "auto"
    early_stopping_patience: int = 0  # > 0: stop after this many dev evaluations without improvement
    early_stopping_min_delta: float = 0.0  # an improvement must lower the shortfall by more than this


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "bert-recipe"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list = field(default_factory=list)
    group: Optional[str] = None  # wandb's run group (a grid's points share one)


@dataclass
class LogConfig:
    """The job log (trainer/logs.py): time, level and rank on every line."""
    level: str = "info"  # debug | info | warning | error (or --log-level)
    all_ranks: bool = False  # every rank writes (default: the main process; others only warnings and errors)


@dataclass
class CardConfig:
    """What the model card of every export (trainer/model_card.py) cannot learn from the run itself."""
    model_name: Optional[str] = None  # default: the run dir's name (+ "-<task>" for a multi-task run's exports)
    language: list = field(default_factory=list)  # ISO 639-1 codes of the training text, e.g. [en]
    license: Optional[str] = None  # a hub license id, e.g. apache-2.0
    base_model: Optional[str] = None  # the hub id of a local model.name_or_path (a hub name is taken as it is)
    tags: list = field(default_factory=list)  # added to the trainer's own


@dataclass
class DistributedConfig:
    deepspeed_config: Optional[str] = None  # DS JSON; default: the one named by the accelerate config


@dataclass
class PretrainConfig:
    output_dir: str = "runs/pretrain"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    card: CardConfig = field(default_factory=CardConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class TaskConfig:
    """One task of a multi-task run: its own data, label set and long-text strategy; the encoder is shared."""
    name: str = ""
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class MultitaskConfig:
    sampling: str = "proportional"  # proportional (paper's code) | uniform | temperature (p ∝ size^alpha)
    alpha: float = 0.5


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=-1, epochs=3.0, micro_batch_size=24,
                                                                   save_every=0, keep_last=1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.1))
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    card: CardConfig = field(default_factory=CardConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tasks: list = field(default_factory=list)  # list[TaskConfig]: several → multi-task (then data/text unused)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)


@dataclass
class RecipeStages:
    """Which stages of the paper's pipeline (Table 6/7) to run, in this order."""
    fit_baseline: bool = True  # FiT of each task from the starting model (BERT-FiT)
    further_pretrain: bool = True  # ITPT/IDPT/CDPT on `pretrain.data.corpora` (skipped if none)
    fit_after_pretrain: bool = True  # FiT from the further pre-trained model (BERT-ITPT-FiT)
    multitask: bool = True  # MFiT on all tasks (from the pre-trained model when there is one)
    fit_after_multitask: bool = True  # each task again, alone, from its MFiT model (…-MFiT-FiT)
    lr_scale_after_multitask: float = 0.5  # "with a lower learning rate" (the paper gives no value)
    pretrain_label: str = "ITPT"  # how the table names further pre-training: ITPT | IDPT | CDPT


@dataclass
class RecipePretrain:
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class RecipeFinetune:
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=-1, epochs=3.0, micro_batch_size=24,
                                                                   save_every=0, keep_last=1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.1))
    eval: EvalConfig = field(default_factory=EvalConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)


@dataclass
class RecipeConfig:
    """further pre-train → multi-task → per-task fine-tune, each stage in its own subdir of output_dir."""
    output_dir: str = "runs/recipe"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list = field(default_factory=list)  # list[TaskConfig]
    stages: RecipeStages = field(default_factory=RecipeStages)
    pretrain: RecipePretrain = field(default_factory=RecipePretrain)
    finetune: RecipeFinetune = field(default_factory=RecipeFinetune)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    card: CardConfig = field(default_factory=CardConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# list fields whose items are themselves typed sections
_LIST_ITEM_TYPES = {(PretrainDataConfig, "corpora"): CorpusSource, (FinetuneConfig, "tasks"): TaskConfig,
                    (RecipeConfig, "tasks"): TaskConfig}

CHOICES = {
    "model.precision": ("auto", "fp32", "bf16", "fp16"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "unpadded"),
    "optim.scheduler": ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                        "polynomial"),
    "wandb.mode": ("online", "offline", "disabled"),
    "log.level": ("debug", "info", "warning", "error"),
    "data.corpora.format": ("auto", "txt", "jsonl", "csv", "tsv", "parquet", "hub"),
    "data.corpora.doc_separator": ("line", "blank"),
    "data.format": ("auto", "jsonl", "csv", "tsv", "parquet", "hub"),
    "data.problem_type": ("single_label", "multi_label", "regression"),
    "text.strategy": ("head", "tail", "head_tail", "hierarchical"),
    "text.chunk_pool": ("mean", "max", "attention"),
    "head.layer_pool": ("concat", "mean", "max"),
    "multitask.sampling": ("proportional", "uniform", "temperature"),
}



@dataclass
class GridConfig:
    """A sweep (launch/grid.py): a base run config, values for any of its keys, seeds; each point is its own run."""
    output_dir: str = "runs/grid"
    stage: str = "finetune"  # finetune | pretrain | recipe: the entry point each point runs
    base: str = ""  # the base run config (YAML; relative paths from the repo root)
    overrides: dict = field(default_factory=dict)  # config key → value, for every point
    axes: dict = field(default_factory=dict)  # config key → list of values; the grid is their product
    seeds: list = field(default_factory=lambda: [42])
    launcher: str = ""  # "": `python launch/<stage>.py`; else an accelerate config: `accelerate launch --config_file …`
    study: str = "auto"  # auto | truncation | layer | lr_decay | forgetting | few_shot | pretrain_steps | stages | generic
    paper_dataset: Optional[str] = None  # the paper's column to print beside ours (imdb, sogou, trec, ag, …)
    # axis key → display names for its values, in order (tables, figures): e.g. start models given as paths
    labels: dict = field(default_factory=dict)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

# ----------------------------------------------------------------------------- building
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def build(cls, data: Any, prefix: str = "", defaults: Any = None):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types by full key name.

    Keys the dict leaves out keep the value in `defaults` (an instance of `cls`; default `cls()`), and a section
    given in the dict starts from the parent's default for that section — not from its class's: a fine-tuning
    config's `train:` section without `max_steps` keeps fine-tuning's max_steps=-1 (run `epochs`), not the
    1000 steps of `TrainConfig()`, which are pre-training's."""
    base = defaults if defaults is not None else cls()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, tp, value = prefix + f.name, hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, value, key + ".", getattr(base, f.name))
            continue
        if isinstance(tp, type) and tp is float and isinstance(value, str):
            try:  # YAML reads `5e-5` (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
        item_cls = _LIST_ITEM_TYPES.get((cls, f.name))
        if item_cls is not None:
            value = [build(item_cls, v, f"{key}[{i}].") for i, v in enumerate(value)]
        kwargs[f.name] = value
    obj = dataclasses.replace(base, **kwargs)
    _check_choices(obj, prefix)
    return obj


def _generic_key(key: str) -> str:
    """`tasks.text.strategy` / `finetune.optim.scheduler` / `pretrain.data.corpora.format` → the top-level key."""
    for section in ("tasks.", "finetune.", "pretrain."):
        key = key.removeprefix(section)
    return key


def _check_choices(obj, prefix: str) -> None:
    generic = re.sub(r"\[\d+\]", "", prefix).rstrip(".")
    for f in dataclasses.fields(obj):
        key = f"{generic}.{f.name}".lstrip(".")
        allowed = CHOICES.get(key) or CHOICES.get(_generic_key(key))
        value = getattr(obj, f.name)
        if allowed and value not in allowed:
            raise UserError(f"config key '{prefix}{f.name}' must be one of {', '.join(allowed)}; got {value!r}")


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; value parsed as YAML (so `1e-4`, `true`, `[a, b]` work)."""
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"override '{key}': '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load(cls, path: Optional[str], overrides: list[str]):
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(data, item)
    return build(cls, data)


def describe(cls, prefix: str = "") -> list[str]:
    """One line per key with its default: the body of `--help`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        item_cls = _LIST_ITEM_TYPES.get((cls, f.name))
        lines.append(f"  {prefix}{f.name} = {default!r}  ({_type_name(tp)})")
        if item_cls is not None:
            lines += [f"  {ln.strip()}" for ln in describe(item_cls, f"{prefix}{f.name}[i].")]
        key = re.sub(r"\[i\]", "", prefix) + f.name
        choices = CHOICES.get(key) or CHOICES.get(_generic_key(key))
        if choices:
            lines[-1] += f"  one of: {', '.join(choices)}"
    return lines
