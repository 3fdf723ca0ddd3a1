"""The stage graph: each stage knows its inputs, fingerprints them, and is skipped when unchanged.

Notebooks and the CLI call the same functions: ``corpus(cfg)`` returns the stage folder, building
it (and, in later stages, whatever it depends on) at the chosen profile when it is missing or stale.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from microlm.config import Config, stage_config
from microlm.errors import MicroLMError
from microlm.runs import file_digest, fingerprint, is_fresh, read_manifest, write_manifest

__all__ = ["corpus", "corpus_fingerprint", "tokenizer", "tokens", "pretrain", "sft", "lora", "hf", "ie_data", "require", "upstream", "manifest", "read_manifest", "STAGES"]

log = logging.getLogger("microlm")

# bump when a stage's code changes what it writes, so old artifacts are rebuilt
STAGE_VERSIONS = {"corpus": 2, "tokenizer": 2, "tokens": 1, "pretrain": 1, "sft": 3, "lora": 3, "hf": 1, "ie_data": 1}


def corpus_fingerprint(cfg: Config, sources=None) -> tuple[str, dict, list[dict]]:
    """``(fingerprint, config, inputs)`` of the corpus stage — the **data fingerprint** of everything
    trained on it: source contents, cleaning config, code version.  ``sources`` default: what the
    config resolves to here (``MICROLM_DATA`` or the embedded corpus)."""
    from microlm.data.prepare_pretrain import corpus_sources

    sources = corpus_sources(cfg) if sources is None else sources
    src_info = [{"path": s.path, "format": s.format, "digest": file_digest(s.path)} for s in sources]
    conf = {"corpus": stage_config(cfg, "corpus"), "max_records": cfg.data.max_records, "seed": cfg.seed}
    fp = fingerprint({"v": STAGE_VERSIONS["corpus"], "config": conf,
                      "inputs": [(i["format"], i["digest"]) for i in src_info]})
    return fp, conf, src_info


def corpus(cfg: Config, *, force: bool = False, inputs: list[str] | None = None, progress: bool = True,
           out_dir: str | Path | None = None) -> Path:
    """Stage A1–A2: ``runs/<profile>/corpus/{train,val}.jsonl`` + ``report.json``."""
    from microlm.data.prepare_pretrain import corpus_sources, prepare_pretrain

    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "corpus"
    sources = corpus_sources(cfg, inputs)
    fp, conf, src_info = corpus_fingerprint(cfg, sources)
    if not force and is_fresh(stage_dir, fp):
        log.info("corpus: up to date (%s), skipped", stage_dir)
        return stage_dir
    started = time.time()
    report = prepare_pretrain(cfg, stage_dir, sources=sources, progress=progress)
    metrics = {k: report[k] for k in ("records_in", "records_out", "train_docs", "val_docs", "drops")}
    metrics["records_per_s"] = report["throughput"]["records_per_s"]
    write_manifest(stage_dir, stage="corpus", fp=fp, config=conf, inputs=src_info,
                   outputs=["train.jsonl", "val.jsonl", "report.json"], metrics=metrics, started=started)
    return stage_dir


def upstream(stage: str, cfg: Config, *, progress: bool = True) -> Path:
    """An earlier stage's folder: used as it is when it was built (whatever inputs it was given,
    e.g. ``prepare-pretrain --input``), built at this profile when missing."""
    folder = cfg.run_path / stage
    if read_manifest(folder) is not None:
        return folder
    return STAGES[stage](cfg, progress=progress)


def _digests(folder: Path, names: list[str]) -> list[dict]:
    return [{"path": str(folder / n), "digest": file_digest(folder / n)} for n in names]


def tokenizer(cfg: Config, *, force: bool = False, progress: bool = True, out_dir: str | Path | None = None) -> Path:
    """Stage A3: ``runs/<profile>/tokenizer/`` — vocab.json, merges.txt, tokenizer.json, report.json."""
    from microlm.tokenizer.stage import qwen_tokenizer_path, train_tokenizer

    corpus_dir = upstream("corpus", cfg, progress=progress)
    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "tokenizer"
    inputs = _digests(corpus_dir, ["train.jsonl", "val.jsonl"])
    qwen = qwen_tokenizer_path(cfg)
    conf = {"tokenizer": stage_config(cfg, "tokenizer")}
    fp = fingerprint({"v": STAGE_VERSIONS["tokenizer"], "config": conf, "inputs": [i["digest"] for i in inputs],
                      "qwen": file_digest(qwen) if qwen else None})
    if not force and is_fresh(stage_dir, fp):
        log.info("tokenizer: up to date (%s), skipped", stage_dir)
        return stage_dir
    started = time.time()
    report = train_tokenizer(cfg, corpus_dir, stage_dir, progress=progress)
    metrics = {"vocab_size": report["vocab_size"], "train_s": report["train_s"],
               "peak_rss_mb": report["peak_rss_mb"],
               "compression": {k: v["chars_per_token"] for k, v in report["compression"].items()}}
    write_manifest(stage_dir, stage="tokenizer", fp=fp, config=conf, inputs=inputs,
                   outputs=["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "report.json"],
                   metrics=metrics, started=started)
    return stage_dir


def tokens(cfg: Config, *, force: bool = False, progress: bool = True, out_dir: str | Path | None = None) -> Path:
    """Stage A4: ``runs/<profile>/tokens/{train,val}.{bin,idx}`` + ``meta.json``."""
    from microlm.tokenizer.stage import tokenize_corpus

    corpus_dir = upstream("corpus", cfg, progress=progress)
    tok_dir = upstream("tokenizer", cfg, progress=progress)
    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "tokens"
    inputs = _digests(corpus_dir, ["train.jsonl", "val.jsonl"]) + _digests(tok_dir, ["vocab.json", "merges.txt",
                                                                                      "microlm_tokenizer.json"])
    conf = {"tokens": stage_config(cfg, "tokens")}
    # workers and batch size do not change the bytes written (tested), so only the inputs count
    fp = fingerprint({"v": STAGE_VERSIONS["tokens"], "inputs": [i["digest"] for i in inputs]})
    if not force and is_fresh(stage_dir, fp):
        log.info("tokens: up to date (%s), skipped", stage_dir)
        return stage_dir
    started = time.time()
    meta = tokenize_corpus(cfg, corpus_dir, tok_dir, stage_dir, progress=progress)
    metrics = {k: meta[k] for k in ("tokens_total", "tokens_per_s", "vocab_size")}
    metrics["docs"] = {k: v["docs"] for k, v in meta["splits"].items()}
    write_manifest(stage_dir, stage="tokens", fp=fp, config=conf, inputs=inputs,
                   outputs=["train.bin", "train.idx", "val.bin", "val.idx", "meta.json"], metrics=metrics,
                   started=started)
    return stage_dir


def _training_stage(name: str, cfg: Config, stage_dir: Path, fp: str, conf: dict, inputs: list[dict], *,
                    device: str, run, metrics, outputs: list[str], force: bool, resume: bool,
                    stop_after: int | None) -> Path:
    """The part every training stage shares: skip when fresh, start/stop the process group, run,
    and (rank 0, finished runs only) write the manifest.  ``run(dist)`` returns the report."""
    from microlm.train.dist import cleanup_distributed, setup_distributed

    if not force and not resume and stop_after is None and is_fresh(stage_dir, fp):
        log.info("%s: up to date (%s), skipped", name, stage_dir)
        return stage_dir
    dist = setup_distributed(device)
    started = time.time()
    try:
        report = run(dist)
        if dist.is_main and stop_after is None:
            write_manifest(stage_dir, stage=name, fp=fp, config=conf, inputs=inputs, outputs=outputs,
                           metrics=metrics(report), started=started)
    finally:
        cleanup_distributed(dist)
    return stage_dir


def pretrain(cfg: Config, *, force: bool = False, resume: bool = False, progress: bool = True,
             out_dir: str | Path | None = None, stop_after: int | None = None) -> Path:
    """Stage A5: ``runs/<profile>/pretrain/`` — ``ckpt/`` (safetensors + optimizer + state),
    ``metrics.jsonl``, ``report.json``, ``curves.png``.  Runs under ``torchrun`` as well."""
    from microlm.train.pretrain import pretrain as run_pretrain
    from microlm.train.trainer import trajectory_config

    tokens_dir = upstream("tokens", cfg, progress=progress)
    tok_dir = upstream("tokenizer", cfg, progress=progress)
    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "pretrain"
    inputs = _digests(tokens_dir, ["train.bin", "val.bin"]) + _digests(tok_dir, ["vocab.json", "merges.txt"])
    conf = {"model": stage_config(cfg, "model"), "pretrain": stage_config(cfg, "pretrain"), "seed": cfg.seed}
    fp = fingerprint({"v": STAGE_VERSIONS["pretrain"], "model": conf["model"], "seed": cfg.seed,
                      "train": trajectory_config(cfg.pretrain), "inputs": [i["digest"] for i in inputs]})
    return _training_stage(
        "pretrain", cfg, stage_dir, fp, conf, inputs, device=cfg.pretrain.device, force=force, resume=resume,
        stop_after=stop_after,
        run=lambda dist: run_pretrain(cfg, tokens_dir, tok_dir, stage_dir, resume=resume, progress=progress,
                                      stop_after=stop_after, dist=dist),
        metrics=lambda r: {k: r[k] for k in ("params", "steps", "tokens_seen", "tokens_per_s", "final_train_loss",
                                             "final_val_loss", "final_val_bpb", "unigram_entropy")},
        outputs=["ckpt/model.safetensors", "metrics.jsonl", "report.json"])


def sft(cfg: Config, *, force: bool = False, resume: bool = False, progress: bool = True,
        out_dir: str | Path | None = None, stop_after: int | None = None) -> Path:
    """Stage A6: ``runs/<profile>/sft/`` — full-parameter SFT from ``pretrain/ckpt``."""
    import glob

    from microlm.data.sources import data_root
    from microlm.train.sft import run_sft
    from microlm.train.trainer import trajectory_config

    pre_dir = upstream("pretrain", cfg, progress=progress)
    tok_dir = upstream("tokenizer", cfg, progress=progress)
    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "sft"
    root = data_root(cfg.data.root)
    files = sorted({p for pat in cfg.sft_data.files + cfg.sft_data.heldout for p in glob.glob(str(root / pat))}) \
        if root else []
    inputs = _digests(pre_dir / "ckpt", ["model.safetensors"]) + _digests(tok_dir, ["vocab.json", "merges.txt"]) + \
        [{"path": f, "digest": file_digest(f)} for f in files]
    conf = {"sft": stage_config(cfg, "sft"), "sft_data": stage_config(cfg, "sft_data"), "seed": cfg.seed}
    fp = fingerprint({"v": STAGE_VERSIONS["sft"], "train": trajectory_config(cfg.sft), "data": conf["sft_data"],
                      "seed": cfg.seed, "inputs": [i["digest"] for i in inputs]})
    return _training_stage(
        "sft", cfg, stage_dir, fp, conf, inputs, device=cfg.sft.device, force=force, resume=resume,
        stop_after=stop_after,
        run=lambda dist: run_sft(cfg, pre_dir, tok_dir, stage_dir, resume=resume, progress=progress,
                                 stop_after=stop_after, dist=dist),
        metrics=lambda r: {**{k: r[k] for k in ("steps", "base_val_loss", "first_val_loss", "final_val_loss",
                                                 "final_train_loss")}, "kept": r["train_data"]["kept"]},
        outputs=["ckpt/model.safetensors", "metrics.jsonl", "report.json"])


def lora(cfg: Config, *, force: bool = False, resume: bool = False, progress: bool = True,
         out_dir: str | Path | None = None, stop_after: int | None = None) -> Path:
    """Stage A7: ``runs/<profile>/lora/`` — LoRA adapters on the SFT model (``adapter/`` in PEFT format)."""
    from microlm.train.lora import run_lora
    from microlm.train.trainer import trajectory_config

    base_dir = upstream("sft", cfg, progress=progress)
    tok_dir = upstream("tokenizer", cfg, progress=progress)
    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "lora"
    inputs = _digests(base_dir / "ckpt", ["model.safetensors"]) + _digests(tok_dir, ["vocab.json", "merges.txt"])
    conf = {"lora": stage_config(cfg, "lora"), "lora_train": stage_config(cfg, "lora_train"), "seed": cfg.seed}
    fp = fingerprint({"v": STAGE_VERSIONS["lora"], "lora": conf["lora"], "train": trajectory_config(cfg.lora_train),
                      "seed": cfg.seed, "inputs": [i["digest"] for i in inputs]})
    return _training_stage(
        "lora", cfg, stage_dir, fp, conf, inputs, device=cfg.lora_train.device, force=force, resume=resume,
        stop_after=stop_after,
        run=lambda dist: run_lora(cfg, base_dir, tok_dir, stage_dir, resume=resume, progress=progress,
                                  stop_after=stop_after, dist=dist),
        metrics=lambda r: {"adapter_params": r["params"]["adapter_params"],
                           "percent_of_base": r["params"]["percent_of_base"],
                           "task": r["task"], "f1_before": r["before"]["f1"], "f1_after": r["after"]["f1"],
                           "exact_match_after": r["after"]["exact_match"]},
        outputs=["adapter/adapter_model.safetensors", "metrics.jsonl", "report.json"])


EXPORT_SOURCES = ("sft", "pretrain", "lora")


def hf(cfg: Config, *, source: str = "sft", force: bool = False, progress: bool = True,
       out_dir: str | Path | None = None) -> Path:
    """Stage A8: ``runs/<profile>/hf/`` — the ``source`` model (``lora``: the SFT model with the
    adapter merged) as a transformers/vLLM-loadable Llama folder, checked against ours when
    transformers is installed (``report.json``)."""
    from microlm.infer.chat import load_model
    from microlm.io import write_json
    from microlm.model.hf_export import export_hf, verify_export

    if source not in EXPORT_SOURCES:
        raise MicroLMError(f"export source must be one of {EXPORT_SOURCES}, got {source!r}")
    model_dir = upstream("sft" if source == "lora" else source, cfg, progress=progress)
    tok_dir = upstream("tokenizer", cfg, progress=progress)
    adapter = upstream("lora", cfg, progress=progress) / "adapter" if source == "lora" else None
    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "hf"
    inputs = _digests(model_dir / "ckpt", ["model.safetensors"]) + _digests(tok_dir, ["vocab.json", "merges.txt"])
    if adapter is not None:
        inputs += _digests(adapter, ["adapter_model.safetensors", "adapter_config.json"])
    conf = {"source": source, "generate": stage_config(cfg, "generate")}
    fp = fingerprint({"v": STAGE_VERSIONS["hf"], "config": conf, "inputs": [i["digest"] for i in inputs]})
    if not force and is_fresh(stage_dir, fp):
        log.info("hf: up to date (%s), skipped", stage_dir)
        return stage_dir
    started = time.time()
    model, tok = load_model(model_dir, tokenizer=tok_dir, adapter=adapter)
    export_hf(model, tok, stage_dir, cfg.generate, source={"stage": source, "folder": str(model_dir),
                                                          "adapter": str(adapter) if adapter else None})
    check = verify_export(stage_dir, model, tok)
    write_json(stage_dir / "report.json", {"source": source, "params": model.num_parameters(), "check": check})
    if check["checked"] and not (check["logits_max_abs_diff"] <= 1e-4 and check["greedy_tokens_equal"]
                                 and check["chat_template_equal"] and check["tokenizer_ids_equal"]):
        raise MicroLMError(f"the exported model does not match ours: {check}")
    write_manifest(stage_dir, stage="hf", fp=fp, config=conf, inputs=inputs, started=started,
                   outputs=["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                            "generation_config.json", "report.json"],
                   metrics={k: check.get(k) for k in ("checked", "logits_max_abs_diff", "greedy_tokens_equal")})
    return stage_dir


def ie_data(cfg: Config, *, force: bool = False, progress: bool = True, out_dir: str | Path | None = None) -> Path:
    """Stages B1–B2: ``runs/<profile>/ie_data/`` — steps 01–06 of ``microlm/ie/pipeline.py``
    (``microlm ie-data --step N`` runs one step without a manifest)."""
    from microlm.ie.pipeline import STEPS, ie_sources, run_step, schema_paths
    from microlm.ie.standardize import RELATION_MAP
    from microlm.tokenizer.stage import qwen_tokenizer_path

    tok_dir = upstream("tokenizer", cfg, progress=progress)  # step 06 counts tokens with it
    stage_dir = Path(out_dir) if out_dir else cfg.run_path / "ie_data"
    files = [p for p, _, _ in ie_sources(cfg)] + schema_paths(cfg) + [RELATION_MAP]
    qwen = qwen_tokenizer_path(cfg)
    inputs = [{"path": str(p), "digest": file_digest(p)} for p in files + ([qwen] if qwen else [])]
    inputs += _digests(tok_dir, ["vocab.json", "merges.txt"])
    conf = {"ie_data": stage_config(cfg, "ie_data"), "microlm_context": cfg.model.max_seq_len, "seed": cfg.seed}
    fp = fingerprint({"v": STAGE_VERSIONS["ie_data"], "config": conf, "inputs": [i["digest"] for i in inputs]})
    if not force and is_fresh(stage_dir, fp):
        log.info("ie_data: up to date (%s), skipped", stage_dir)
        return stage_dir
    started = time.time()
    stats = {}
    for step in STEPS:
        stats[step] = run_step(cfg, step, stage_dir)
        log.info("ie_data %s: %s rows, %s s", stats[step]["step"], stats[step]["records"], stats[step]["seconds"])
    outs = [f"06_{s}.jsonl" for s in ("train", "val", "test", "eval_prompts")] + ["05_eval_prompts.jsonl"]
    write_manifest(stage_dir, stage="ie_data", fp=fp, config=conf, inputs=inputs, started=started,
                   outputs=outs + sorted(p.name for p in stage_dir.glob("0?_*_stats.json")),
                   metrics={"records_in": stats[1]["records"], "records_kept": stats[2]["records"],
                            "examples": stats[4]["examples"],
                            "train_examples": stats[6]["splits"]["train"]["out"],
                            "eval_prompts": stats[6]["splits"]["eval_prompts"]["out"]})
    return stage_dir


STAGES = {"corpus": corpus, "tokenizer": tokenizer, "tokens": tokens, "pretrain": pretrain, "sft": sft, "lora": lora,
          "hf": hf, "ie_data": ie_data}


def require(stage: str, cfg: Config, **kw) -> Path:
    """The folder of ``stage`` at this profile, built if missing or stale (for notebooks)."""
    return STAGES[stage](cfg, **kw)


def manifest(stage: str, cfg: Config) -> dict | None:
    return read_manifest(cfg.run_path / stage)
