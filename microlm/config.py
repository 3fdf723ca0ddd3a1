"""Strict, typed configuration: one YAML file per profile under ``configs/``.

Every key must be known (a typo is an error, not a silently ignored setting), and every value is
checked against the dataclass field type.  ``load_config("smoke")`` reads ``configs/smoke.yaml``;
``load_config("path/to/file.yaml")`` reads that file; ``overrides`` take ``"section.key=value"``
strings (values parsed as YAML), as the CLI's ``--set`` does.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import yaml

from microlm.data.tasks import TASKS
from microlm.errors import ConfigError, MicroLMError
from microlm.ie.formats import IE_FORMATS
from microlm.infer.config import GenerationConfig
from microlm.model.config import LoRAConfig, ModelConfig
from microlm.tokenizer.bpe import resolve_pattern

PROFILES = ("smoke", "cpu", "laptop", "gpu")
REPO_ROOT = Path(__file__).resolve().parent.parent  # the source checkout (shipped data, notebooks)
CONFIG_DIR = REPO_ROOT / "configs"
ENV_RUNS = "MICROLM_RUNS"
ENV_QWEN = "MICROLM_QWEN"  # a local Qwen2.5 folder (or hub id): overrides the profile's ``qwen``


def project_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) that holds a
    ``configs/`` folder and a ``pyproject.toml`` or ``_config.yml`` — the course checkout, whether the
    CLI runs at its root or papermill/Jupyter Book/JupyterLab run a notebook in ``notebooks/``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "configs").is_dir() and ((d / "pyproject.toml").is_file() or (d / "_config.yml").is_file()):
            return d
    return None


def runs_root() -> Path:
    """Where stage folders go: ``$MICROLM_RUNS``, else ``<project root>/runs``, else ``./runs`` —
    never inside the installed package."""
    env = os.environ.get(ENV_RUNS)
    if env:
        return Path(env).resolve()
    return (project_root() or Path.cwd()) / "runs"


@dataclass
class DataConfig:
    """Where the real datasets live and which files feed the pretraining corpus."""

    root: str | None = None  # falls back to $MICROLM_DATA, then to the embedded default
    pretrain: list[str] = field(default_factory=lambda: ["pretrain/*.jsonl.gz"])
    max_records: int | None = None  # per run, across all inputs (None = all)


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard of character shingles at which a doc is a near-duplicate
    num_perm: int = 128
    shingle_size: int = 5
    bands: int | None = None  # None: chosen to minimise false positives + negatives at `threshold`
    verify: bool = True  # check LSH candidates against the stored signatures


@dataclass
class CorpusConfig:
    """Stage A1–A2: clean · dedup · split · EOS."""

    min_chars: int = 20
    max_chars: int = 20000
    max_line_bytes: int = 4 * 1024 * 1024
    min_cjk_ratio: float = 0.3
    max_dup_line_ratio: float = 0.3
    max_dup_ngram_ratio: float = 0.5
    strip_markup: bool = True
    val_fraction: float = 0.01
    eos: str = "<|endoftext|>"
    workers: int = 2
    batch_size: int = 1000
    exclude_heldout_tasks: bool = True  # leave out the paragraphs whose sentences evaluate SFT/LoRA tasks
    dedup: DedupConfig = field(default_factory=DedupConfig)


@dataclass
class TokenizerConfig:
    """Stage A3: byte-level BPE trained on the corpus stage's train split."""

    vocab_size: int = 6400  # counts the special tokens and the 256 bytes
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    pattern: str = "qwen2"  # a name in microlm.tokenizer.PATTERNS (gpt2 | qwen2) or a regex
    workers: int = 2  # pre-tokenisation processes
    compare_hf: bool = True  # also train HF tokenizers' BpeTrainer (MiniMind's recipe) for the report


@dataclass
class TokensConfig:
    """Stage A4: corpus JSONL → uint16 token files + document index."""

    workers: int = 2
    batch_docs: int = 256


@dataclass
class TrainConfig:
    """The training loop shared by pretraining, SFT and LoRA (stage A5 uses section ``pretrain``)."""

    batch_size: int = 32  # sequences per optimizer step, over all processes and micro-steps
    micro_batch_size: int | None = None  # per process per micro-step; None = batch_size / processes
    seq_len: int = 256
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases never decay; embeddings only if this is true
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA or CPU) | auto (bf16 where native: microlm.hw)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    eval_interval: int = 100
    eval_batches: int = 10
    ckpt_interval: int = 100
    log_interval: int = 10
    sample_tokens: int = 48  # tokens generated from each prompt at eval points (0 = none)
    sample_prompts: list[str] = field(default_factory=lambda: ["中国的首都是", "今天天气"])


