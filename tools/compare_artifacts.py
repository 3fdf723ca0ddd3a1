"""Compare the artifacts of two stage runs (a one-off check that a refactor preserved behaviour).

    python tools/compare_artifacts.py snapshot RUNS_DIR PROFILE OUT.json [--root DIR ...]
    python tools/compare_artifacts.py compare A.json B.json

``snapshot`` walks RUNS_DIR/PROFILE/<stage>/ and records, per file, the sha256 of its bytes and, for
JSON / JSONL (and small text files), the sha256 of a *masked* canonical form: timing- and
machine-dependent keys (``MASK_KEYS``/``MASK_PATTERNS``) replaced by a constant, RUNS_DIR (and each
``--root``, e.g. the checkout) replaced by a placeholder, other absolute paths by ``<ABSPATH>``.  It
also records every fingerprint found in a stage (the manifest's own, its upstream's, and the
``*fingerprint`` keys of sub-run reports/checkpoint states).

``compare`` prints per stage: bit-identical / identical after masking / different / only in A /
only in B, the differing files and whether the fingerprints are equal.  Exit status 1 when a weight
file (*.safetensors, *.bin, *.pt) or token file (*.bin, *.idx) is not bit-identical, a *.jsonl differs
even after masking, or any fingerprint differs.  Sub-run fingerprints (ie_lora ``run_fingerprint``,
ie_merged ``fingerprint``) hash absolute paths: when the two snapshots come from different runs dirs
they are listed, not failed (build both at one MICROLM_RUNS path to check them strictly); the
ie_eval answer caches (``.cache/<model>-<fingerprint>.jsonl``) are paired without that hash.
The masks are applied when the snapshot is taken: after changing them, snapshot both runs again.
Stdlib only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import sys
from pathlib import Path

MANIFEST = "manifest.json"  # microlm/runs.py MANIFEST

# keys whose values are timings, sizes of this process, or describe the machine (matched lower-case)
MASK_KEYS = {
    "started", "finished", "seconds", "created", "timings", "memory", "peak_rss_mb", "cpu", "cpus",
    "cores_in_use", "machine", "host", "pid", "date", "versions", "python", "duration", "latency",
    "ttft", "throughput", "timestamp", "mtime_ns", "log_tail", "rate",
}
MASK_PATTERNS = [re.compile(p) for p in (
    r".*_s$", r".*_per_s$", r".*_seconds$", r".*_ms$", r"^elapsed.*", r"^time.*", r"^wall.*", r".*rss.*",
    r"^duration.*", r"^latency.*", r".*_latency.*", r"^ttft.*", r".*_ttft.*", r"^tpot.*", r"^itl.*",
    r"^e2e.*", r"^throughput.*", r".*_throughput.*", r".*per_s.*", r".*_per_sec.*", r"^requests_per.*",
    r"^tokens_per.*", r".*_mb$", r".*_mib$", r".*_gib$", r".*seconds.*", r"^start$", r".*tps.*",
    r"^started.*", r"^finished.*",
)]
# masks for some files only ("<stage>/<relative path>" glob → keys), found by comparing two runs of one commit:
FILE_MASK_KEYS = [
    # a time-bounded load test: how many requests fit in duration_s depends on the machine's speed
    ("serve_soak/*.json", {"requests", "normal", "sent", "got_4xx", "served_after_malformed", "served_steady",
                           "p50_drift", "malformed_4xx"}),
    # the answer cache's key hashes the model fingerprint, which hashes the model folders' files, some of
    # which hold absolute paths (hf/microlm_export.json "folder", adapter_config.json "base_model_name_or_path")
    ("ie_eval/.cache/*.jsonl", {"key"}),
    # vLLM / transformers-serve throughput ratios
    ("serve_bench/*.json", {"ratios"}),
]
# Markdown sections of timings ("<stage>/<relative path>" glob → headings): masked up to the next "## "
TEXT_MASK_SECTIONS = [("ie_eval/summary.md", {"## Time"})]
# the cache file is named <model>-<model fingerprint[:16]>.jsonl: paired across runs without the hash
PAIR = [(re.compile(r"^(\.cache/.+)-[0-9a-f]{16}\.jsonl$"), r"\1-<fp>.jsonl")]
# files that are timing/machine output by nature: compared, never expected equal (listed as "volatile")
VOLATILE = (".log", ".png")
TEXT_SUFFIXES = (".md", ".txt", ".csv", ".jinja", ".py")
TEXT_MAX = 8 << 20
MASK = "<MASKED>"
ABS_PATH = re.compile(r"^/[^\s]*$")


def masked_key(key: str, extra: frozenset = frozenset()) -> bool:
    """Timing/machine keys; also every ``*fingerprint`` key (compared on their own, by ``fingerprints``:
    some sub-run fingerprints hash absolute paths)."""
    k = key.lower()
    return k in MASK_KEYS or "fingerprint" in k or k in extra or any(p.match(k) for p in MASK_PATTERNS)


def _subst(s: str, roots: list[tuple[str, str]]) -> str:
    for root, tag in roots:
        s = s.replace(root, tag)
    return s


def mask(obj, roots: list[tuple[str, str]], extra: frozenset = frozenset()):
    """The value with masked keys replaced by MASK and known roots in strings by placeholders."""
    if isinstance(obj, dict):
        return {k: (MASK if masked_key(k, extra) else mask(v, roots, extra)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask(v, roots, extra) for v in obj]
    if isinstance(obj, str):
        s = _subst(obj, roots)
        if ABS_PATH.match(s):  # an absolute path outside RUNS_DIR / the roots given
            return "<ABSPATH>"
        return s
    return obj


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def fingerprints(obj, prefix: str = "$") -> dict[str, str]:
    """Every ``*fingerprint`` value in a JSON object, by its key path."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}"
            if "fingerprint" in k.lower() and isinstance(v, str | type(None)):
                out[p] = v
            else:
                out.update(fingerprints(v, p))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(fingerprints(v, f"{prefix}[{i}]"))
    return out


