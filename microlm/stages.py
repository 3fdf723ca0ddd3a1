"""The stage registry: every stage of the course declared once.

A :class:`Stage` names its upstream stages, the config it depends on, the function that builds it,
the files it writes, its notebook, its CLI verb and a one-line summary of its manifest.  Everything
stages have in common is done here, once: resolving (and building) upstream stages, fingerprinting
config + upstream + input files, skipping a stage whose fingerprint is unchanged, ``--force``,
``--out``, the process group of training stages, and the manifest.  The CLI (``microlm <stage>``),
``microlm stages``, the notebooks (``stages.require("sft", cfg)``) and the tests all go through it.

Adding a stage = its module (a ``build(run) -> metrics`` function) + one entry in ``REGISTRY`` + its
config section.  A stage's folder, config section and registry name are the same word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microlm.config import Config, stage_config, trajectory_config
from microlm.errors import MicroLMError
from microlm.hw import peak_rss_mb, reset_peak_rss
from microlm.io import recover_dir
from microlm.runs import MANIFEST, StageRun, file_digest, fingerprint, is_fresh, read_manifest, write_manifest

__all__ = ["Stage", "Option", "REGISTRY", "STAGES", "get_stage", "stage_dir", "build", "require", "upstream",
           "manifest", "status", "current_fingerprint", "data_fingerprint", "register", "stage_table",
           "course_map_markdown"]

log = logging.getLogger("microlm")


@dataclass(frozen=True)
class Option:
    """A stage-specific CLI option (``--input``, ``--source``, ``--step``, ``--resume``, ...).

    ``partial``: when given, the stage always runs and writes no manifest unless its build says it
    finished (``--stop-after``, ``--step``); ``run``: when given, the stage runs even if fresh."""

    name: str
    help: str
    type: Any = str
    default: Any = None
    many: bool = False  # repeatable (a list)
    flag: bool = False  # store_true
    choices: tuple | None = None
    partial: bool = False
    run: bool = False


TRAINING_OPTIONS = (
    Option("resume", "continue from the folder's last checkpoint", flag=True, run=True),
    Option("stop_after", "stop after this many steps (checkpointing as configured); resume later", type=int,
           partial=True),
)


@dataclass(frozen=True)
class Stage:
    """One stage of the course (see the module docstring)."""

    name: str  # = artifact folder = config section = CLI verb (``-`` and ``_`` alike)
    part: str  # the course map's label, e.g. "A5"
    help: str  # one line, the CLI's help
    build: str  # "module:function" taking a StageRun, returning the manifest metrics (None: not finished)
    outputs: tuple[str, ...]  # files the folder holds when the stage finished (relative)
    upstream: tuple[str, ...] = ()  # every stage it may read (the course map)
    needs: Callable[[Config, dict], tuple[str, ...]] | None = None  # the ones this run reads; default: upstream
    sections: tuple[str, ...] = ()  # config sections it reads (recorded in the manifest)
    key: Callable[[Config, dict], dict] | None = None  # what is fingerprinted; default: the sections
    inputs: Callable[[Config, dict], list] | None = None  # files outside the run folder it reads
    notebook: str | None = None
    aliases: tuple[str, ...] = ()  # the seed's script names, still accepted by the CLI
    options: tuple[Option, ...] = ()
    train: str | None = None  # the config path of its training loop (training stages run under torchrun)
    summary: Callable[[dict], str] | None = None  # one line from the manifest's metrics
    version: int = 1  # bump when the stage's code changes what it writes

    @property
    def all_options(self) -> tuple[Option, ...]:
        return self.options + (TRAINING_OPTIONS if self.train else ())

    def upstream_of(self, cfg: Config, options: dict) -> tuple[str, ...]:
        return self.needs(cfg, options) if self.needs else self.upstream

    def config_key(self, cfg: Config, options: dict) -> dict:
        if self.key is not None:
            return self.key(cfg, options)
        return {s: stage_config(cfg, s) for s in self.sections}

    def builder(self) -> Callable[[StageRun], dict | None]:
        module, _, fn = self.build.partition(":")
        return getattr(importlib.import_module(module), fn)


REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the registry (after its upstream stages); returns it."""
    missing = [u for u in stage.upstream if u not in REGISTRY]
    if missing:
        raise MicroLMError(f"stage {stage.name!r}: upstream {missing} not registered before it")
    REGISTRY[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """The stage called ``name`` (``-``/``_`` alike, aliases accepted); a one-line error otherwise."""
    key = name.replace("-", "_")
    for st in REGISTRY.values():
        if key == st.name or key in (a.replace("-", "_") for a in st.aliases):
            return st
    raise MicroLMError(f"unknown stage {name!r} (stages: {', '.join(REGISTRY)})")


def stage_dir(cfg: Config, name: str) -> Path:
    """The folder of stage ``name`` at this profile (``runs/<profile>/<stage>``); not built."""
    return cfg.run_path / get_stage(name).name


def manifest(name: str, cfg: Config) -> dict | None:
    return read_manifest(stage_dir(cfg, name))


def _digests(paths: list) -> list[dict]:
    return [{"path": str(p), "digest": file_digest(p)} for p in paths]


def _fingerprint(st: Stage, cfg: Config, up: dict[str, dict | None], options: dict) -> tuple[str, dict, list[dict]]:
    conf = st.config_key(cfg, options)
    inputs = _digests(st.inputs(cfg, options)) if st.inputs else []
    ups = {u: (m or {}).get("fingerprint") for u, m in up.items()}
    fp = fingerprint({"v": st.version, "config": conf, "upstream": ups, "inputs": [i["digest"] for i in inputs]})
    return fp, conf, inputs


def current_fingerprint(name: str, cfg: Config, **options) -> str:
    """The fingerprint stage ``name`` would have now (its upstream as built)."""
    st = get_stage(name)
    options = _with_defaults(st, options)
    return _fingerprint(st, cfg, {u: manifest(u, cfg) for u in st.upstream_of(cfg, options)}, options)[0]


def data_fingerprint(cfg: Config, inputs: list[str] | None = None) -> str:
    """The **data fingerprint**: the corpus stage's fingerprint (source contents, cleaning config,
    code version) — what recorded reference curves are keyed by.  ``inputs``: explicit files."""
    return current_fingerprint("corpus", cfg, input=inputs)


def status(name: str, cfg: Config) -> str:
    """``missing`` (never built here), ``partial`` (a run that was stopped, killed, or ran one step),
    ``stale`` (config, upstream or inputs changed, or a file it wrote changed or is gone) or ``fresh``."""
    m = manifest(name, cfg)
    if m is None:
        folder = stage_dir(cfg, name)
        return "partial" if folder.is_dir() and any(folder.iterdir()) else "missing"
    return "fresh" if is_fresh(stage_dir(cfg, name), current_fingerprint(name, cfg)) else "stale"


def upstream(name: str, cfg: Config, *, progress: bool = True) -> Path:
    """An earlier stage's folder: used as it is when it was built (whatever inputs it was given,
    e.g. ``microlm corpus --input``), built at this profile when missing."""
    folder = stage_dir(cfg, name)
    if read_manifest(folder) is not None:
        return folder
    return build(name, cfg, progress=progress)


def build(name: str, cfg: Config, *, force: bool = False, progress: bool = True, out_dir: str | Path | None = None,
          **options) -> Path:
    """Stage ``name``'s folder, built (with whatever upstream is missing) unless it is fresh.

    The folder is the stage's alone while it builds: an advisory lock keeps a second run out (it stops
    with one line naming the holder), the manifest is removed before anything in the folder changes and
    written last (listing every file with its digest), and a folder that holds anything but this
    stage's own output is refused rather than replaced."""
    st = get_stage(name)
    options = _with_defaults(st, options)
    ups = {u: upstream(u, cfg, progress=progress) for u in st.upstream_of(cfg, options)}
    folder = Path(out_dir) if out_dir else stage_dir(cfg, st.name)
    fp, conf, inputs = _fingerprint(st, cfg, {u: read_manifest(p) for u, p in ups.items()}, options)
    partial = any(options.get(o.name) not in (None, False, []) for o in st.all_options if o.partial)
    must_run = force or partial or any(options.get(o.name) not in (None, False, []) for o in st.all_options if o.run)
    if not must_run and is_fresh(folder, fp):
        log.info("%s: up to date (%s), skipped", st.name, folder)
        return folder
    main = _env_rank() == 0  # under torchrun, rank 0 owns the folder; the others write into it as told
    if _interrupted_run(st, folder, fp) and not force and not must_run:
        # the same run (config, upstream, inputs) was stopped part-way: go on from its last checkpoint
        # (exact: batches are a function of the step) instead of starting over; --force starts over
        options = {**options, "resume": True}
        log.warning("%s: resuming the interrupted run in %s (same config and inputs; --force starts over)",
                    st.name, folder)
    with folder_lock(folder, st.name) if main else contextlib.nullcontext():
        if main:
            _check_folder(st, folder, inputs, options, force=force)
            recover_dir(folder)
            (folder / MANIFEST).unlink(missing_ok=True)  # from here until the end the stage is not fresh
            _mark(folder, st.name, fp)
        run = StageRun(name=st.name, cfg=cfg, out=folder, up=ups, progress=progress, options=options, force=force)
        started = time.time()
        reset_peak_rss()
        if st.train:
            from microlm.train.dist import distributed  # torch: only training stages need it

            device = _lookup(cfg, st.train).device
            with distributed(device) as dist:
                run = dataclasses.replace(run, dist=dist)
                metrics = st.builder()(run)
                main = dist.is_main
        else:
            metrics = st.builder()(run)
        if metrics is not None and main:
            _mark(folder, st.name)  # a stage that replaced its whole folder dropped the mark
            write_manifest(folder, stage=st.name, fp=fp, config=conf, inputs=inputs, outputs=list(st.outputs),
                           metrics=metrics, started=started, peak_rss_mb=max([peak_rss_mb(), *_peaks(metrics)]),
                           upstream={u: {"path": str(p), "fingerprint": (read_manifest(p) or {}).get("fingerprint")}
                                     for u, p in ups.items()})
    return folder


def _peaks(metrics) -> list[int]:
    """Every ``peak_rss_mb`` a stage's metrics report (sub-runs reset the process's peak for their own)."""
    if isinstance(metrics, dict):
        return [v for k, v in metrics.items() if k == "peak_rss_mb" and isinstance(v, int)] + \
            [p for v in metrics.values() for p in _peaks(v)]
    return []


STAGE_MARK = ".microlm_stage"  # names the stage a folder belongs to, manifest or not (a killed or partial run)


def _mark(folder: Path, stage: str, fp: str | None = None) -> None:
    """The stage's mark: its name, and the fingerprint of the run writing the folder (atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{STAGE_MARK}.{os.getpid()}.tmp"
    tmp.write_text(stage + "\n" + (f"{fp}\n" if fp else ""), encoding="utf-8")
    os.replace(tmp, folder / STAGE_MARK)


def _mark_lines(folder: Path) -> list[str]:
    try:
        return (folder / STAGE_MARK).read_text(encoding="utf-8").split()
    except OSError:
        return []


def folder_stage(folder: Path) -> str | None:
    """The stage a folder was built by (its mark or manifest), ``None`` for any other folder."""
    lines = _mark_lines(folder)
    if lines:
        return lines[0]
    m = read_manifest(folder)
    return m.get("stage") if m else None


def _interrupted_run(st: Stage, folder: Path, fp: str) -> bool:
    """A training stage's folder holding a checkpoint of a run of this very fingerprint that did not
    finish (no manifest): stopped by Ctrl-C, killed, or cut with ``--stop-after``."""
    if not any(o.name == "resume" for o in st.all_options) or read_manifest(folder) is not None:
        return False
    return _mark_lines(folder)[:2] == [st.name, fp] and (
        (folder / "ckpt" / "state.json").is_file() or any(folder.glob("*/ckpt/state.json")))  # or a sub-run's


def _check_folder(st: Stage, folder: Path, inputs: list[dict], options: dict, *, force: bool) -> None:
    """Refuse to write where it would destroy something the stage did not make."""
    if folder.exists() and not folder.is_dir():
        raise MicroLMError(f"output folder {folder} is a file; give a folder (new, empty, or a {st.name} stage folder)")
    here = folder.resolve()
    for i in inputs:
        if here in Path(i["path"]).resolve().parents:
            raise MicroLMError(f"input {i['path']} is inside the output folder {folder}; move it or choose another --out")
    if folder.is_dir() and any(folder.iterdir()):
        owner = folder_stage(folder)
        if owner != st.name:
            what = f"a {owner} stage folder" if owner else "files this stage did not write"
            raise MicroLMError(f"output folder {folder} holds {what}; {st.name} writes only into a new, empty or "
                               f"{st.name} stage folder (choose another --out)")
        m = read_manifest(folder)
        if m is not None and "files" in m:
            theirs = sorted(set(_visible_files(folder)) - set(m["files"]))
            if theirs:
                raise MicroLMError(f"output folder {folder} holds {len(theirs)} file(s) {st.name} did not write, e.g. "
                                   f"{theirs[0]}; move them out or choose another --out")
    if options.get("stop_after") is not None and not force and read_manifest(folder) is not None:
        raise MicroLMError(f"{st.name} in {folder} is a finished run; --stop-after would cut it short — add --force to "
                           f"train it again, or give another --out")


def _visible_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


@contextlib.contextmanager
def folder_lock(folder: Path, stage: str):
    """An advisory ``fcntl`` lock on ``.<folder>.lock`` beside the folder (the folder itself may be
    replaced): a second run on the same folder stops with one line naming the holder's pid."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(f".{folder.name}.lock")
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise MicroLMError(f"{folder} is being built by another run (pid {holder}); wait for it to finish or "
                               f"stop it") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _with_defaults(st: Stage, options: dict) -> dict:
    known = {o.name for o in st.all_options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MicroLMError(f"stage {st.name}: unknown option(s) {unknown} (known: {sorted(known) or 'none'})")
    options = {**{o.name: o.default for o in st.all_options}, **options}
    if options.get("stop_after") is not None and options["stop_after"] < 1:
        raise MicroLMError(f"--stop-after must be >= 1 step, got {options['stop_after']}")
    return options


def require(name: str, cfg: Config, **kw) -> Path:
    """The folder of ``name`` at this profile, built if missing or stale (what notebooks call)."""
    return build(name, cfg, **kw)


def _lookup(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def stage_table(cfg: Config | None = None) -> list[dict]:
    """The course map: one row per stage (with its status at ``cfg``'s profile when given)."""
    rows = []
    for st in REGISTRY.values():
        row = {"part": st.part, "stage": st.name, "cli": f"microlm {st.name.replace('_', '-')}",
               "config": ", ".join(st.sections) or "—", "folder": f"runs/<profile>/{st.name}",
               "notebook": st.notebook or "—", "upstream": ", ".join(st.upstream) or "—"}
        if cfg is not None:
            row["status"] = status(st.name, cfg)
        rows.append(row)
    return rows


def course_map_markdown() -> str:
    """The course map as a Markdown table — the README and the book carry exactly this (tested);
    ``microlm stages --markdown`` prints it."""
    lines = ["| part | stage | notebook | CLI | config | artifacts in `runs/<profile>/<stage>/` |",
             "|---|---|---|---|---|---|"]
    for st in REGISTRY.values():
        verbs = f"`microlm {st.name.replace('_', '-')}`" + (f" (alias `{'`, `'.join(st.aliases)}`)" if st.aliases else "")
        lines.append(f"| {st.part} | **{st.name}** — {st.help} | `{st.notebook}` | {verbs} | "
                     f"{', '.join(f'`{c}`' for c in st.sections)} | {', '.join(f'`{o}`' for o in st.outputs)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stages of the course

def _corpus_inputs(cfg: Config, options: dict) -> list:
    from microlm.data.prepare_pretrain import corpus_sources

    return [s.path for s in corpus_sources(cfg, options.get("input"))]


def _sft_inputs(cfg: Config, options: dict) -> list:
    from microlm.train.sft import sft_files

    return sft_files(cfg)


def _qwen(cfg: Config) -> list:
    from microlm.tokenizer.stage import qwen_tokenizer_path

    q = qwen_tokenizer_path(cfg)
    return [q] if q else []


def _ie_inputs(cfg: Config, options: dict) -> list:
    from microlm.ie.pipeline import ie_sources, schema_paths
    from microlm.ie.standardize import RELATION_MAP

    return [p for p, _, _ in ie_sources(cfg)] + schema_paths(cfg) + [RELATION_MAP] + _qwen(cfg)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


register(Stage(
    "corpus", "A1–A2", "clean · dedup · split · EOS the pretraining corpus",
    build="microlm.data.prepare_pretrain:build", outputs=("train.jsonl", "val.jsonl", "report.json"),
    sections=("corpus",), key=lambda cfg, o: {"corpus": stage_config(cfg, "corpus"),
                                              "max_records": cfg.data.max_records, "seed": cfg.seed},
    inputs=_corpus_inputs, notebook="01_corpus", aliases=("prepare-pretrain",), version=2,
    options=(Option("input", "read these files instead of data.pretrain under MICROLM_DATA", many=True),),
    summary=lambda m: (f"records in {m['records_in']:,} → out {m['records_out']:,} (train {m['train_docs']:,}, "
                       f"val {m['val_docs']:,}); drops {m['drops']}; {m['records_per_s']:,} records/s")))

register(Stage(
    "tokenizer", "A3", "train the byte-level BPE tokenizer on the corpus train split",
    build="microlm.tokenizer.stage:build", upstream=("corpus",), sections=("tokenizer",),
    key=lambda cfg, o: {"tokenizer": stage_config(cfg, "tokenizer"),
                        "qwen": [file_digest(q) for q in _qwen(cfg)]},
    outputs=("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "report.json"),
    notebook="02_bpe_from_scratch", aliases=("train-tokenizer",), version=2,
    summary=lambda m: (f"vocab {m['vocab_size']}, trained in {m['train_s']} s; val chars/token: "
                       + "  ".join(f"{k} {v:.3f}" for k, v in m["compression"].items()))))

register(Stage(
    "tokens", "A4", "encode the corpus splits into uint16 token files + index",
    build="microlm.tokenizer.stage:build_tokens", upstream=("corpus", "tokenizer"), sections=("tokens",),
    key=lambda cfg, o: {},  # workers and batch size do not change the bytes written (tested)
    outputs=("train.bin", "train.idx", "val.bin", "val.idx", "meta.json"), notebook="03_tokens",
    aliases=("tokenize",),
    summary=lambda m: (f"{m['tokens_total']:,} tokens, docs {m['docs']}; {m['tokens_per_s']:,} tokens/s")))

register(Stage(
    "pretrain", "A5", "pretrain the TransformerLM (runs under torchrun for DDP)",
    build="microlm.train.pretrain:build", upstream=("tokenizer", "tokens"), sections=("model", "pretrain"),
    key=lambda cfg, o: {"model": stage_config(cfg, "model"), "seed": cfg.seed, "train": trajectory_config(cfg.pretrain)},
    outputs=("ckpt/model.safetensors", "metrics.jsonl", "report.json"), notebook="05_pretrain",
    train="pretrain",
    summary=lambda m: (f"{m['params']:,} params, {m['steps']} steps, val loss {_pct(m['final_val_loss'])}, "
                       f"bpb {_pct(m['final_val_bpb'])}, unigram entropy {_pct(m['unigram_entropy'])}, "
                       f"{m['tokens_per_s']} tokens/s")))

register(Stage(
    "sft", "A6", "full-parameter SFT from the pretraining checkpoint (torchrun-able)",
    build="microlm.train.sft:build", upstream=("tokenizer", "pretrain"), sections=("sft",),
    key=lambda cfg, o: {"data": stage_config(cfg, "sft")["data"], "seed": cfg.seed,
                        "train": trajectory_config(cfg.sft.train)},
    inputs=_sft_inputs, outputs=("ckpt/model.safetensors", "metrics.jsonl", "report.json"), notebook="06_sft",
    train="sft.train", version=3,
    summary=lambda m: (f"{m['kept']:,} conversations, {m['steps']} steps, held-out loss {_pct(m['base_val_loss'])} "
                       f"-> {_pct(m['final_val_loss'])}; "
                       + ", ".join(f"{t} F1 {b:.2f} -> {a:.2f}" for t, (b, a) in m.get("task_f1", {}).items()))))

register(Stage(
    "lora", "A7", "train LoRA adapters on the SFT model (a derived task SFT never saw: lora.task)",
    build="microlm.train.lora:build", upstream=("tokenizer", "sft"), sections=("lora",),
    key=lambda cfg, o: {"lora": {k: v for k, v in stage_config(cfg, "lora").items() if k != "train"},
                        "seed": cfg.seed, "train": trajectory_config(cfg.lora.train)},
    outputs=("adapter/adapter_model.safetensors", "metrics.jsonl", "report.json"), notebook="07_lora_math",
    train="lora.train", version=3,
    summary=lambda m: (f"{m['adapter_params']:,} trainable ({m['percent_of_base']} % of the base); held-out "
                       f"{m['task']}: F1 {m['f1_before']:.3f} -> {m['f1_after']:.3f}, exact match "
                       f"{m['exact_match_before']:.3f} -> {m['exact_match_after']:.3f}")))

register(Stage(
    "hf", "A8", "export a model as a transformers/vLLM-loadable Llama folder",
    build="microlm.infer.export:build", upstream=("tokenizer", "pretrain", "sft", "lora"),
    needs=lambda cfg, o: ("tokenizer",) + {"pretrain": ("pretrain",), "sft": ("sft",),
                                           "lora": ("sft", "lora")}[o.get("source") or cfg.hf.source],
    sections=("hf", "generate"),
    key=lambda cfg, o: {"source": o.get("source") or cfg.hf.source, "generate": stage_config(cfg, "generate")},
    outputs=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
             "report.json"),
    notebook="08_inference_chat", aliases=("export-hf",),
    options=(Option("source", "which stage's model (default hf.source; lora: the SFT model with the adapter "
                    "merged)", choices=("sft", "pretrain", "lora")),),
    summary=lambda m: (f"({m['source']}) " + (f"transformers: max |Δlogit| {m['logits_max_abs_diff']:.1e}, greedy "
                                              f"tokens equal {m['greedy_tokens_equal']}" if m["checked"]
                                              else "not checked (no transformers)"))))

register(Stage(
    "ie_data", "B1–B2", "the InstructIE data pipeline: standardize, filter, stratify, derive, sample, render",
    build="microlm.ie.pipeline:build", upstream=("tokenizer",), sections=("ie_data",),
    key=lambda cfg, o: {"ie_data": stage_config(cfg, "ie_data"), "microlm_context": cfg.model.max_seq_len,
                        "seed": cfg.seed},
    inputs=_ie_inputs, outputs=tuple(f"06_{s}.jsonl" for s in ("train", "val", "test", "eval_prompts", "test_iepile"))
    + ("05_eval_prompts.jsonl",) + tuple(f"0{n}_{step}_stats.json" for n, step in
                                        enumerate(("standardize", "filter", "stratify", "derive", "sample", "render"), 1)),
    notebook="09_ie_data", version=2,  # 2: the test split keeps every chunk; IEPile's test chunking
    options=(Option("step", "run one step: 1 standardize, 2 filter, 3 stratify, 4 derive, 5 sample, 6 render "
                    "(default: all six as a stage, skipped when nothing changed)", type=int, partial=True),),
    summary=lambda m: (f"{m['records_in']:,} records in, {m['records_kept']:,} kept, {m['examples']:,} examples; "
                       f"train {m['train_examples']:,}, eval prompts {m['eval_prompts']}")))

def _ie_bases(cfg: Config, options: dict) -> tuple[str, ...]:
    """ie_data, plus hf when a run's base is MicroLM's own export (``base: hf``)."""
    return ("ie_data",) + (("hf",) if any(r["base"] == "hf" for r in cfg.ie_lora.runs) else ())


def _qwen_key(cfg: Config, names) -> str | None:
    """The Qwen model the ``qwen`` entries mean (``$MICROLM_QWEN`` or the profile's), when one says it."""
    from microlm.config import qwen_model

    return qwen_model(cfg) if "qwen" in names else None


def _ie_lora_key(cfg: Config, options: dict) -> dict:
    lc = stage_config(cfg, "ie_lora")
    return {"ie_lora": {k: v for k, v in lc.items() if k != "train"}, "seed": cfg.seed,
            "train": trajectory_config(cfg.ie_lora.train), "qwen": _qwen_key(cfg, [r["base"] for r in cfg.ie_lora.runs])}


def _ie_runs(m: dict, fmt: Callable[[dict], str]) -> str:
    return "; ".join(f"{name}: {fmt(r)}" for name, r in m["runs"].items())


register(Stage(
    "ie_lora", "B3", "LoRA fine-tune for IE on the rendered chats (PEFT, or the from-scratch LoRA): one adapter per run",
    build="microlm.ie.train_lora:build", upstream=("ie_data", "hf"), needs=_ie_bases, sections=("ie_lora",),
    key=_ie_lora_key, outputs=("report.json",), notebook="10_qwen_lora", train="ie_lora.train",
    summary=lambda m: _ie_runs(m, lambda r: (f"{r['engine']}, {r['trainable_percent']} % trainable, val loss "
                                             f"{_pct(r['base_val_loss'])} -> {_pct(r['final_val_loss'])}, "
                                             f"{r['seconds']} s"))))

register(Stage(
    "ie_merged", "B5", "merge each IE adapter into its base: a verified Hugging Face folder per run",
    build="microlm.ie.export:build", upstream=("ie_data", "hf", "ie_lora"),
    needs=lambda cfg, o: _ie_bases(cfg, o) + ("ie_lora",), sections=("ie_merged",),
    outputs=("report.json",), notebook="10_qwen_lora",
    summary=lambda m: _ie_runs(m, lambda r: (f"max |Δlogit| {r['logits_max_abs_diff']:.1e}, greedy identical "
                                             f"{r['greedy_identical']}/{r['greedy_prompts']}"))))

def _ie_eval_needs(cfg: Config, options: dict) -> tuple[str, ...]:
    """ie_data, plus every stage a model entry names (``hf``, ``ie_lora:<run>``, ...) and what those
    stages need themselves (ie_lora's base)."""
    from microlm.ie.evaluate import ref_stages

    known = REGISTRY["ie_eval"].upstream
    named = set().union(*(ref_stages(m, known) for m in cfg.ie_eval.models)) if cfg.ie_eval.models else set()
    if any(m.get("base_url") == "serve" for m in cfg.ie_eval.models):  # the course's vLLM server of serve.model
        named.update(ref_stages({"model": cfg.serve.model}, known))
    if "ie_lora" in named or "ie_merged" in named:
        named.update(_ie_bases(cfg, options))
    return tuple(s for s in REGISTRY["ie_eval"].upstream if s in named | {"ie_data"})


register(Stage(
    "ie_eval", "B4", "evaluate models on the IE prompts: parse rate, schema, strict and relaxed F1 with intervals",
    build="microlm.ie.evaluate:build", upstream=("ie_data", "hf", "ie_lora", "ie_merged"), needs=_ie_eval_needs,
    sections=("ie_eval",),
    key=lambda cfg, o: {"ie_eval": stage_config(cfg, "ie_eval"), "all": bool(o.get("all")), "seed": cfg.seed,
                        "qwen": _qwen_key(cfg, [m.get("model") for m in cfg.ie_eval.models])},
    outputs=("results.jsonl", "summary.md", "summary.csv", "failures.md", "metrics.png", "topic_f1.png",
             "answers.png", "results_card.json", "report.json"),
    notebook="11_ie_eval",
    options=(Option("all", "the whole test split (first variant of each chunk) instead of the evaluation prompts",
                    flag=True),),
    summary=lambda m: f"{m['prompts']} prompts; " + "; ".join(
        f"{n}: F1 {r['f1']:.3f} [{r['f1_interval'][0]:.3f}, {r['f1_interval'][1]:.3f}], parse {r['parse_rate']:.2f}"
        for n, r in m["models"].items())))

def _serve_key(cfg: Config, section: str) -> dict:
    """A serve stage's fingerprint: its own section and the server's (not where it listens)."""
    return {"serve": {k: v for k, v in stage_config(cfg, "serve").items() if k not in ("port", "host")},
            section: stage_config(cfg, section)}


register(Stage(
    "serve_smoke", "B6", "serve the merged IE model with vLLM: health, models, an IE answer, structured output, "
    "greedy parity with transformers",
    build="microlm.serve.smoke:build", upstream=("ie_data", "ie_merged"), sections=("serve_smoke", "serve"),
    key=lambda cfg, o: _serve_key(cfg, "serve_smoke"),
    outputs=("report.json",), notebook="12_vllm",
    summary=lambda m: (f"structured output {m['structured']}, IE answer {m['ie_answer']}, greedy parity "
                       f"{m['identical']}/{m['prompts']}, server RSS {m['server_rss_mb']} MB")))

register(Stage(
    "serve_bench", "B6", "benchmark the served model like `vllm bench serve`: vLLM vs `transformers serve`, same "
    "load, concurrency 1–64",
    build="microlm.serve.bench:build", upstream=("ie_data", "ie_merged"), sections=("serve_bench", "serve"),
    key=lambda cfg, o: _serve_key(cfg, "serve_bench") | {"seed": cfg.seed},
    outputs=("report.json", "summary.json", "throughput.png", "latency_cdf.png"), notebook="12_vllm", version=2,
    summary=lambda m: (f"vLLM ÷ transformers serve, output tokens/s at concurrency {m['ratio_at']}: "
                       + ", ".join(f"{k} ×{v}" for k, v in m["ratios"].items()) + f"; vLLM {m['vllm_tps']} tok/s")))

register(Stage(
    "serve_soak", "B6", "a bounded stability run: errors, latency drift, memory, malformed requests, a restart "
    "under load",
    build="microlm.serve.soak:build", upstream=("ie_data", "ie_merged"), sections=("serve_soak", "serve"),
    key=lambda cfg, o: _serve_key(cfg, "serve_soak"),
    outputs=("report.json", "soak.png"), notebook="12_vllm", version=2,  # 2: the run outlasts a restart
    summary=lambda m: (f"{m['requests']} requests, steady-state error rate {m['steady_state_error_rate']}, "
                       f"malformed → 4xx {m['malformed_4xx']}, restart: {m['restart_failed']} failed in "
                       f"{m['restart_down_s']} s, RSS slope {m['rss_slope_mb_per_min']} MB/min")))

STAGES = REGISTRY  # the name the notebooks and tests used first