@dataclass
class SFTDataConfig:
    """Stage A6 data: MiniMind ``{"conversations"}`` JSONL under the data root (else the embedded set)."""

    files: list[str] = field(default_factory=lambda: ["sft/*.jsonl.gz"])
    heldout: list[str] = field(default_factory=lambda: ["sft/belle_eval_set.jsonl.gz"])  # never trained on
    max_records: int | None = None  # training conversations (None = all)
    val_records: int = 200  # held-out conversations used for the SFT val loss
    show_answers: int = 5  # held-out questions answered before and after SFT in the report
    tasks: list[str] = field(default_factory=lambda: ["places", "persons"])  # derived tasks (microlm/data/tasks.py)
    task_records: int = 1500  # training conversations per derived task
    task_eval: int = 100  # held-out conversations per derived task, scored before and after SFT
    min_task_share: float = 0.85  # at least this share of sampled conversations are task ones (short answers)


def _ie_sources() -> dict[str, str]:
    return {
        "ie/instructie_examples.jsonl": "instructie",
        "ie/iepile_raw/deepke_*_sample.json.gz": "iepile_sample",
        "ie/re_raw/ske2019_sample/*_data.json.gz": "duie_spo",
        "ie/re_raw/cmeie_dev/CMeIE_dev.json.gz": "cmeie",
        "ie/re_raw/deepke_re_standard/[tv]*.csv.gz": "deepke_csv",
        "ie/re_raw/thunlp_finre/[tv]*.txt.gz": "finre",
        "ie/re_raw/thunlp_sanwen/[tv]*.txt.gz": "sanwen",
        "ie/re_raw/crownpku_people_relation/t*.txt.gz": "people_tsv",
        "ie/re_raw/percent4_people_relation/*.xlsx.gz": "people_xlsx",
    }


@dataclass
class IEDataConfig:
    """Stages B1–B2: which files feed the IE pipeline (glob under the data root → format) and how
    relations the map does not know are handled (kept under ``unmapped_topic``; null = dropped)."""

    sources: dict[str, str] = field(default_factory=_ie_sources)
    unmapped_topic: str | None = "其他"
    keep_samples: int = 3  # examples kept per drop/issue reason in the stats files
    schema: list[str] = field(default_factory=lambda: ["ie/instructie_schema_zh.json", "ie/instructie_schema_en.json"])
    min_text_chars: int = 5
    max_text_chars: int = 512
    max_entity_chars: int = 64
    near_dup_threshold: float | None = 0.9  # Jaccard of character 5-grams between texts; null = no near-dup check
    workers: int = 2  # processes computing MinHash signatures in step 02 (1 = none)
    rare_relation_triples: int = 20  # relations with fewer triples are listed as the long tail
    split_num: int = 4  # relations per instruction (IEPile); absent ones are answered with []
    shuffle_variants: int = 0  # extra copies with the schema relations in another order
    max_empty_chunks: int | None = 1  # all-empty chunks kept per record and variant (null = all)
    val_fraction: float = 0.05  # of the texts of each stratum (strata with < 3 texts go to train)
    test_fraction: float = 0.05
    eval_prompts: int = 40  # fixed evaluation prompts drawn from test, round-robin over topics
    embedded: bool = True  # add the project-written InstructIE records (data/ie/embedded_zh.jsonl)
    cutoff_tokens: int = 1024  # step 06: examples longer than this under the Qwen2.5 tokenizer are dropped
    token_sample: int = 0  # step 06: examples measured per split and tokenizer (0 = all; eval prompts always all)


def _ie_lora_train() -> TrainConfig:
    return TrainConfig(batch_size=8, seq_len=1024, max_steps=100, lr=2e-4, min_lr=2e-5, warmup_steps=10,
                       weight_decay=0.0, eval_interval=50, ckpt_interval=50, log_interval=5, sample_tokens=0)


def _ie_lora_runs() -> list[dict[str, str]]:
    return [{"name": "qwen2.5-1.5b", "base": "Qwen/Qwen2.5-1.5B-Instruct", "engine": "peft"}]


IE_LORA_ENGINES = ("peft", "microlm")


@dataclass
class IELoRAConfig:
    """Stage B3: LoRA on a causal LM for the IE task, one adapter per entry of ``runs`` (``name``;
    ``base`` = ``hf`` (the hf stage's MicroLM export), a local folder or a hub id; ``engine`` = ``peft``
    | ``microlm``).  Defaults are the Qwen2.5-1.5B-Instruct recipe: r 8, alpha 16, dropout 0.05 on
    every linear projection of the blocks (never ``lm_head`` or the embeddings)."""

    # each run: {name, base, engine, with?}; ``with`` = settings of this section that differ for this run
    # (dotted like --set, e.g. {train.lr: 0.0002, dropout: 0.0}: a 0.5B Qwen and the 6.4M MicroLM want other ones)
    runs: list[dict] = field(default_factory=_ie_lora_runs)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    cutoff_tokens: int | None = None  # longer examples dropped (counted); None = the base's context / ie_data's
    group: int = 50  # length grouping: mega-batches of group × batch_size examples sorted by length
    gradient_checkpointing: bool = False
    val_examples: int = 200  # held-out examples in the val loss (0 = all of 06_val.jsonl)
    train_examples: int = 0  # a seeded sample of this many training conversations (0 = all of 06_train.jsonl)
    # the training mix (microlm/ie/mix.py): balanced by topic, this share of all-empty answers (≈ the share of
    # all-empty chunks IEPile's test protocol asks: 0.71 on the bundle) ...
    empty_share: float = 0.7
    # ... and no conversation whose text is a near-duplicate (MinHash Jaccard ≥ this) of a test text; null = no check
    decontaminate: float | None = 0.8
    train: TrainConfig = field(default_factory=_ie_lora_train)