def masked_digest(path: Path, raw: bytes, roots, where: str) -> tuple[str | None, dict | None]:
    """(sha256 of the masked canonical form, the parsed JSON object if any); ``where``: <stage>/<rel>."""
    name = path.name
    extra = frozenset(k for pat, keys in FILE_MASK_KEYS if fnmatch.fnmatch(where, pat) for k in keys)
    try:
        if name.endswith(".jsonl"):
            lines = [mask(json.loads(line), roots, extra) for line in raw.decode("utf-8").splitlines() if line.strip()]
            return hashlib.sha256(b"\n".join(canonical(x) for x in lines)).hexdigest(), None
        if name.endswith(".json"):
            obj = json.loads(raw.decode("utf-8"))
            view = obj
            if name == MANIFEST and isinstance(obj.get("files"), dict):
                # digests/sizes of the stage's files: those files are compared themselves (masked where due)
                view = dict(obj, files={k: MASK for k in obj["files"]})
            return hashlib.sha256(canonical(mask(view, roots, extra))).hexdigest(), obj
        if name.endswith(TEXT_SUFFIXES) and len(raw) <= TEXT_MAX:
            heads = {h for pat, hs in TEXT_MASK_SECTIONS if fnmatch.fnmatch(where, pat) for h in hs}
            lines, skipping = [], False
            for line in _subst(raw.decode("utf-8"), roots).splitlines():
                if line.startswith("## "):
                    skipping = line.strip() in heads
                    if skipping:
                        lines.append(line + " " + MASK)
                        continue
                if not skipping:
                    lines.append(line)
            return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest(), None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, None
    return None, None


