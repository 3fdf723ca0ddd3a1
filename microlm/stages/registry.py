"""The registry core: what every stage has in common, done once.

A stage module (``microlm/stages/<stage>.py``) declares one :class:`Stage`: its upstream stages, its
config section, the function that builds it, the files it writes, its notebook and CLI verb.  This
module resolves (and builds) upstream stages, fingerprints config + upstream + input files, skips a
stage whose fingerprint is unchanged, handles ``--force``, ``--out``, locks, resume and the process
group of training stages, and writes the manifest.  The CLI, the notebooks
(``stages.require("sft", cfg)``, ``stages.output(cfg, "ie_data", "train")``) and the tests all go
through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microlm.config import ConfigBase, stage_config
from microlm.errors import MicroLMError
from microlm.hw import cpu_name, peak_rss_mb, reset_peak_rss
from microlm.io import (
    MANIFEST,
    file_digest,
    files_unchanged,
    fingerprint,
    folder_files,
    read_json,
    recover_dir,
    write_json,
)

__all__ = ["Stage", "Option", "StageRun", "REGISTRY", "get_stage", "stage_dir", "build", "require", "upstream",
           "manifest", "status", "current_fingerprint", "data_fingerprint", "register", "stage_table",
           "course_map_markdown", "write_course_map", "output", "resolve_ref", "read_manifest", "write_manifest", "is_fresh",
           "folder_lock", "folder_stage", "TRAINING_OPTIONS", "STAGE_MARK"]

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


@dataclass
class StageRun:
    """What a stage's ``build`` gets: the config, its output folder, its upstream stages' folders,
    the stage's CLI options and (training stages) the process group."""

    name: str
    cfg: Any  # microlm.stages.Config
    out: Path
    up: dict[str, Path]
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    dist: Any = None  # microlm.train.dist.DistInfo for training stages
    force: bool = False  # --force: every part is built again (a multi-run stage keeps no finished sub-run)
    auto_resume: bool = False  # ``resume`` set by the registry (an interrupted run of this fingerprint), not --resume

    def cut_short(self, max_steps: int) -> bool:
        """``--stop-after`` ended the run before ``max_steps`` (no manifest: it resumes later); a
        ``--stop-after`` at or past ``max_steps`` is a finished run."""
        stop = self.options.get("stop_after")
        return stop is not None and stop < max_steps


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """A stage folder's manifest, ``None`` when it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def is_fresh(folder: str | os.PathLike, fp: str) -> bool:
    """True when the stage finished with this fingerprint and every file it wrote is still there,
    unchanged (content digest, or size + mtime for big files)."""
    m = read_manifest(folder)
    if not m or m.get("fingerprint") != fp:
        return False
    if not all((Path(folder) / o).exists() for o in m.get("outputs", [])):
        return False
    return files_unchanged(folder, m.get("files", {}))


def write_manifest(folder: str | os.PathLike, *, stage: str, fp: str, config: dict, inputs: list[dict],
                   outputs: list[str], metrics: dict, started: float, upstream: dict | None = None,
                   peak_rss_mb: int | None = None) -> dict:
    """Write the manifest last: config, fingerprint, upstream, inputs, every file with its digest, metrics."""
    m = {
        "stage": stage,
        "fingerprint": fp,
        "config": config,
        "upstream": upstream or {},
        "inputs": inputs,
        "outputs": outputs,
        "files": folder_files(folder),
        "metrics": metrics,
        "timings": {"seconds": round(time.time() - started, 3)},
        "memory": {"peak_rss_mb": peak_rss_mb},  # this process's VmHWM while the stage built (not its servers')
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "cpu": cpu_name(), "cores_in_use": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count()},
    }
    write_json(Path(folder) / MANIFEST, m)
    return m


def resolve_ref(ref: str | None, up: dict[str, Path]) -> str | None:
    """A model/adapter reference → a path or hub id: ``hf`` = the hf stage's folder,
    ``ie_lora:<run>`` = that run's adapter, ``ie_merged:<run>`` = that merged folder; else as given."""
    if ref is None:
        return None
    stage, _, sub = ref.partition(":")
    if stage in up:
        if sub and stage in REGISTRY and REGISTRY[stage].files.get("run"):
            return str(up[stage] / REGISTRY[stage].files["run"].format(run=sub))
        return str(up[stage] / sub) if sub else str(up[stage])
    return ref


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
    build: Callable[[StageRun], dict | None]  # returns the manifest's metrics (None: the run did not finish)
    outputs: tuple[str, ...]  # files the folder holds when the stage finished (relative)
    section: type | None = None  # its config section (a dataclass), read from the profile's key <name>
    more_sections: dict[str, type] = field(default_factory=dict)  # other sections it brings (model, serve, ...)
    check: Callable[[Any], None] | None = None  # validates a loaded config's sections (one-line ConfigError)
    files: dict[str, str] = field(default_factory=dict)  # names of files in its folder (``output``), beyond outputs
    upstream: tuple[str, ...] = ()  # every stage it may read (the course map)
    needs: Callable[[ConfigBase, dict], tuple[str, ...]] | None = None  # the ones this run reads; default: upstream
    sections: tuple[str, ...] = ()  # config sections it reads (recorded in the manifest)
    key: Callable[[ConfigBase, dict], dict] | None = None  # what is fingerprinted; default: the sections
    inputs: Callable[[ConfigBase, dict], list] | None = None  # files outside the run folder it reads
    notebook: str | None = None
    aliases: tuple[str, ...] = ()  # the seed's script names, still accepted by the CLI
    options: tuple[Option, ...] = ()
    train: str | None = None  # the config path of its training loop (training stages run under torchrun)
    summary: Callable[[dict], str] | None = None  # one line from the manifest's metrics
    # checks made before the folder is touched (e.g. ``--resume`` against its checkpoints): a one-line error
    # here leaves a finished stage fresh
    preflight: Callable[[StageRun], None] | None = None
    version: int = 1  # bump when the stage's code changes what it writes

    @property
    def all_options(self) -> tuple[Option, ...]:
        return self.options + (TRAINING_OPTIONS if self.train else ())

    def upstream_of(self, cfg: ConfigBase, options: dict) -> tuple[str, ...]:
        return self.needs(cfg, options) if self.needs else self.upstream

    def config_key(self, cfg: ConfigBase, options: dict) -> dict:
        if self.key is not None:
            return self.key(cfg, options)
        return {s: stage_config(cfg, s) for s in self.sections}

    def file(self, key: str) -> str:
        """The relative path of the file called ``key``: an entry of ``files``, or an output's name
        without its extension (``report`` → ``report.json``)."""
        names = {**{Path(o).name.split(".")[0]: o for o in self.outputs}, **self.files}
        if key not in names:
            raise MicroLMError(f"stage {self.name} has no file {key!r} (files: {', '.join(sorted(names))})")
        return names[key]


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