@dataclass
class IEMergedConfig:
    """Stage B5: merge each ``ie_lora`` run's adapter into its base (``runs``: which; null = all), save it
    in the base's dtype and verify it (fp32 logits within ``logits_atol`` of base + adapter on every
    evaluation prompt, greedy answers of up to ``max_new_tokens`` equal on ``greedy_prompts`` of them)."""

    runs: list[str] | None = None
    logits_atol: float = 1e-4
    max_new_tokens: int = 128
    greedy_prompts: int = 0  # greedy answers compared on the first N evaluation prompts (0 = all); logits: all
    batch_size: int = 4  # prompts per forward in the checks (logits: one batch's tokens × vocabulary in fp32)
    max_shard_size: str = "2GB"


def _ie_eval_models() -> list[dict]:
    return [{"name": "qwen2.5-1.5b", "backend": "transformers", "model": "Qwen/Qwen2.5-1.5B-Instruct"},
            {"name": "qwen2.5-1.5b-ie", "backend": "transformers", "model": "Qwen/Qwen2.5-1.5B-Instruct",
             "adapter": "ie_lora:qwen2.5-1.5b"},
            {"name": "microlm-31.7m", "backend": "microlm", "model": "hf"},
            {"name": "microlm-31.7m-ie", "backend": "transformers", "model": "hf", "adapter": "ie_lora:microlm-31.7m"}]


IE_EVAL_BACKENDS = ("microlm", "transformers", "openai")
IE_EVAL_MODEL_KEYS = ("name", "backend", "model", "adapter", "constrained", "base_url", "model_name", "api_key_env",
                      "prompt")
IE_EVAL_PROTOCOLS = ("ours", "iepile")


@dataclass
class IEEvalConfig:
    """Stage B4: every entry of ``models`` answers the evaluation prompts greedily.  An entry is
    ``{name, backend: microlm | transformers | openai, model, adapter?, constrained?, base_url?,
    model_name?, api_key_env?}``; ``model``/``adapter`` name a course stage (``hf``,
    ``ie_lora:<run>``, ``ie_merged:<run>``), a local folder or a hub id.  ``floors`` adds the two rows
    computed without a model; ``all`` evaluates the whole test split instead of the 40 prompts."""

    models: list[dict] = field(default_factory=_ie_eval_models)
    floors: bool = True
    all: bool = False
    limit: int = 0  # the first N prompts only (0 = all)
    # ours: the fixed prompts, one chunk each; iepile: every chunk of their records under IEPile's test chunking,
    # a record's answers merged and scored against its whole relation list (IEPile's eval_func counting)
    protocols: list[str] = field(default_factory=lambda: ["ours"])
    compare: list[list[str]] | None = None  # [A, B] pairs for the paired bootstrap (null = every pair)
    max_new_tokens: int = 256  # at least: each model's cap also holds the longest gold answer it is asked for
    stop: list[str] = field(default_factory=lambda: ["<|im_end|>"])
    batch_size: int = 8
    bootstrap_samples: int = 1000
    concurrency: int = 4  # openai backend: requests in flight
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 0.5


@dataclass
class ServeConfig:
    """Stage B6's server (``microlm serve`` and the serve_* stages): vLLM from the serving environment
    for ``model`` (a stage reference like ``ie_merged:<run>``, or a folder), bound to ``host``;
    ``port`` 0 = a free port (the stages), ``tensor_parallel_size`` is passed to vLLM (several GPUs)."""

    model: str = "ie_merged:qwen2.5-1.5b"
    served_model_name: str = "microlm-ie"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None  # the name of an environment variable holding the API key
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    max_num_seqs: int = 64
    startup_timeout_s: float = 600.0


@dataclass
class ServeSmokeConfig:
    """Stage B6a: checks of the served model, and greedy parity with ``transformers`` on the first
    ``parity_prompts`` evaluation prompts (0 = all)."""

    parity_prompts: int = 0
    max_tokens: int = 128
    structured_max_tokens: int = 512
    structured_max_items: int = 4  # the structured-output check's schema: pairs per relation …
    structured_max_chars: int = 64  # … and characters per entity (its longest legal answer must fit)


