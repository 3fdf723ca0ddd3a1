"""Stage B3 ``ie_lora``: a LoRA fine-tune for IE on the rendered chats, one adapter per entry of
``ie_lora.runs`` (PEFT, or the from-scratch LoRA; ``microlm.ie.train_lora``).

Each run is a sub-run with its own record: a finished one with the same fingerprint is kept, a
checkpoint with it resumed, anything else in its folder cleared."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import regex

from microlm.config import resolve_model_name, stage_config, with_settings
from microlm.errors import ConfigError, MicroLMError
from microlm.io import fingerprint
from microlm.stages.pretrain import fmt_loss
from microlm.stages.registry import Stage, StageRun, read_manifest
from microlm.train.settings import TrainConfig, trajectory_config


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


def ie_lora_run_config(cfg, entry: dict):
    """The config one ``ie_lora`` run trains with: ``ie_lora`` with the run's ``with`` settings applied."""
    if not entry.get("with"):
        return cfg
    return dataclasses.replace(cfg, ie_lora=_run_section(cfg.ie_lora, entry))


def _run_section(c: IELoRAConfig, entry: dict) -> IELoRAConfig:
    where = f"ie_lora.runs[{entry.get('name')}].with"
    if not isinstance(entry.get("with"), dict):
        raise ConfigError(f"ie_lora.runs: {entry.get('name')!r}: with must be a mapping of settings, got "
                          f"{entry.get('with')!r}")
    section = with_settings(c, entry["with"], where, fixed=("runs", "with"))
    try:
        _check_section(section, nested=True)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return section


def _check_section(c: IELoRAConfig, nested: bool = False) -> None:
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
    problems = c.train.problems()
    if problems:
        raise ConfigError(f"ie_lora.train: {problems[0]}")


def check(cfg) -> None:
    _check_section(cfg.ie_lora)


def base_of(entry: dict, hf_dir: Path | None) -> str:
    """A run's base model: ``hf`` = the hf stage's folder (MicroLM's export), else as given."""
    if entry["base"] == "hf":
        if hf_dir is None:
            raise MicroLMError(f"ie_lora run {entry['name']!r} uses the hf stage's model, which is not built")
        return str(hf_dir)
    return entry["base"]


def base_key(entry: dict, base: str) -> str:
    """A base as a fingerprint sees it: ``hf`` stays ``hf`` (the hf stage's own fingerprint says what it is),
    so moving the runs folder does not retrain or re-merge anything."""
    return "hf" if entry["base"] == "hf" else base


def run_fingerprint(run: StageRun, cfg, entry: dict, base: str) -> str:
    """What one ``ie_lora`` run is made of: its entry and base, the settings it trains with (``cfg``:
    the run's own, ``with`` applied) and the upstream folders' fingerprints — a finished run is reused,
    a checkpoint resumed, only when it is the same."""
    lc = stage_config(cfg, "ie_lora")
    base = base_key(entry, base)
    return fingerprint({"entry": entry, "base": base, "seed": cfg.seed, "train": trajectory_config(cfg.ie_lora.train),
                        "ie_lora": {k: v for k, v in lc.items() if k not in ("train", "runs")},
                        "upstream": {u: (read_manifest(p) or {}).get("fingerprint") for u, p in sorted(run.up.items())}})