def snapshot(runs_dir: str, profile: str, out: str, roots: list[str]) -> None:
    base = Path(runs_dir).resolve() / profile
    subs = [(str(base), "<RUNS>/<PROFILE>"), (str(Path(runs_dir).resolve()), "<RUNS>")]
    subs += [(str(Path(r).resolve()), "<ROOT>") for r in roots]
    subs.sort(key=lambda x: -len(x[0]))  # longest prefix first
    stages = {}
    for stage_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        files, fps = {}, {}
        for p in sorted(stage_dir.rglob("*")):
            if not p.is_file() or re.fullmatch(r"\..*\.lock", p.name):
                continue
            rel = p.relative_to(stage_dir).as_posix()
            raw = p.read_bytes()
            md, obj = masked_digest(p, raw, subs, f"{stage_dir.name}/{rel}")
            files[rel] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "masked": md}
            if obj is not None:
                fps.update({f"{rel}:{k}": v for k, v in fingerprints(obj).items()})
        m = fps.get(f"{MANIFEST}:$.fingerprint")
        stages[stage_dir.name] = {"fingerprint": m, "fingerprints": fps, "files": files}
    doc = {"runs_dir": str(Path(runs_dir).resolve()), "profile": profile, "roots": roots, "stages": stages}
    Path(out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    n = sum(len(s["files"]) for s in stages.values())
    print(f"snapshot: {len(stages)} stages, {n} files → {out}")


def strict(rel: str) -> str | None:
    """Why a difference in this file fails the comparison: 'weights'/'tokens' (bytes), 'jsonl' (masked)."""
    if rel.endswith((".idx",)) or (rel.endswith(".bin") and rel.split("/")[-1] in ("train.bin", "val.bin")):
        return "tokens"
    if rel.endswith((".safetensors", ".bin", ".pt")):
        return "weights"
    if rel.endswith(".jsonl"):
        return "jsonl"
    return None


def paired(files: dict) -> dict[str, str]:
    """{pairing name: file name}: names carrying a path-dependent hash (PAIR) lose it."""
    out = {}
    for rel in files:
        key = rel
        for pat, rep in PAIR:
            key = pat.sub(rep, key)
        out[key] = rel
    return out


def compare(a_path: str, b_path: str) -> int:
    a = json.loads(Path(a_path).read_text(encoding="utf-8"))
    b = json.loads(Path(b_path).read_text(encoding="utf-8"))
    same_place = a["runs_dir"] == b["runs_dir"] and a["profile"] == b["profile"]
    print(f"A: {a_path} ({a['runs_dir']})\nB: {b_path} ({b['runs_dir']})  profile {a['profile']}/{b['profile']}")
    if not same_place:
        print("runs dirs differ: sub-run fingerprints that hash an absolute path (ie_lora run_fingerprint,"
              " ie_merged fingerprint) are reported, not failed; build both at one MICROLM_RUNS path to check them")
    failures, notes = [], []
    for stage in sorted(set(a["stages"]) | set(b["stages"])):
        sa, sb = a["stages"].get(stage), b["stages"].get(stage)
        if sa is None or sb is None:
            print(f"\n[{stage}] only in {'B' if sa is None else 'A'}")
            failures.append(f"{stage}: stage only in one run")
            continue
        pa, pb = paired(sa["files"]), paired(sb["files"])
        same, masked, diff, volatile, renamed = [], [], [], [], []
        only_a = sorted(pa[k] for k in set(pa) - set(pb))
        only_b = sorted(pb[k] for k in set(pb) - set(pa))
        for key in sorted(set(pa) & set(pb)):
            ra, rb = pa[key], pb[key]
            x, y = sa["files"][ra], sb["files"][rb]
            if ra != rb:
                renamed.append(f"{ra} ~ {rb}")
            if x["sha256"] == y["sha256"]:
                same.append(key)
            elif x["masked"] is not None and x["masked"] == y["masked"]:
                masked.append(key)
            elif key.endswith(VOLATILE):
                volatile.append(key)
            else:
                diff.append(key)
        fp_eq = sa["fingerprint"] == sb["fingerprint"]
        sub_a, sub_b = sa["fingerprints"], sb["fingerprints"]
        fp_diff = sorted(k for k in set(sub_a) | set(sub_b) if sub_a.get(k) != sub_b.get(k))
        print(f"\n[{stage}] identical {len(same)}, identical after masking {len(masked)}, different {len(diff)}"
              f" (+{len(volatile)} logs/plots), only in A {len(only_a)}, only in B {len(only_b)};"
              f" fingerprint {'equal' if fp_eq else 'DIFFERENT'} ({sa['fingerprint']} / {sb['fingerprint']}),"
              f" {len(sub_a)} fingerprints recorded, {len(fp_diff)} differ")
        for tag, lst in (("masked-equal", masked), ("DIFFERENT", diff), ("volatile", volatile),
                         ("only in A", only_a), ("only in B", only_b), ("paired", renamed)):
            for rel in lst:
                print(f"   {tag:13} {rel}")
        for k in fp_diff:
            top = k.startswith(f"{MANIFEST}:")  # the stage's own or its upstream's: path-independent
            tag = "FINGERPRINT" if top or same_place else "fp (path)"
            print(f"   {tag:13} {k}: {sub_a.get(k)} / {sub_b.get(k)}")
            (failures if top or same_place else notes).append(f"{stage}: fingerprint {k}")
        for rel in masked + diff + volatile + only_a + only_b:
            why = strict(rel)
            if why is None:
                continue
            if why in ("weights", "tokens") or rel not in masked:
                failures.append(f"{stage}/{rel} ({why})")
            else:
                notes.append(f"{stage}/{rel}: jsonl equal only after masking")
    print()
    for n in notes:
        print(f"note: {n}")
    if failures:
        print(f"FAIL: {len(failures)}")
        for f in failures:
            print(f"  {f}")
        return 1
    print("OK: weights and token files bit-identical, jsonl identical (after masking), fingerprints equal"
          + ("" if same_place else " (sub-run fingerprints: see notes)"))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "snapshot":
        rest = argv[4:]
        roots = [rest[i + 1] for i, x in enumerate(rest) if x == "--root" and i + 1 < len(rest)]
        snapshot(argv[1], argv[2], argv[3], roots)
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        return compare(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