@dataclass
class ServeBenchConfig:
    """Stage B6b: the same load (the IE prompts and random prompts, each at every ``concurrency``)
    against vLLM and the ``transformers serve`` baseline; ``compare_at`` = the concurrency of the ratio."""

    datasets: list[str] = field(default_factory=lambda: ["ie", "random"])
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    requests_min: int = 8
    requests_per_concurrency: int = 2  # requests per level = max(requests_min, this × concurrency)
    ie_max_tokens: int = 128
    random_input_tokens: int = 128
    random_output_tokens: int = 64
    compare_at: int = 16
    baseline: bool = True
    timeout_s: float = 600.0


@dataclass
class ServeSoakConfig:
    """Stage B6c: ``concurrency`` clients for ``duration_s`` seconds, every ``malformed_every``-th
    request malformed, a server restart at ``restart_at_s`` (0 = none), windows of ``window_s``."""

    duration_s: float = 60.0
    concurrency: int = 4
    window_s: float = 10.0
    max_tokens: int = 64
    malformed_every: int = 10
    restart_at_s: float = 30.0
    request_timeout_s: float = 120.0


def trajectory_config(c: TrainConfig) -> dict:
    """The training settings that change the loss curve (what a stage's fingerprint and a resumed run
    must match; logging, eval and checkpoint intervals do not count)."""
    from microlm.hw import resolve_precision

    keys = ("batch_size", "seq_len", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
            "decay_embeddings", "beta1", "beta2", "grad_clip")
    # the precision this machine runs (``auto`` resolved): bf16 and fp32 curves drift apart
    return {**{k: getattr(c, k) for k in keys}, "precision": resolve_precision(c.precision, c.device)}


def _lora_train() -> TrainConfig:
    return TrainConfig(batch_size=16, seq_len=256, max_steps=200, lr=2e-3, min_lr=2e-4, warmup_steps=10,
                       weight_decay=0.0, eval_interval=50, ckpt_interval=50, sample_tokens=0)


def _sft_train() -> TrainConfig:
    return TrainConfig(batch_size=16, seq_len=256, max_steps=300, lr=5e-4, min_lr=5e-5, warmup_steps=20,
                       eval_interval=100, ckpt_interval=100, sample_tokens=0)