def _state_fingerprint(out: Path) -> str | None:
    try:
        return json.loads((out / "ckpt" / "state.json").read_text(encoding="utf-8")).get("run_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _plans(run: StageRun):
    """Each run of ``ie_lora.runs`` with its config, folder, base and fingerprint."""
    for entry in run.cfg.ie_lora.runs:
        cfg = ie_lora_run_config(run.cfg, entry)
        base = base_of({**entry, "base": resolve_model_name(cfg, entry["base"])}, run.up.get("hf"))
        yield entry, cfg, run.out / entry["name"], base, run_fingerprint(run, cfg, entry, base)


def _finished(out: Path, fp: str, max_steps: int) -> bool:
    from microlm.io import read_json

    try:
        r = read_json(out / "report.json")
    except (OSError, ValueError):
        return False
    return isinstance(r, dict) and r.get("run_fingerprint") == fp and r.get("steps") == max_steps


def preflight(run: StageRun) -> None:
    """``--resume`` (typed, not the registry's own resume of an interrupted run) continues only a
    sub-run made with this very config and upstream: one made with another is refused, before the
    stage's folder is touched (a finished stage stays fresh)."""
    if not run.options.get("resume") or run.auto_resume or run.force:
        return
    for entry, cfg, out, _base, fp in _plans(run):
        if not out.is_dir() or _finished(out, fp, cfg.ie_lora.train.max_steps) or _state_fingerprint(out) == fp:
            continue
        made = out / "ckpt" if (out / "ckpt" / "state.json").is_file() else out / "report.json"
        if not made.exists():
            continue  # never checkpointed: nothing to resume, it trains from the start
        raise MicroLMError(f"ie_lora run {entry['name']!r}: --resume, but {made} was made with another config or "
                           f"upstream than this one (e.g. r, lr, steps, data); drop --resume to train it again from "
                           f"the start, or go back to the settings it was made with")


def build(run: StageRun) -> dict | None:
    """The ``ie_lora`` stage: every run of ``ie_lora.runs`` into ``<stage>/<name>/``.  Each run is its
    own record: a run whose ``report.json`` carries this run's fingerprint (entry, base, settings,
    upstream) is kept; one whose checkpoint carries it continues from there (a killed or stopped run);
    anything else in its folder is cleared and the run trained from the start (``--force``: all of
    them).  Manifest metrics per run; ``None`` when stopped early (``--stop-after``) or on ranks > 0."""
    from microlm.ie.train_lora import train_ie_lora
    from microlm.io import read_json, write_json

    opts = run.options
    reports = {}
    for entry, cfg, out, base, fp in _plans(run):
        done = out / "report.json"
        if not run.force and _finished(out, fp, cfg.ie_lora.train.max_steps):
            reports[entry["name"]] = read_json(done)
            continue
        resume = not run.force and _state_fingerprint(out) == fp
        if not resume and out.exists() and (run.dist is None or run.dist.is_main):
            shutil.rmtree(out)  # another run's files (other settings or upstream): never mixed with this one's
        if resume:
            done.unlink(missing_ok=True)
        reports[entry["name"]] = train_ie_lora(cfg.ie_lora, {"engine": "peft", **entry}, base, run.up["ie_data"], out,
                                               seed=cfg.seed, data_cutoff=cfg.ie_data.cutoff_tokens,
                                               resume=resume, progress=run.progress, stop_after=opts.get("stop_after"),
                                               dist=run.dist, run_fingerprint=fp)
    if not all(reports.values()) or any(r["steps"] < r["max_steps"] for r in reports.values()):
        return None
    metrics = {"runs": {name: {"engine": r["engine"], "base": r["base"], "trainable_percent": r["params"]["percent"],
                               "base_val_loss": r["base_val_loss"], "final_val_loss": r["final_val_loss"],
                               "seconds": r["seconds_this_run"], "peak_rss_mb": r.get("peak_rss_mb"),
                               "train_examples": r["mix"]["drawn"], "empty_share": r["mix"]["empty_share"],
                               "decontaminated": r["mix"]["excluded"]} for name, r in reports.items()}}
    write_json(run.out / "report.json", metrics)
    return metrics


def ie_bases(cfg, options: dict) -> tuple[str, ...]:
    """ie_data, plus hf when a run's base is MicroLM's own export (``base: hf``)."""
    return ("ie_data",) + (("hf",) if any(r["base"] == "hf" for r in cfg.ie_lora.runs) else ())


def qwen_key(cfg, names) -> str | None:
    """The Qwen model the ``qwen`` entries mean (``$MICROLM_QWEN`` or the profile's), when one says it."""
    from microlm.config import qwen_model

    return qwen_model(cfg) if "qwen" in names else None


def _key(cfg, options: dict) -> dict:
    lc = stage_config(cfg, "ie_lora")
    return {"ie_lora": {k: v for k, v in lc.items() if k != "train"}, "seed": cfg.seed,
            "train": trajectory_config(cfg.ie_lora.train), "qwen": qwen_key(cfg, [r["base"] for r in cfg.ie_lora.runs])}


def runs_summary(m: dict, fmt: Callable[[dict], str]) -> str:
    return "; ".join(f"{name}: {fmt(r)}" for name, r in m["runs"].items())


STAGE = Stage(
    "ie_lora", "B3", "LoRA fine-tune for IE on the rendered chats (PEFT, or the from-scratch LoRA): one adapter per run",
    build=build, section=IELoRAConfig, check=check, upstream=("ie_data", "hf"), needs=ie_bases, sections=("ie_lora",),
    key=_key, outputs=("report.json",), files={"run": "{run}/adapter", "run_report": "{run}/report.json"},
    notebook="10_qwen_lora", train="ie_lora.train", preflight=preflight,
    summary=lambda m: runs_summary(m, lambda r: (f"{r['engine']}, {r['trainable_percent']} % trainable, val loss "
                                                 f"{fmt_loss(r['base_val_loss'])} -> {fmt_loss(r['final_val_loss'])}, "
                                                 f"{r['seconds']} s")))
