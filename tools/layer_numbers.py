"""Layering numbers of the ``microlm`` package in a checkout (a one-off, for a before/after refactor).

    python tools/layer_numbers.py ROOT [--runs N]   → JSON on stdout

For ROOT/microlm: the longest module; (comment + docstring lines) / code lines; imports inside
function bodies; the time ``import microlm.config`` takes in a fresh interpreter (and whether it
pulls in torch); imports from the domain packages up into config/stages/runs/cli; imports between
microlm/ie and microlm/serve; private (``_name``) names imported from another microlm module.
Import statements are counted wherever they are: module level, function bodies, ``if TYPE_CHECKING:``.
Stdlib only; the timing runs ``sys.executable`` with PYTHONPATH=ROOT, cwd=ROOT.
"""

from __future__ import annotations

import ast
import io
import json
import os
import statistics
import subprocess
import sys
import time
import tokenize
from pathlib import Path

DOMAIN = ("data", "tokenizer", "model", "train", "infer", "ie", "serve")
UP = ("microlm.config", "microlm.stages", "microlm.runs", "microlm.cli")


def modname(root: Path, path: Path) -> tuple[str, str]:
    """(module name, package a relative import is resolved against)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def import_targets(node: ast.Import | ast.ImportFrom, package: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(module names the statement may import, [(from-module, name)] for ``from`` imports)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names], []
    if node.level:
        base = package.split(".") if package else []
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    mods = [mod] + [f"{mod}.{a.name}" for a in node.names if a.name != "*"]
    return mods, [(mod, a.name) for a in node.names]


def is_project(mod: str) -> bool:
    return mod == "microlm" or mod.startswith("microlm.")


def under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def line_counts(src: str, tree: ast.Module) -> dict:
    doc_lines: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                doc_lines.update(range(first.lineno, first.end_lineno + 1))
    comment_lines, code_token_lines = set(), set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comment_lines.add(tok.start[0])
        elif tok.type not in skip:
            code_token_lines.update(range(tok.start[0], tok.end[0] + 1))
    lines = src.splitlines()
    nonblank = {i for i, line in enumerate(lines, 1) if line.strip()}
    code = {i for i in nonblank if i in code_token_lines and i not in doc_lines}
    full_comment = comment_lines - code_token_lines
    return {"nonblank": len(nonblank), "code": len(code), "docstring": len(doc_lines & nonblank),
            "comment": len(comment_lines), "comment_full_line": len(full_comment),
            "comment_trailing": len(comment_lines & code_token_lines)}


def in_function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: dict[int, ast.AST] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for n in ast.walk(fn):
                if isinstance(n, ast.Import | ast.ImportFrom):
                    found[id(n)] = n
    return list(found.values())


def time_import(root: Path, runs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("MICROLM_DATA", None)

    def wall(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, capture_output=True)
        return time.perf_counter() - t

    wall("import microlm.config")  # warm the OS file cache and __pycache__
    times = [wall("import microlm.config") for _ in range(runs)]
    bare = [wall("pass") for _ in range(runs)]
    cum = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import microlm.config"], cwd=root, env=env,
                           check=True, capture_output=True, text=True)
        for line in r.stderr.splitlines():
            f = line.split("|")
            if len(f) == 3 and f[2].strip() == "microlm.config":
                cum.append(int(f[1]) / 1e6)
    probe = ("import sys, microlm.config; print(sorted(m for m in ('torch', 'numpy', 'transformers', 'yaml') "
             "if m in sys.modules)); print(len(sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    heavy = json.loads(out[0].replace("'", '"'))
    return {"import_config_s": round(statistics.median(times), 4), "runs": [round(t, 4) for t in times],
            "python_bare_s": round(statistics.median(bare), 4),
            "importtime_cumulative_s": round(statistics.median(cum), 4) if cum else None,
            "torch_after_import_config": "torch" in heavy, "heavy_modules_loaded": heavy,
            "modules_after_import_config": int(out[1]), "python": sys.executable}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0]).resolve()
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 5
    pkg = root / "microlm"
    files = sorted(pkg.rglob("*.py"))
    longest = None
    totals = {"nonblank": 0, "code": 0, "docstring": 0, "comment": 0, "comment_full_line": 0, "comment_trailing": 0}
    in_fn_all, in_fn_project = 0, 0
    in_fn_by_file: dict[str, int] = {}
    imports_up, cross, private = [], [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        src = path.read_text(encoding="utf-8")
        n_lines = len(src.splitlines())
        if longest is None or n_lines > longest["lines"]:
            longest = {"path": rel, "lines": n_lines}
        tree = ast.parse(src, filename=rel)
        for k, v in line_counts(src, tree).items():
            totals[k] += v
        mod, package = modname(root, path)
        for n in in_function_imports(tree):
            in_fn_all += 1
            mods, _ = import_targets(n, package)
            if any(is_project(m) for m in mods):
                in_fn_project += 1
                in_fn_by_file[rel] = in_fn_by_file.get(rel, 0) + 1
        sub = mod.split(".")[1] if mod.count(".") >= 1 else ""
        for n in ast.walk(tree):
            if not isinstance(n, ast.Import | ast.ImportFrom):
                continue
            mods, names = import_targets(n, package)
            stmt = f"{rel}:{n.lineno}: {ast.unparse(n)}"
            if sub in DOMAIN and any(under(m, u) for m in mods for u in UP):
                imports_up.append(stmt)
            if sub == "ie" and any(under(m, "microlm.serve") for m in mods):
                cross.append("ie→serve " + stmt)
            if sub == "serve" and any(under(m, "microlm.ie") for m in mods):
                cross.append("serve→ie " + stmt)
            for frm, name in names:
                if is_project(frm) and frm != mod and name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                    private.append(f"{stmt}  [{frm}.{name}]")
    out = {
        "root": str(root),
        "py_files": len(files),
        "longest_module": longest,
        "comment_per_code": round((totals["comment"] + totals["docstring"]) / totals["code"], 4),
        "line_counts": totals,
        "line_counts_note": "code = non-blank lines with a code token, docstring lines excluded; comment = lines "
                            "bearing a comment (full-line or trailing); docstring = lines of module/class/function docstrings",
        "in_function_project_imports": in_fn_project,
        "in_function_imports": in_fn_all,
        "in_function_project_imports_by_file": dict(sorted(in_fn_by_file.items(), key=lambda kv: -kv[1])),
        **time_import(root, runs),
        "imports_up": {"count": len(imports_up), "list": imports_up},
        "ie_serve_cross": {"count": len(cross), "list": cross},
        "private_cross_module": {"count": len(private), "list": private},
    }
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