@dataclass
class SFTConfig:
    """Stage A6: full-parameter SFT — its data (``sft.data``) and its training loop (``sft.train``)."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=_sft_train)


@dataclass
class LoRASection(LoRAConfig):
    """Stage A7: the adapters (r, alpha, dropout, targets), the task they learn — a derived task
    (``microlm/data/tasks.py``) that SFT never saw (not in ``sft.data.tasks``) — and the training loop
    (``lora.train``)."""

    task: str = "orgs"
    train_records: int = 2000
    eval_records: int = 100
    train: TrainConfig = field(default_factory=_lora_train)


EXPORT_SOURCES = ("sft", "pretrain", "lora")


@dataclass
class HFConfig:
    """Stage A8 export: which stage's model becomes the Hugging Face folder (``lora``: the SFT model
    with the adapter merged).  Sampling defaults for ``generation_config.json`` come from ``generate``."""

    source: str = "sft"


@dataclass
class Config:
    profile: str = "smoke"
    seed: int = 1234
    # the Qwen2.5 instruct model of pipeline B, named once: a hub id (fetched by transformers' cache where
    # there is internet; HF_HUB_OFFLINE=1 respected) or a local folder; ``$MICROLM_QWEN`` overrides it.
    # Model entries say ``qwen`` (ie_lora.runs[].base, ie_eval.models[].model) to mean this model.
    qwen: str | None = None
    run_dir: str | None = None  # default: runs/<profile>
    data: DataConfig = field(default_factory=DataConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    hf: HFConfig = field(default_factory=HFConfig)
    generate: GenerationConfig = field(default_factory=GenerationConfig)  # A8: chat, export defaults
    ie_data: IEDataConfig = field(default_factory=IEDataConfig)  # B1–B2
    ie_lora: IELoRAConfig = field(default_factory=IELoRAConfig)  # B3
    ie_merged: IEMergedConfig = field(default_factory=IEMergedConfig)  # B5
    ie_eval: IEEvalConfig = field(default_factory=IEEvalConfig)  # B4
    serve: ServeConfig = field(default_factory=ServeConfig)  # B6: the server
    serve_smoke: ServeSmokeConfig = field(default_factory=ServeSmokeConfig)  # B6a
    serve_bench: ServeBenchConfig = field(default_factory=ServeBenchConfig)  # B6b
    serve_soak: ServeSoakConfig = field(default_factory=ServeSoakConfig)  # B6c

    @property
    def run_path(self) -> Path:
        """``run_dir`` when set (relative to the project root), else ``runs_root()/<profile>``."""
        if self.run_dir:
            p = Path(self.run_dir)
            return p if p.is_absolute() else (project_root() or Path.cwd()) / p
        return runs_root() / self.profile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(a, k) and _type_ok(b, v) for a, b in value.items())
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (allowed here: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path)
        else:
            if not _type_ok(value, tp):
                raise ConfigError(f"config key '{path}': {value!r} is not of type {_type_name(tp)}")
            kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _validate(cfg: Config) -> None:
    c = cfg.corpus
    t = cfg.tokenizer
    checks = [
        (cfg.profile in PROFILES or cfg.profile.isidentifier(), "profile must be a name"),
        (0 <= c.min_chars <= c.max_chars, "corpus.min_chars must be <= corpus.max_chars"),
        (0.0 <= c.min_cjk_ratio <= 1.0, "corpus.min_cjk_ratio must be in [0, 1]"),
        (0.0 < c.max_dup_line_ratio <= 1.0, "corpus.max_dup_line_ratio must be in (0, 1]"),
        (0.0 < c.max_dup_ngram_ratio <= 1.0, "corpus.max_dup_ngram_ratio must be in (0, 1]"),
        (0.0 <= c.val_fraction < 1.0, "corpus.val_fraction must be in [0, 1)"),
        (c.workers >= 0, "corpus.workers must be >= 0 (0 = in-process)"),
        (c.batch_size >= 1, "corpus.batch_size must be >= 1"),
        (c.max_line_bytes >= 1024, "corpus.max_line_bytes must be >= 1024"),
        (0.0 < c.dedup.threshold < 1.0, "corpus.dedup.threshold must be in (0, 1)"),
        (c.dedup.num_perm in (32, 64, 128, 256, 512, 1024), "corpus.dedup.num_perm must be a power of two in [32, 1024]"),
        (c.dedup.shingle_size >= 1, "corpus.dedup.shingle_size must be >= 1"),
        (c.dedup.bands is None or (c.dedup.bands >= 1 and c.dedup.num_perm % c.dedup.bands == 0),
         "corpus.dedup.bands must divide corpus.dedup.num_perm"),
        (cfg.data.max_records is None or cfg.data.max_records >= 1, "data.max_records must be >= 1"),
        (t.vocab_size >= len(set(t.special_tokens)) + 256,
         "tokenizer.vocab_size must be >= 256 + the number of special tokens"),
        (t.vocab_size <= 65536, "tokenizer.vocab_size must be <= 65536 (token files are uint16)"),
        ("<|endoftext|>" in t.special_tokens, "tokenizer.special_tokens must include <|endoftext|> (EOS)"),
        (all(t.special_tokens) and len(set(t.special_tokens)) == len(t.special_tokens),
         "tokenizer.special_tokens must be distinct non-empty strings"),
        (t.workers >= 1, "tokenizer.workers must be >= 1"),
        (cfg.tokens.workers >= 1, "tokens.workers must be >= 1"),
        (cfg.tokens.batch_docs >= 1, "tokens.batch_docs must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    trains = {"pretrain": cfg.pretrain, "sft.train": cfg.sft.train, "lora.train": cfg.lora.train}
    for name, tc in trains.items():
        _validate_train(name, tc)
        if tc.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"{name}.seq_len ({tc.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    for section in (cfg.model, cfg.generate):
        try:
            section.validate()
        except MicroLMError as e:
            raise ConfigError(f"{'model' if section is cfg.model else 'generate'}: {e}") from None
    if cfg.lora.r < 1 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1 or not cfg.lora.targets:
        raise ConfigError("lora: need r >= 1, alpha > 0, 0 <= dropout < 1 and at least one target")
    sd = cfg.sft.data
    if sd.val_records < 1 or (sd.max_records is not None and sd.max_records < 1):
        raise ConfigError("sft.data.val_records and sft.data.max_records must be >= 1")
    for task in [*sd.tasks, cfg.lora.task]:
        if task not in TASKS:
            raise ConfigError(f"unknown derived task {task!r} (known: {', '.join(TASKS)})")
    if cfg.lora.task in sd.tasks:
        raise ConfigError(f"lora.task {cfg.lora.task!r} is also in sft.data.tasks: the adapter must learn a task "
                          f"the SFT model has not seen")
    if not 0.0 <= sd.min_task_share < 1.0:
        raise ConfigError("sft.data.min_task_share must be in [0, 1)")
    if sd.task_records < 0 or sd.task_eval < 1 or cfg.lora.train_records < 1 or cfg.lora.eval_records < 1:
        raise ConfigError("sft.data.task_records must be >= 0; sft.data.task_eval, lora.train_records and "
                          "lora.eval_records >= 1")
    if cfg.hf.source not in EXPORT_SOURCES:
        raise ConfigError(f"hf.source must be one of {', '.join(EXPORT_SOURCES)}, got {cfg.hf.source!r}")
    _validate_ie_data(cfg.ie_data)
    _validate_ie_lora(cfg.ie_lora)
    _validate_ie_merged(cfg.ie_merged, cfg.ie_lora)
    _validate_ie_eval(cfg.ie_eval, cfg.ie_lora)
    _validate_serve(cfg.serve, cfg.serve_smoke, cfg.ie_lora)
    _validate_serve_bench(cfg.serve_bench)
    so = cfg.serve_soak
    if so.duration_s <= 0 or so.concurrency < 1 or so.window_s <= 0 or so.max_tokens < 1 or so.malformed_every < 0 \
            or not 0 <= so.restart_at_s < so.duration_s or so.request_timeout_s <= 0:
        raise ConfigError("serve_soak: duration_s, window_s, request_timeout_s > 0; concurrency, max_tokens >= 1; "
                          "malformed_every >= 0 (0 = none); 0 <= restart_at_s < duration_s")
    try:
        regex.compile(resolve_pattern(t.pattern))
    except regex.error as e:
        raise ConfigError(f"tokenizer.pattern is not a valid regex ({e})") from None


def _validate_ie_data(c: IEDataConfig) -> None:
    checks = [
        (bool(c.sources), "sources must name at least one glob"),
        (all(f in IE_FORMATS for f in c.sources.values()),
         f"sources: unknown format(s) {sorted(set(c.sources.values()) - set(IE_FORMATS))} "
         f"(known: {', '.join(IE_FORMATS)})"),
        (c.unmapped_topic is None or bool(c.unmapped_topic.strip()), "unmapped_topic must be a name or null"),
        (c.keep_samples >= 0, "keep_samples must be >= 0"),
        (bool(c.schema), "schema must list at least one file"),
        (1 <= c.min_text_chars <= c.max_text_chars, "need 1 <= min_text_chars <= max_text_chars"),
        (c.max_entity_chars >= 1, "max_entity_chars must be >= 1"),
        (c.near_dup_threshold is None or 0.0 < c.near_dup_threshold < 1.0, "near_dup_threshold must be in (0, 1) or null"),
        (c.workers >= 1, "workers must be >= 1"),
        (c.rare_relation_triples >= 0, "rare_relation_triples must be >= 0"),
        (c.split_num >= 1, "split_num must be >= 1"),
        (c.shuffle_variants >= 0, "shuffle_variants must be >= 0"),
        (c.max_empty_chunks is None or c.max_empty_chunks >= 0, "max_empty_chunks must be >= 0 or null"),
        (0.0 <= c.val_fraction < 1.0 and 0.0 <= c.test_fraction < 1.0 and c.val_fraction + c.test_fraction < 1.0,
         "val_fraction and test_fraction must be in [0, 1) and leave room for train"),
        (c.eval_prompts >= 1, "eval_prompts must be >= 1"),
        (c.cutoff_tokens >= 1, "cutoff_tokens must be >= 1"),
        (c.token_sample >= 0, "token_sample must be >= 0 (0 = all)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"ie_data.{msg}")


def ie_lora_run_config(cfg: Config, entry: dict) -> Config:
    """The config one ``ie_lora`` run trains with: ``ie_lora`` with the run's ``with`` settings applied."""
    if not entry.get("with"):
        return cfg
    return dataclasses.replace(cfg, ie_lora=_run_section(cfg.ie_lora, entry))


