"""Stages B1–B2 ``ie_data``: the InstructIE data pipeline — standardize, filter, stratify, derive, sample,
render (``microlm.ie.pipeline``; ``--step N`` runs one step)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from microlm.config import stage_config
from microlm.errors import ConfigError
from microlm.ie.formats import IE_FORMATS
from microlm.stages.registry import Option, Stage, StageRun
from microlm.stages.tokenizer import qwen_tokenizer

log = logging.getLogger("microlm")

STEP_NAMES = ("standardize", "filter", "stratify", "derive", "sample", "render")


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


def check(cfg) -> None:
    c = cfg.ie_data
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


def pipeline(cfg):
    """The plain settings the six steps read (``microlm.ie.pipeline.IEPipeline``) from a profile."""
    from microlm.data.sources import data_root
    from microlm.ie.pipeline import IEPipeline

    return IEPipeline(d=cfg.ie_data, root=data_root(cfg.data.root), seed=cfg.seed,
                      microlm_context=cfg.model.max_seq_len)


def _inputs(cfg, options: dict) -> list:
    from microlm.ie.pipeline import ie_sources, schema_paths
    from microlm.ie.standardize import RELATION_MAP

    q = qwen_tokenizer(cfg)
    ps = pipeline(cfg)
    return [p for p, _, _ in ie_sources(ps)] + schema_paths(ps) + [RELATION_MAP] + ([q] if q else [])


def build(run: StageRun) -> dict | None:
    """All six steps and the manifest metrics, or (option ``step``) one step and no manifest."""
    from microlm.ie.pipeline import STEPS, run_step

    only = run.options.get("step")
    ps = pipeline(run.cfg)
    stats = {}
    for step in [only] if only is not None else STEPS:
        st = stats[step] = run_step(ps, step, run.out, tokenizer_dir=run.up["tokenizer"])
        issues = st.get("issues", {}).get("counts", {})
        extra = f"; {sum(issues.values()):,} issues in {len(issues)} reasons" if issues else ""
        log.info("ie_data %s: %s records%s; %s s", st["step"], f"{st['records']:,}", extra, st["seconds"])
    if only is not None:
        return None
    return {"records_in": stats[1]["records"], "records_kept": stats[2]["records"], "examples": stats[4]["examples"],
            "train_examples": stats[6]["splits"]["train"]["out"],
            "eval_prompts": stats[6]["splits"]["eval_prompts"]["out"]}


STAGE = Stage(
    "ie_data", "B1–B2", "the InstructIE data pipeline: standardize, filter, stratify, derive, sample, render",
    build=build, section=IEDataConfig, check=check, upstream=("tokenizer",), sections=("ie_data",),
    key=lambda cfg, o: {"ie_data": stage_config(cfg, "ie_data"), "microlm_context": cfg.model.max_seq_len,
                        "seed": cfg.seed},
    inputs=_inputs, outputs=tuple(f"06_{s}.jsonl" for s in ("train", "val", "test", "eval_prompts", "test_iepile"))
    + ("05_eval_prompts.jsonl",) + tuple(f"0{n}_{step}_stats.json" for n, step in enumerate(STEP_NAMES, 1)),
    files={"train": "06_train.jsonl", "val": "06_val.jsonl", "test": "06_test.jsonl",
           "eval_prompts": "06_eval_prompts.jsonl", "test_iepile": "06_test_iepile.jsonl",
           "standardized": "01_standardized.jsonl", "filtered": "02_filtered.jsonl",
           "stratified": "03_stratified.jsonl", "derived": "04_derived.jsonl",
           **{f"sample_{s}": f"05_{s}.jsonl" for s in ("train", "val", "test", "eval_prompts", "test_iepile")},
           **{f"{step}_stats": f"0{n}_{step}_stats.json" for n, step in enumerate(STEP_NAMES, 1)}},
    notebook="09_ie_data", version=2,  # 2: the test split keeps every chunk; IEPile's test chunking
    options=(Option("step", "run one step: 1 standardize, 2 filter, 3 stratify, 4 derive, 5 sample, 6 render "
                    "(default: all six as a stage, skipped when nothing changed)", type=int, partial=True),),
    summary=lambda m: (f"{m['records_in']:,} records in, {m['records_kept']:,} kept, {m['examples']:,} examples; "
                       f"train {m['train_examples']:,}, eval prompts {m['eval_prompts']}"))
