"""The stage registry: one entry per stage does everything (CLI, fingerprint, skip, manifest, map);
the package's layering has no import cycle."""

import ast
import json
import os
from pathlib import Path

import pytest

from microlm import cli, stages
from microlm.errors import ConfigError, MicroLMError
from microlm.stages import StageRun, load_config

from .conftest import REPO

CALLS: list[dict] = []


def build_echo(run: StageRun) -> dict | None:
    """A throwaway stage's build: copies the corpus train split's first line, counts its calls."""
    CALLS.append({"out": str(run.out), "up": sorted(run.up), "shout": run.options.get("shout")})
    line = (run.up["corpus"] / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "echo.txt").write_text(line.upper() if run.options.get("shout") else line, encoding="utf-8")
    return {"chars": len(line)}


@pytest.fixture
def echo_stage(monkeypatch):
    """A stage added with nothing but a registry entry (and it goes away after the test)."""
    registry = dict(stages.REGISTRY)
    monkeypatch.setattr(stages.registry, "REGISTRY", registry)
    monkeypatch.setattr(stages, "REGISTRY", registry)
    CALLS.clear()
    return stages.register(stages.Stage(
        "echo_text", "Z1", "echo the first training document", build=build_echo,
        outputs=("echo.txt",), upstream=("corpus",), sections=("tokens",), notebook="99_echo",
        options=(stages.Option("shout", "upper-case it", flag=True, run=True),),
        summary=lambda m: f"{m['chars']} chars"))