def _run_section(c: IELoRAConfig, entry: dict) -> IELoRAConfig:
    over = entry.get("with")
    if not isinstance(over, dict):
        raise ConfigError(f"ie_lora.runs: {entry.get('name')!r}: with must be a mapping of settings, got {over!r}")
    raw = dataclasses.asdict(c)
    for key, value in over.items():
        if not isinstance(key, str) or key.split(".")[0] in ("runs", "with"):
            raise ConfigError(f"ie_lora.runs: {entry.get('name')!r}: with cannot set {key!r}")
        _set_path(raw, key, value)
    where = f"ie_lora.runs[{entry.get('name')}].with"
    try:
        section = _build(IELoRAConfig, raw, where)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"{where}.", f"{where}: ")) from None
    try:
        _validate_ie_lora(section, nested=True)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return section


def _validate_ie_lora(c: IELoRAConfig, nested: bool = False) -> None:
    names = [r.get("name", "") for r in c.runs]
    for r in c.runs:
        extra = sorted(set(r) - {"name", "base", "engine", "with"})
        if extra or not r.get("name") or not r.get("base") or not isinstance(r.get("base"), str):
            raise ConfigError(f"ie_lora.runs: each run is {{name, base, engine, with?}}; got {r}")
        if r.get("with") is not None and not nested:
            _run_section(c, r)
        if r.get("engine", "peft") not in IE_LORA_ENGINES:
            raise ConfigError(f"ie_lora.runs: engine {r.get('engine')!r} is not one of {', '.join(IE_LORA_ENGINES)}")
        if not regex.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r["name"]):
            raise ConfigError(f"ie_lora.runs: name {r['name']!r} must be a folder name (letters, digits, . _ -)")
    if not c.runs or len(set(names)) != len(names):
        raise ConfigError("ie_lora.runs must list at least one run, with distinct names")
    if c.r < 1 or c.alpha <= 0 or not 0 <= c.dropout < 1 or not c.targets:
        raise ConfigError("ie_lora: need r >= 1, alpha > 0, 0 <= dropout < 1 and at least one target")
    if any(t in ("lm_head", "embed_tokens") for t in c.targets):
        raise ConfigError("ie_lora.targets: lm_head and the embeddings are never adapted")
    if (c.cutoff_tokens is not None and c.cutoff_tokens < 16) or c.group < 1 or c.val_examples < 0 \
            or c.train_examples < 0:
        raise ConfigError("ie_lora: cutoff_tokens >= 16 (or null), group >= 1, val_examples >= 0, train_examples >= 0")
    if not 0.0 <= c.empty_share <= 1.0 or (c.decontaminate is not None and not 0.0 < c.decontaminate <= 1.0):
        raise ConfigError("ie_lora: empty_share must be in [0, 1] and decontaminate in (0, 1] or null")
    _validate_train("ie_lora.train", c.train)