def stage_dir(cfg: ConfigBase, name: str) -> Path:
    """The folder of stage ``name`` at this profile (``runs/<profile>/<stage>``); not built."""
    return cfg.run_path / get_stage(name).name


def manifest(name: str, cfg: ConfigBase) -> dict | None:
    return read_manifest(stage_dir(cfg, name))


def _digests(paths: list) -> list[dict]:
    return [{"path": str(p), "digest": file_digest(p)} for p in paths]


def _fingerprint(st: Stage, cfg: ConfigBase, up: dict[str, dict | None], options: dict) -> tuple[str, dict, list[dict]]:
    conf = st.config_key(cfg, options)
    inputs = _digests(st.inputs(cfg, options)) if st.inputs else []
    ups = {u: (m or {}).get("fingerprint") for u, m in up.items()}
    fp = fingerprint({"v": st.version, "config": conf, "upstream": ups, "inputs": [i["digest"] for i in inputs]})
    return fp, conf, inputs


def current_fingerprint(name: str, cfg: ConfigBase, **options) -> str:
    """The fingerprint stage ``name`` would have now (its upstream as built)."""
    st = get_stage(name)
    options = _with_defaults(st, options)
    return _fingerprint(st, cfg, {u: manifest(u, cfg) for u in st.upstream_of(cfg, options)}, options)[0]


def data_fingerprint(cfg: ConfigBase, inputs: list[str] | None = None) -> str:
    """The **data fingerprint**: the corpus stage's fingerprint (source contents, cleaning config,
    code version) — what recorded reference curves are keyed by.  ``inputs``: explicit files."""
    return current_fingerprint("corpus", cfg, input=inputs)