def test_a_stage_needs_only_a_registry_entry(echo_stage, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # `tests.test_stages:build_echo` is imported from the checkout
    cfg = load_config("smoke", {"run_dir": str(tmp_path / "runs"), "data.max_records": 300})
    assert stages.status("echo_text", cfg) == "missing"
    out = stages.build("echo_text", cfg, progress=False)  # builds corpus first
    assert out == stages.stage_dir(cfg, "echo_text") == tmp_path / "runs" / "echo_text"
    assert stages.status("corpus", cfg) == "fresh" and stages.status("echo_text", cfg) == "fresh"
    m = stages.manifest("echo_text", cfg)
    assert m["stage"] == "echo_text" and m["outputs"] == ["echo.txt"] and m["metrics"]["chars"] > 0
    assert m["upstream"]["corpus"]["fingerprint"] == stages.manifest("corpus", cfg)["fingerprint"]
    assert m["config"] == {"tokens": {"workers": cfg.tokens.workers, "batch_docs": cfg.tokens.batch_docs}}
    assert len(CALLS) == 1 and CALLS[0]["up"] == ["corpus"]

    stages.build("echo_text", cfg, progress=False)  # fresh: skipped
    assert len(CALLS) == 1
    stages.build("echo_text", cfg, progress=False, force=True)
    assert len(CALLS) == 2
    # its config section changed → stale → rebuilt
    cfg2 = load_config("smoke", {"run_dir": str(tmp_path / "runs"), "data.max_records": 300, "tokens.batch_docs": 7})
    assert stages.status("echo_text", cfg2) == "stale"
    stages.build("echo_text", cfg2, progress=False)
    assert len(CALLS) == 3 and stages.status("echo_text", cfg2) == "fresh"
    # an output gone → stale
    (out / "echo.txt").unlink()
    assert stages.status("echo_text", cfg2) == "stale"

    # the CLI has the verb (dash or underscore), its option, --out, and prints the summary line
    assert cli.main(["echo-text", "-p", "smoke", "--set", f"run_dir={tmp_path / 'runs'}", "--set",
                     "data.max_records=300", "--shout", "--out", str(tmp_path / "loud"), "-q"]) == 0
    assert CALLS[-1]["shout"] is True and CALLS[-1]["out"] == str(tmp_path / "loud")
    assert "chars" in capsys.readouterr().out
    assert '"TEXT"' in (tmp_path / "loud" / "echo.txt").read_text(encoding="utf-8")
    assert cli.main(["echo_text", "-p", "smoke", "--set", f"run_dir={tmp_path / 'runs'}", "--set",
                     "data.max_records=300", "-q"]) == 0
    # the map lists it, with its status
    row = next(r for r in stages.stage_table(cfg) if r["stage"] == "echo_text")
    assert row["cli"] == "microlm echo-text" and row["notebook"] == "99_echo" and row["status"] == "fresh"
    assert "| Z1 | **echo_text**" in stages.course_map_markdown()


def test_registry_errors_are_one_line():
    with pytest.raises(MicroLMError, match="unknown stage 'nope'"):
        stages.get_stage("nope")
    assert stages.get_stage("ie-data").name == "ie_data" and stages.get_stage("prepare-pretrain").name == "corpus"
    with pytest.raises(MicroLMError, match="unknown option"):
        stages.build("corpus", load_config("smoke"), sauce=True)
    with pytest.raises(MicroLMError, match="not registered"):
        stages.register(stages.Stage("late", "Z", "x", build="x:y", outputs=(), upstream=("no_such",)))


def test_one_name_per_concept():
    """Stage name = folder = config section; every stage has a notebook that exists and a CLI verb."""
    cfg = load_config("cpu")
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for st in stages.REGISTRY.values():
        assert st.name in cfg.to_dict(), f"no config section named like stage {st.name}"
        assert st.sections[0] == st.name or (st.name == "pretrain" and "pretrain" in st.sections)
        assert stages.stage_dir(cfg, st.name).name == st.name
        assert (REPO / "notebooks" / f"{st.notebook}.py").is_file(), st.notebook
        assert st.name.replace("_", "-") in verbs
        assert set(st.upstream) <= set(stages.REGISTRY)
    # one vocab_size: the model takes the tokenizer's; the model section may not set its own
    assert load_config("smoke", {"tokenizer.vocab_size": 1000}).model.vocab_size == 1000
    with pytest.raises(ConfigError, match="model.vocab_size is not a setting"):
        load_config("smoke", {"model.vocab_size": 512})


@pytest.mark.parametrize("doc", ["README.md", "book/intro.md"])
def test_course_map_in_the_docs_is_the_registry(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    assert stages.course_map_markdown() in text, f"{doc}: paste `microlm stages --markdown` over its course map"


def test_runs_live_at_the_project_root_or_microlm_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROLM_RUNS", raising=False)
    monkeypatch.chdir(REPO / "notebooks")  # papermill / Jupyter run notebooks here
    assert load_config("smoke").run_path == REPO / "runs" / "smoke"
    monkeypatch.chdir(REPO)
    assert load_config("smoke").run_path == REPO / "runs" / "smoke"
    monkeypatch.setenv("MICROLM_RUNS", str(tmp_path / "elsewhere"))
    assert load_config("cpu").run_path == tmp_path / "elsewhere" / "cpu"
    monkeypatch.delenv("MICROLM_RUNS")
    monkeypatch.chdir(tmp_path)  # outside any project: ./runs, never the installed package
    assert load_config("smoke").run_path == tmp_path / "runs" / "smoke"


def test_ie_data_section_is_validated():
    with pytest.raises(ConfigError, match="ie_data.val_fraction"):
        load_config("smoke", {"ie_data.val_fraction": 0.7, "ie_data.test_fraction": 0.4})
    with pytest.raises(ConfigError, match="unknown format"):
        load_config("smoke", {"ie_data.sources": {"x/*.json": "yaml"}})
    with pytest.raises(ConfigError, match="ie_data.split_num"):
        load_config("smoke", {"ie_data.split_num": 0})
    with pytest.raises(ConfigError, match="unknown config key 'ie_data.nope'"):
        load_config("smoke", {"ie_data.nope": 1})


def test_ie_formats_are_the_adapters():
    from microlm.ie.formats import IE_FORMATS
    from microlm.ie.standardize import ADAPTERS

    assert tuple(ADAPTERS) == IE_FORMATS


# ------------------------------------------------------------------------------------------ layering

def _imports(type_only: bool = False) -> dict[str, set[str]]:
    """``module → microlm modules it imports`` (anywhere in the file, also inside functions; under
    ``if TYPE_CHECKING`` only with ``type_only``).  Importing ``a.b.c`` also imports the packages ``a.b`` and ``a``."""
    root = REPO / "microlm"
    mods = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = set() if type_only else {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                                        and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t.startswith("microlm"):
                    parts = t.split(".")
                    out |= {".".join(parts[:k]) for k in range(2, len(parts) + 1)}
        out.discard(name)
        graph[name] = out - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m == n or m.startswith(n + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    cyc = _cycle(_imports())
    assert cyc is None, "import cycle: " + " → ".join(cyc)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layering():
    """model/ holds the model, LoRA, checkpoint I/O, the HF conversion: it imports neither training,
    inference nor the stages; infer/ never imports train/."""
    graph = _imports()
    for mod, deps in graph.items():
        if mod.startswith("microlm.model"):
            bad = {d for d in deps if d.startswith(("microlm.train", "microlm.infer", "microlm.stages",
                                                    "microlm.data", "microlm.ie", "microlm.cli"))}
            assert not bad, f"{mod} imports {sorted(bad)}"
        if mod.startswith("microlm.infer"):
            bad = {d for d in deps if d.startswith("microlm.train")}
            assert not bad, f"{mod} imports {sorted(bad)}"
    assert not (REPO / "microlm" / "train" / "checkpoint.py").exists()  # moved to model/


# The layers, lowest first: a module may import its own layer and the ones listed for it — counting
# imports inside functions and type-only ones.  Domain code never imports the stage layer, the
# config, or the top; ``ie`` and ``serve`` never import each other.
BASE = ("microlm.errors", "microlm.paths", "microlm.io", "microlm.hw", "microlm.plotting")
LAYERS = {
    "base": (BASE, ()),
    "model": (("microlm.model",), ("base", "tokenizer")),  # the export writes the tokenizer files
    "tokenizer": (("microlm.tokenizer",), ("base",)),
    "data": (("microlm.data",), ("base", "tokenizer")),
    "train": (("microlm.train",), ("base", "model", "tokenizer", "data", "infer")),  # samples at eval points
    "infer": (("microlm.infer",), ("base", "model", "tokenizer")),
    "ie": (("microlm.ie",), ("base", "model", "tokenizer", "data", "train", "infer")),
    "serve": (("microlm.serve",), ("base", "infer")),
    "config": (("microlm.config",), ("base",)),
    "stages": (("microlm.stages",), ("base", "model", "tokenizer", "data", "train", "infer", "ie", "serve", "config")),
    "top": (("microlm.cli", "microlm.course", "microlm.book", "microlm.lab", "microlm.results", "microlm.claims",
             "microlm.diagram", "microlm.__main__", "microlm"), None),  # anything
}


def _layer(mod: str) -> str:
    best = ("", "")
    for name, (prefixes, _) in LAYERS.items():
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > len(best[1]):
                best = (name, p)
    assert best[0], f"{mod} is in no layer: add it to LAYERS"
    return best[0]


def test_every_import_follows_the_layer_table():
    bad = []
    for mod, deps in _imports(type_only=True).items():
        allowed = LAYERS[_layer(mod)][1]
        if allowed is None:
            continue
        for d in deps:
            if d == "microlm":
                continue
            lay = _layer(d)
            if lay != _layer(mod) and lay not in allowed:
                bad.append(f"{mod} → {d} ({_layer(mod)} may not import {lay})")
    assert not bad, "\n".join(sorted(bad))


def test_the_layer_check_catches_an_upward_import():
    assert _layer("microlm.ie.evaluate") == "ie" and _layer("microlm.stages.ie_eval") == "stages"
    assert "serve" not in LAYERS["ie"][1] and "ie" not in LAYERS["serve"][1]  # the ie ↔ serve knot stays cut
    assert "stages" not in LAYERS["train"][1] and "config" not in LAYERS["data"][1]


def test_stage_modules_import_domain_code_only_inside_functions():
    """Loading a profile needs no torch: a stage module's top level imports only torch-free
    dataclass modules of the domain (listed), the config and the registry."""
    torch_free = {"microlm.model.config", "microlm.infer.config", "microlm.train.settings", "microlm.data.tasks",
                  "microlm.ie.formats", "microlm.tokenizer.bpe", "microlm.io", "microlm.errors", "microlm.config",
                  "microlm.hw"}
    for path in sorted((REPO / "microlm" / "stages").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("microlm"):
                mod = node.module
                assert mod.startswith("microlm.stages") or mod in torch_free, \
                    f"{path.name} imports {mod} at its top level (import domain code inside build)"


def test_no_torch_to_load_a_profile_or_print_help():
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from microlm import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['config', '-p', 'cpu'])\n"
            "    with contextlib.suppress(SystemExit):\n"
            "        cli.main(['--help'])\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False"], r.stdout


def test_a_new_stage_is_one_module(tmp_path):
    """A throwaway stage added as one file in a copy of the package — its section, CLI verb, build,
    manifest and course-map row all follow, with no other file touched."""
    import shutil
    import subprocess
    import sys

    pkg = tmp_path / "src" / "microlm"
    shutil.copytree(REPO / "microlm", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", tmp_path / "src" / "configs")
    (tmp_path / "src" / "data").symlink_to(REPO / "data")
    (pkg / "stages" / "echo_len.py").write_text('''"""A throwaway stage: the corpus train split's first line, measured."""

from dataclasses import dataclass

from microlm.stages.registry import Stage


@dataclass
class EchoLenConfig:
    times: int = 1


def check(cfg):
    if cfg.echo_len.times < 1:
        raise ValueError("echo_len.times must be >= 1")


def build(run):
    line = (run.up["corpus"] / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "len.txt").write_text(str(len(line) * run.cfg.echo_len.times), encoding="utf-8")
    return {"chars": len(line) * run.cfg.echo_len.times}


STAGE = Stage("echo_len", "Z9", "measure the first training document", build=build, section=EchoLenConfig,
              check=check, outputs=("len.txt",), upstream=("corpus",), sections=("echo_len",), notebook="99_echo",
              summary=lambda m: f"{m['chars']} chars")
''', encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "MICROLM_RUNS": str(tmp_path / "runs")}
    env.pop("MICROLM_DATA", None)
    args = ["-p", "smoke", "--set", "data.max_records=300", "--set", "echo_len.times=3", "-q"]
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "echo-len", *args], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    first = (tmp_path / "runs" / "smoke" / "corpus" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert (tmp_path / "runs" / "smoke" / "echo_len" / "len.txt").read_text() == str(3 * len(first))
    m = json.loads((tmp_path / "runs" / "smoke" / "echo_len" / "manifest.json").read_text())
    assert m["config"] == {"echo_len": {"times": 3}} and m["outputs"] == ["len.txt"]
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "stages", "--markdown"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert "| Z9 | **echo_len**" in r.stdout
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "echo-len", *args[:-3], "--set", "echo_len.times=0"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode != 0 and "echo_len.times must be >= 1" in r.stderr


def test_manifests_written_by_the_registry_are_json(tmp_path):
    cfg = load_config("smoke", {"run_dir": str(tmp_path), "data.max_records": 200})
    out = stages.build("corpus", cfg, progress=False)
    m = json.loads(Path(out, "manifest.json").read_text(encoding="utf-8"))
    assert m["fingerprint"] == stages.data_fingerprint(cfg) == stages.current_fingerprint("corpus", cfg)
    assert [i["path"] for i in m["inputs"]] and all(len(i["digest"]) == 32 for i in m["inputs"])


# ------------------------------------------------------------------------------ imports inside functions

# Imports go at the top of a module.  Inside a function only: a stage module's own functions
# (``microlm/stages/<stage>.py``: build, inputs, helpers — the stage layer imports domain code there by
# design), a HEAVY project module, or an entry of EXCEPTIONS; each listed once, with its reason.
HEAVY_PACKAGES = ("torch", "transformers", "peft", "matplotlib", "vllm", "xgrammar")
HEAVY = {  # project modules that load torch at import (checked below), imported inside functions of light ones
    "microlm.train.dist": "torch.distributed: the registry's build sets it up for the training stages only",
    "microlm.model.hf_export": "torch: `microlm import-hf` and the IE answers of a MicroLM export",
    "microlm.model.load": "torch: `microlm chat` loads a model; `microlm --help` must not",
    "microlm.model.lora": "torch: the IE answers of a MicroLM export with a from-scratch adapter",
    "microlm.infer.chat": "torch: `microlm chat` only",
    "microlm.infer.generate": "torch: the IE answers of a MicroLM export (ie.answers stays numpy-only)",
    "microlm.infer.greedy": "torch: the IE answers of a transformers model",
    "microlm.ie.train_lora": "torch: the IE answers of a transformers model load its tokenizer with it",
}
EXCEPTIONS = {  # (file, light project module) → why the import stays inside the function
    ("microlm/cli.py", "microlm.stages"): "build_parser reads stages.REGISTRY as it is when called "
                                          "(tests swap it for a copy holding a throwaway stage)",
    ("microlm/stages/server.py", "microlm.serve.server"): "the stage layer's top level imports only the domain's "
                                                          "torch-free dataclass modules (see the test above)",
}


def _module_files() -> dict[str, Path]:
    out = {}
    for path in (REPO / "microlm").rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def _targets(node: ast.AST, pkg: str, mods) -> list[str]:
    """The modules an import statement names (``from a import b``: ``a.b`` if that is a module, else ``a``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = pkg.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    return []


def _function_imports(source: str, pkg: str, mods) -> set[tuple[int, str]]:
    """``(line, module)`` of each import of project code inside a function (nested ones too) of ``source``."""
    found = set()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                found |= {(node.lineno, t) for t in _targets(node, pkg, mods)
                          if t == "microlm" or t.startswith("microlm.")}
    return found


def _unlisted_function_imports(sources: dict[str, str], mods, stage_files: set[str]) -> tuple[list[str], set]:
    """The in-function project imports of ``sources`` (file → text) that nothing lists; the entries used."""
    bad, used = [], set()
    for file, source in sorted(sources.items()):
        if file in stage_files:
            continue
        name = file.removesuffix(".py").replace("/", ".")
        pkg = name.removesuffix(".__init__") if file.endswith("/__init__.py") else name.rpartition(".")[0]
        for line, mod in sorted(_function_imports(source, pkg, mods)):
            if mod in HEAVY or (file, mod) in EXCEPTIONS:
                used.add(mod if mod in HEAVY else (file, mod))
            else:
                bad.append(f"{file}:{line} imports {mod} inside a function: import it at the top (or list it "
                           f"in HEAVY if it loads torch, in EXCEPTIONS with the reason otherwise)")
    return bad, used


def _heavy_packages_loaded(mod: str, files: dict[str, Path]) -> set[str]:
    """The HEAVY_PACKAGES that importing ``mod`` loads, following top-level imports (not those inside
    functions or under ``if TYPE_CHECKING``) through the project's modules and their packages."""
    def top_level(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                    isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)):
                continue
            yield child
            yield from top_level(child)

    parts = mod.split(".")
    todo, seen, found = [".".join(parts[:k]) for k in range(1, len(parts) + 1)], set(), set()
    while todo:
        m = todo.pop()
        if m in seen or m not in files:
            continue
        seen.add(m)
        pkg = m if files[m].name == "__init__.py" else m.rpartition(".")[0]
        for node in top_level(ast.parse(files[m].read_text(encoding="utf-8"))):
            for t in _targets(node, pkg, files):
                if t == "microlm" or t.startswith("microlm."):
                    tp = t.split(".")
                    todo += [".".join(tp[:k]) for k in range(1, len(tp) + 1)]
                else:
                    found.add(t.split(".")[0])
    return found & set(HEAVY_PACKAGES)


def test_imports_inside_functions_are_the_listed_ones():
    files = _module_files()
    stage_files = {f"microlm/stages/{name}.py" for name in stages.REGISTRY}
    sources = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in files.values()}
    bad, used = _unlisted_function_imports(sources, files, stage_files)
    assert not bad, "\n".join(bad)
    stale = (set(HEAVY) | set(EXCEPTIONS)) - used
    assert not stale, f"listed but no longer imported inside a function: {sorted(map(str, stale))}"
    for mod in HEAVY:
        assert _heavy_packages_loaded(mod, files), f"{mod} loads none of {HEAVY_PACKAGES}: import it at the top"
    for _file, mod in EXCEPTIONS:
        assert mod not in HEAVY and not _heavy_packages_loaded(mod, files), f"{mod}: list it in HEAVY only"
    assert _heavy_packages_loaded("microlm.stages", files) == set()  # loading a profile: no torch

    # the check catches a new one (nested functions and relative imports too), not a stage's build
    src = ("from microlm.io import read_json\n\ndef f():\n    import os\n    from microlm.io import write_json\n"
           "    from microlm import stages\n\n    def g():\n        from . import hw\n")
    assert _function_imports(src, "microlm", files) == {(5, "microlm.io"), (6, "microlm.stages"), (9, "microlm.hw")}
    new = {"microlm/data/new.py": "def f():\n    from microlm.paths import REPO_ROOT\n",
           "microlm/cli.py": "def f():\n    from microlm.model.load import load_model\n",
           "microlm/stages/corpus.py": "def build(run):\n    from microlm.data.prepare_pretrain import x\n"}
    bad, used = _unlisted_function_imports(new, files, stage_files)
    assert len(bad) == 1 and bad[0].startswith("microlm/data/new.py:2 imports microlm.paths") and used == {
        "microlm.model.load"}