def _validate_ie_merged(c: IEMergedConfig, lora: IELoRAConfig) -> None:
    names = {r["name"] for r in lora.runs}
    unknown = sorted(set(c.runs or []) - names)
    if unknown:
        raise ConfigError(f"ie_merged.runs: {', '.join(unknown)} is not an ie_lora run ({', '.join(sorted(names))})")
    if c.logits_atol <= 0 or c.max_new_tokens < 1 or c.greedy_prompts < 0 or c.batch_size < 1:
        raise ConfigError("ie_merged: logits_atol > 0, max_new_tokens >= 1, greedy_prompts >= 0, batch_size >= 1")


def _validate_ie_eval(c: IEEvalConfig, lora: IELoRAConfig) -> None:
    names = [m.get("name", "") for m in c.models]
    for m in c.models:
        extra = sorted(set(m) - set(IE_EVAL_MODEL_KEYS))
        if extra or not m.get("name") or not m.get("model") or m.get("backend") not in IE_EVAL_BACKENDS:
            raise ConfigError(f"ie_eval.models: each model is {{name, backend ({' | '.join(IE_EVAL_BACKENDS)}), model, "
                              f"adapter?, constrained?, base_url?, model_name?, api_key_env?}}; got {m}")
        if m["backend"] == "openai" and not m.get("base_url"):
            raise ConfigError(f"ie_eval.models: {m['name']!r} (openai) needs base_url")
        if m.get("constrained") and m["backend"] != "transformers":
            raise ConfigError(f"ie_eval.models: {m['name']!r}: constrained decoding is a transformers-backend option")
        if m.get("prompt", "ie") not in ("ie", "zero_shot"):
            raise ConfigError(f"ie_eval.models: {m['name']!r}: prompt must be ie or zero_shot, got {m.get('prompt')!r}")
        # a model naming an ie_lora run that is not configured is a counted load_error in the stage,
        # not a config error (a user may change ie_lora.runs without touching ie_eval)
        if not regex.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", m["name"]) or m["name"].startswith("floor-"):
            raise ConfigError(f"ie_eval.models: name {m['name']!r} must be a folder name, not floor-*")
    if len(set(names)) != len(names):
        raise ConfigError("ie_eval.models: names must be distinct")
    if not c.protocols or set(c.protocols) - set(IE_EVAL_PROTOCOLS) or "ours" not in c.protocols:
        raise ConfigError(f"ie_eval.protocols: ours, and optionally iepile; got {c.protocols}")
    known = set(names) | ({"floor-empty", "floor-rule"} if c.floors else set())
    for pair in c.compare or []:
        if len(pair) != 2 or pair[0] == pair[1] or set(pair) - known:
            raise ConfigError(f"ie_eval.compare: each entry is [A, B], two different models or floors of "
                              f"ie_eval.models; got {pair}")
    if c.max_new_tokens < 1 or c.batch_size < 1 or c.bootstrap_samples < 100 or c.concurrency < 1 \
            or c.timeout_s <= 0 or c.retries < 0 or c.backoff_s < 0 or c.limit < 0:
        raise ConfigError("ie_eval: max_new_tokens, batch_size, concurrency >= 1; bootstrap_samples >= 100; "
                          "timeout_s > 0; retries, backoff_s, limit >= 0")


def _validate_serve(c: ServeConfig, sm: ServeSmokeConfig, lora: IELoRAConfig) -> None:
    # serve.model may name an ie_merged run that is not configured: the serve stages say so when they run
    if not 0 <= c.port <= 65535 or c.tensor_parallel_size < 1 or c.kv_cache_gib <= 0 or c.max_num_seqs < 1 \
            or c.startup_timeout_s <= 0 or (c.max_model_len is not None and c.max_model_len < 16):
        raise ConfigError("serve: port in 0..65535 (0 = free), tensor_parallel_size >= 1, kv_cache_gib > 0, "
                          "max_num_seqs >= 1, startup_timeout_s > 0, max_model_len >= 16 or null")
    if c.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"serve.dtype must be auto, float32, bfloat16 or float16, got {c.dtype!r}")
    if sm.parity_prompts < 0 or sm.max_tokens < 1 or sm.structured_max_tokens < 1 or sm.structured_max_items < 1 \
            or sm.structured_max_chars < 1:
        raise ConfigError("serve_smoke: parity_prompts >= 0; max_tokens, structured_max_* >= 1")