def status(name: str, cfg: ConfigBase) -> str:
    """``missing`` (never built here), ``partial`` (a run that was stopped, killed, or ran one step),
    ``stale`` (config, upstream or inputs changed, or a file it wrote changed or is gone) or ``fresh``."""
    m = manifest(name, cfg)
    if m is None:
        folder = stage_dir(cfg, name)
        return "partial" if folder.is_dir() and any(folder.iterdir()) else "missing"
    return "fresh" if is_fresh(stage_dir(cfg, name), current_fingerprint(name, cfg)) else "stale"


def upstream(name: str, cfg: ConfigBase, *, progress: bool = True) -> Path:
    """An earlier stage's folder: used as it is when it was built (whatever inputs it was given,
    e.g. ``microlm corpus --input``), built at this profile when missing."""
    folder = stage_dir(cfg, name)
    if read_manifest(folder) is not None:
        return folder
    return build(name, cfg, progress=progress)


def build(name: str, cfg: ConfigBase, *, force: bool = False, progress: bool = True, out_dir: str | Path | None = None,
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
    auto = _interrupted_run(st, folder, fp) and not force and not must_run
    if auto:
        # the same run (config, upstream, inputs) was stopped part-way: go on from its last checkpoint
        # (exact: batches are a function of the step) instead of starting over; --force starts over
        options = {**options, "resume": True}
        log.warning("%s: resuming the interrupted run in %s (same config and inputs; --force starts over)",
                    st.name, folder)
    run = StageRun(name=st.name, cfg=cfg, out=folder, up=ups, progress=progress, options=options, force=force,
                   auto_resume=auto)
    with folder_lock(folder, st.name) if main else contextlib.nullcontext():
        if main:
            _check_folder(st, folder, inputs, options, force=force)
            recover_dir(folder)
            if st.preflight is not None:
                st.preflight(run)
            (folder / MANIFEST).unlink(missing_ok=True)  # from here until the end the stage is not fresh
            _mark(folder, st.name, fp)
        started = time.time()
        reset_peak_rss()
        if st.train:
            from microlm.train.dist import distributed  # torch: only training stages need it

            device = _lookup(cfg, st.train).device
            with distributed(device) as dist:
                run = dataclasses.replace(run, dist=dist)
                metrics = st.build(run)
                main = dist.is_main
        else:
            metrics = st.build(run)
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


def require(name: str, cfg: ConfigBase, **kw) -> Path:
    """The folder of ``name`` at this profile, built if missing or stale (what notebooks call)."""
    return build(name, cfg, **kw)


def _lookup(cfg: ConfigBase, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def stage_table(cfg: ConfigBase | None = None) -> list[dict]:
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


MAP_BEGIN = "<!-- course map: generated from the stage registry by `microlm stages --write-map`; do not edit -->"
MAP_END = "<!-- end of the course map -->"


def write_course_map(path: str | os.PathLike) -> bool:
    """Put the course map (``course_map_markdown``) into a Markdown file between its markers (the first
    time: over the table that starts with ``| part | stage |``); ``True`` when the file changed."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    block = f"{MAP_BEGIN}\n{course_map_markdown()}\n{MAP_END}"
    if MAP_BEGIN in text and MAP_END in text:
        i, j = text.index(MAP_BEGIN), text.index(MAP_END) + len(MAP_END)
    elif "| part | stage |" in text:
        i = text.index("| part | stage |")
        j = i
        lines = text[i:].split("\n")
        for line in lines:
            if not line.startswith("|"):
                break
            j += len(line) + 1
        j -= 1
    else:
        raise MicroLMError(f"{p}: no course map markers ({MAP_BEGIN!r} … {MAP_END!r}) to write between")
    new = text[:i] + block + text[j:]
    if new != text:
        p.write_text(new, encoding="utf-8")
    return new != text


def output(cfg: ConfigBase, name: str, key: str) -> Path:
    """The path of file ``key`` in stage ``name``'s folder at this profile (not built):
    ``output(cfg, "ie_data", "train")`` → ``runs/<profile>/ie_data/06_train.jsonl``."""
    return stage_dir(cfg, name) / get_stage(name).file(key)