def _validate_serve_bench(c: ServeBenchConfig) -> None:
    if not c.datasets or set(c.datasets) - {"ie", "random"}:
        raise ConfigError(f"serve_bench.datasets: a non-empty subset of [ie, random], got {c.datasets}")
    if not c.concurrency or min(c.concurrency) < 1 or c.compare_at not in c.concurrency:
        raise ConfigError("serve_bench: concurrency levels >= 1, and compare_at must be one of them")
    if min(c.requests_min, c.requests_per_concurrency, c.ie_max_tokens, c.random_input_tokens,
           c.random_output_tokens) < 1 or c.timeout_s <= 0:
        raise ConfigError("serve_bench: requests_*, *_tokens >= 1 and timeout_s > 0")


def _validate_train(name: str, c: TrainConfig) -> None:
    checks = [
        (c.batch_size >= 1, "batch_size must be >= 1"),
        (c.micro_batch_size is None or 1 <= c.micro_batch_size <= c.batch_size, "micro_batch_size must be in [1, batch_size]"),
        (c.seq_len >= 2, "seq_len must be >= 2"),
        (c.max_steps >= 1, "max_steps must be >= 1"),
        (c.lr > 0 and 0 <= c.min_lr <= c.lr, "need lr > 0 and 0 <= min_lr <= lr"),
        (0 <= c.warmup_steps <= c.max_steps, "warmup_steps must be in [0, max_steps]"),
        (c.weight_decay >= 0, "weight_decay must be >= 0"),
        (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
        (c.grad_clip >= 0, "grad_clip must be >= 0"),
        (c.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
        (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:"), "device must be auto, cpu or cuda"),
        (min(c.eval_interval, c.eval_batches, c.ckpt_interval, c.log_interval) >= 1,
         "eval_interval, eval_batches, ckpt_interval and log_interval must be >= 1"),
        (c.sample_tokens >= 0, "sample_tokens must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{name}: {msg}")


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def resolve_config_path(profile_or_path: str | os.PathLike) -> Path:
    s = str(profile_or_path)
    if s in PROFILES or (os.sep not in s and not s.endswith((".yaml", ".yml"))):
        root = project_root()  # a project's own configs/ first, then the ones shipped with the code
        local = root / "configs" / f"{s}.yaml" if root else None
        path = local if local is not None and local.is_file() else CONFIG_DIR / f"{s}.yaml"
    else:
        path = Path(s)
    if not path.is_file():
        raise ConfigError(f"config not found: {path} (profiles: {', '.join(PROFILES)})")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty (copy a profile from configs/ and edit it)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A profile's settings: its file on top of the profile it ``extends`` (which lists only what differs)."""
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path.name}: extends must name a profile, got {parent!r}")
    ppath = resolve_config_path(parent)
    if ppath.resolve() in seen or ppath.resolve() == path.resolve():
        raise ConfigError(f"{path.name}: extends {parent!r} makes a cycle")
    base = _read_profile(ppath, (*seen, path.resolve()))
    base.pop("profile", None)  # the child's name, not the parent's
    return _merge(base, raw)


def load_config(profile_or_path: str | os.PathLike = "smoke", overrides: list[str] | dict | None = None) -> Config:
    """Load a profile name or YAML path strictly (``extends: <profile>`` takes that profile as the base
    and lists only what differs); apply ``section.key=value`` overrides."""
    path = resolve_config_path(profile_or_path)
    raw = _read_profile(path)
    raw.setdefault("profile", path.stem)
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        _set_path(raw, key, value)
    if isinstance(raw.get("model"), dict) and "vocab_size" in raw["model"]:
        raise ConfigError(f"{path.name}: model.vocab_size is not a setting — the model takes the tokenizer's "
                          f"(set tokenizer.vocab_size)")
    try:
        cfg = _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None
    cfg.model.vocab_size = cfg.tokenizer.vocab_size  # one number: the model's embedding = the tokenizer's ids
    _validate(cfg)
    return cfg


def qwen_model(cfg: Config) -> str:
    """The Qwen model entries called ``qwen`` mean: ``$MICROLM_QWEN``, else the profile's ``qwen``."""
    q = os.environ.get(ENV_QWEN) or cfg.qwen
    if not q:
        raise ConfigError(f"a model entry says 'qwen' but profile {cfg.profile!r} names no Qwen model: set "
                          f"qwen: in the profile, or {ENV_QWEN}=/path/to/a/local/Qwen2.5-Instruct folder")
    return str(Path(q).expanduser()) if os.sep in q and Path(q).expanduser().exists() else q


def resolve_model_name(cfg: Config, name: str) -> str:
    """``qwen`` → ``qwen_model(cfg)``; any other model name or reference as given."""
    return qwen_model(cfg) if name == "qwen" else name


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def stage_config(cfg: Config, section: str) -> dict[str, Any]:
    """The part of the config a stage depends on (what its manifest fingerprints)."""
    return dataclasses.asdict(getattr(cfg, section))
