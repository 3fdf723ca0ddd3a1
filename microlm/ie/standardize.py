"""Stage B1, step 01 (standardize): upstream relation-extraction files → one record type.

Every source adapter yields ``IERecord(id, cate, text, relation=[{head, head_type, relation, tail,
tail_type}], source)``; the id is a stable hash of the text, so the same sentence from two files
gets the same id (step 02 merges or drops them).  Relation names are mapped onto the InstructIE zh
topic schema by ``data/ie/relation_map.json`` (data, not code); relations it does not map go to an
extra topic (``unmapped_topic``) or are dropped — counted either way.

Nothing here raises on bad input within a file: malformed lines, undecodable bytes (files are read as UTF-8,
else GB18030, the other encoding of Chinese corpora), missing fields, offsets that do not match
the text and relation lists that are not lists are counted by reason in ``Issues`` with the first
few samples of each.  Only a file that cannot hold a record at all — empty, or one JSON array where JSON
lines are expected — is a one-line error naming it (``check_source_file``).

Formats: InstructIE JSON lines (``{id?, cate, text, relation}``; zh/en), IEPile/DeepKE samples
(``{text, relation:[{head, relation, tail, head_type?, tail_type?}]}``), DeepKE RE CSV
(``sentence,relation,head,head_offset,tail,tail_offset``), DuIE/SKE ``spo_list`` and CMeIE
(``object: {"@value"}``), and ``head<TAB>tail<TAB>relation<TAB>sentence`` TSV (FinRE, SanWen,
crownpku; FinRE's two directions of one fact, ``X`` and ``被X``, collapse into one triple).
(Driven by ``microlm/ie/pipeline.py``; steps 02–06 follow.)
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree.ElementTree import ParseError

import xxhash

from microlm.errors import MicroLMError
from microlm.io import parse_json_line
from microlm.paths import REPO_ROOT

__all__ = ["IERecord", "Issues", "RelationMap", "read_text_lines", "record_id", "read_xlsx_rows", "ADAPTERS",
           "check_source_file", "standardize_file"]

RELATION_MAP = REPO_ROOT / "data" / "ie" / "relation_map.json"
EMBEDDED_RECORDS = REPO_ROOT / "data" / "ie" / "embedded_zh.jsonl"  # project-written, ≥ 21 per topic
EMBEDDED_SCHEMA = REPO_ROOT / "data" / "ie" / "embedded_schema_zh.json"  # the relations those records use


def record_id(text: str) -> str:
    """Stable id of a text (xxh3-64 of its UTF-8 bytes, hex)."""
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8"))


@dataclass
class IERecord:
    id: str
    cate: str
    text: str
    relation: list[dict]
    source: str

    def to_dict(self) -> dict:
        """The JSONL row (shallow: the triples are shared, not copied)."""
        return {"id": self.id, "cate": self.cate, "text": self.text, "relation": self.relation, "source": self.source}


@dataclass
class Issues:
    """Counts by reason plus the first ``keep`` samples of each (file, line, what)."""

    keep: int = 3
    counts: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str, what) -> None:
        self.counts[reason] += 1
        self.add_sample(reason, {"at": where, "sample": str(what)[:200]})

    def add_sample(self, reason: str, sample: dict) -> None:
        s = self.samples.setdefault(reason, [])
        if len(s) < self.keep:
            s.append(sample)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts.most_common()), "samples": self.samples}


class RelationMap:
    """Upstream relation → (topic, relation, swap) for one source family."""

    def __init__(self, path: str | Path = RELATION_MAP, unmapped_topic: str | None = "其他"):
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        self.drop = set(raw.get("drop", []))
        self.tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
        self.unmapped_topic = unmapped_topic

    def map(self, family: str, rel: str) -> tuple[str, str, bool] | None:
        """``None``: not a fact (dropped).  Unmapped names → ``(unmapped_topic, rel, False)``."""
        if rel in self.drop:
            return None
        hit = self.tables.get(family, {}).get(rel)
        if hit:
            return hit[0], hit[1], len(hit) > 2 and hit[2] == "swap"
        return (self.unmapped_topic, rel, False) if self.unmapped_topic else None


def _open_bytes(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _decodes(path: Path, encoding: str) -> bool:
    """Whether the whole file decodes, checked in 1 MiB pieces (nothing kept)."""
    dec = codecs.getincrementaldecoder(encoding)()
    try:
        with _open_bytes(path) as f:
            while piece := f.read(1 << 20):
                dec.decode(piece)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def read_text_lines(path: str | Path, issues: Issues) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file (gzip by magic bytes), streamed: UTF-8 if the whole
    file decodes, else GB18030 (counted as ``encoding_gb18030``), else UTF-8 with U+FFFD (counted)."""
    path = Path(path)
    if _decodes(path, "utf-8"):
        encoding, errors = "utf-8-sig", "strict"
    elif _decodes(path, "gb18030"):
        encoding, errors = "gb18030", "strict"
        issues.add("encoding_gb18030", path.name, "file decoded as GB18030")
    else:
        encoding, errors = "utf-8", "replace"
        issues.add("encoding_undecodable", path.name, "bytes replaced by U+FFFD")
    with _open_bytes(path) as raw, io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline="\n") as f:
        for n, line in enumerate(f, 1):
            yield n, line.rstrip("\r\n")


def _triple(head, rel, tail, head_type="", tail_type="") -> dict:
    return {"head": head, "head_type": head_type or "", "relation": rel, "tail": tail, "tail_type": tail_type or ""}


class _Builder:
    """Groups mapped triples by text into records, one topic per record (the topic of most triples;
    triples of other topics go to records of their own, same text and id)."""

    def __init__(self, source: str, rmap: RelationMap, family: str, issues: Issues):
        self.source, self.rmap, self.family, self.issues = source, rmap, family, issues

    def records(self, text: str, triples: list[dict], where: str, cate: str | None = None) -> list[IERecord]:
        if not isinstance(text, str) or not text.strip():
            self.issues.add("missing_text", where, text)
            return []
        by_topic: dict[str, list[dict]] = {}
        for t in triples:
            if not all(isinstance(t.get(k), str) and t.get(k) for k in ("head", "relation", "tail")):
                self.issues.add("triple_missing_field", where, t)
                continue
            if cate is not None:  # already InstructIE: keep the names as they are
                by_topic.setdefault(cate, []).append(_triple(t["head"], t["relation"], t["tail"],
                                                             t.get("head_type"), t.get("tail_type")))
                continue
            hit = self.rmap.map(self.family, t["relation"])
            if hit is None:
                self.issues.add(f"relation_dropped:{t['relation']}", where, t)
                continue
            topic, rel, swap = hit
            if topic == self.rmap.unmapped_topic:
                self.issues.add("relation_unmapped_kept", where, t["relation"])
            h, ht, tl, tt = t["head"], t.get("head_type"), t["tail"], t.get("tail_type")
            if swap:
                h, ht, tl, tt = tl, tt, h, ht
            by_topic.setdefault(topic, []).append(_triple(h, rel, tl, ht, tt))
        if not by_topic:
            self.issues.add("no_usable_triple", where, text)
            return []
        rid = record_id(text)
        return [IERecord(rid, topic, text, ts, self.source) for topic, ts in by_topic.items()]


def _json_lines(path, issues) -> Iterator[tuple[str, dict]]:
    name = Path(path).name
    for n, line in read_text_lines(path, issues):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            obj = parse_json_line(line)
        except ValueError:
            issues.add("malformed_json", where, line)
            continue
        if not isinstance(obj, dict):
            issues.add("malformed_json", where, line)
            continue
        yield where, obj


def _relation_list(obj: dict, key: str, where: str, issues: Issues) -> list[dict] | None:
    rels = obj.get(key)
    if not isinstance(rels, list):
        issues.add("relation_not_a_list", where, rels)
        return None
    bad = [r for r in rels if not isinstance(r, dict)]
    for r in bad:
        issues.add("triple_not_an_object", where, r)
    return [r for r in rels if isinstance(r, dict)]


def adapt_instructie(path, b: _Builder) -> Iterator[IERecord]:
    """InstructIE JSON lines ``{id?, cate, text, relation}`` (a ``{"record": ...}`` wrapper is unwrapped)."""
    for where, obj in _json_lines(path, b.issues):
        if isinstance(obj.get("record"), dict):  # the bundle's examples file: {format, origin, record}
            if obj.get("format") != "instructie":
                b.issues.add(f"other_format:{obj.get('format')}", where, obj.get("origin"))
                continue
            obj = obj["record"]
        rels = _relation_list(obj, "relation", where, b.issues)
        if rels is None:
            continue
        cate = obj.get("cate")
        if not isinstance(cate, str) or not cate:
            b.issues.add("missing_cate", where, obj.get("text"))
            continue
        yield from b.records(obj.get("text"), rels, where, cate=cate)


def adapt_iepile_sample(path, b: _Builder) -> Iterator[IERecord]:
    """DeepKE/IEPile samples ``{text, relation: [{head, relation, tail, head_type?, tail_type?}]}``."""
    for where, obj in _json_lines(path, b.issues):
        rels = _relation_list(obj, "relation", where, b.issues)
        if rels is not None:
            yield from b.records(obj.get("text"), rels, where)


def adapt_spo_list(path, b: _Builder) -> Iterator[IERecord]:
    """DuIE/SKE and CMeIE: ``{text, spo_list: [{subject, predicate, object, subject_type, object_type}]}``
    (CMeIE wraps object and object_type as ``{"@value": ...}``)."""
    def val(x):
        return x.get("@value") if isinstance(x, dict) else x

    for where, obj in _json_lines(path, b.issues):
        spo = _relation_list(obj, "spo_list", where, b.issues)
        if spo is None:
            continue
        triples = [{"head": s.get("subject"), "relation": s.get("predicate"), "tail": val(s.get("object")),
                    "head_type": s.get("subject_type"), "tail_type": val(s.get("object_type"))} for s in spo]
        yield from b.records(obj.get("text"), triples, where)


def adapt_deepke_csv(path, b: _Builder) -> Iterator[IERecord]:
    """DeepKE RE CSV, one triple per row; rows of one sentence are grouped.  Offsets are checked:
    a head/tail not at its offset but elsewhere in the sentence is kept (counted); not in it, dropped
    by step 02."""
    lines = [line for _, line in read_text_lines(path, b.issues)]
    grouped: dict[str, list[dict]] = {}
    first_at: dict[str, str] = {}
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    want = ["sentence", "relation", "head", "head_offset", "tail", "tail_offset"]
    if [h.strip() for h in header] != want:
        b.issues.add("csv_unexpected_header", Path(path).name, header)
        return
    fname = Path(path).name
    for n, row in enumerate(reader, 2):
        where = f"{fname}:{n}"
        if len(row) != 6:
            b.issues.add("malformed_csv_row", where, row)
            continue
        sent, rel, head, ho, tail, to = row
        for name, ent, off in (("head", head, ho), ("tail", tail, to)):
            try:
                ok = sent[int(off):int(off) + len(ent)] == ent
            except ValueError:
                ok = False
            if not ok:
                b.issues.add(f"{name}_offset_mismatch", where, f"{ent}@{off}")
        grouped.setdefault(sent, []).append({"head": head, "relation": rel, "tail": tail})
        first_at.setdefault(sent, where)
    for sent, triples in grouped.items():
        yield from b.records(sent, triples, first_at[sent])


def _group_facts(rows: Iterator[tuple[str, str, str, str, str]], b: _Builder,
                 passive_prefix: str | None) -> Iterator[IERecord]:
    """``(where, head, tail, relation, sentence)`` rows → one record per sentence (its facts in
    order).  ``passive_prefix`` (FinRE: "被"): ``被X(a, b)`` is the same fact as ``X(b, a)`` and is
    folded into it (counted as ``direction_collapsed``)."""
    grouped: dict[str, dict[tuple, dict]] = {}
    first_at: dict[str, str] = {}
    for where, head, tail, rel, sent in rows:
        if passive_prefix and rel.startswith(passive_prefix) and len(rel) > len(passive_prefix):
            head, tail, rel = tail, head, rel[len(passive_prefix):]
            passive = True
        else:
            passive = False
        key = (head, rel, tail)
        facts = grouped.setdefault(sent, {})
        if key in facts:
            b.issues.add("direction_collapsed" if passive else "duplicate_triple", where, key)
            continue
        facts[key] = {"head": head, "relation": rel, "tail": tail}
        first_at.setdefault(sent, where)
    for sent, facts in grouped.items():
        yield from b.records(sent, list(facts.values()), first_at[sent])


def adapt_tsv(path, b: _Builder, *, passive_prefix: str | None = None) -> Iterator[IERecord]:
    """``head<TAB>tail<TAB>relation<TAB>sentence`` (blank lines ignored); rows of one sentence are
    grouped (``_group_facts``)."""
    fname = Path(path).name

    def rows():
        for n, line in read_text_lines(path, b.issues):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 4:
                b.issues.add("malformed_tsv_row", f"{fname}:{n}", line)
                continue
            yield (f"{fname}:{n}", *parts)

    return _group_facts(rows(), b, passive_prefix)


_XLSX = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"


def read_xlsx_rows(path: str | Path) -> Iterator[list[str]]:
    """The first sheet of an .xlsx file (gzip allowed) as lists of cell strings — shared strings,
    inline strings and numbers; a missing cell is ``""``.  Standard library only (zip + XML)."""
    with _open_bytes(Path(path)) as f:
        z = zipfile.ZipFile(io.BytesIO(f.read()))
    shared = []
    if "xl/sharedStrings.xml" in z.namelist():
        for si in ET.fromstring(z.read("xl/sharedStrings.xml")).iter(f"{_XLSX}si"):
            shared.append("".join(t.text or "" for t in si.iter(f"{_XLSX}t")))
    sheets = sorted(n for n in z.namelist() if re.fullmatch(r"xl/worksheets/sheet\d+\.xml", n))
    if not sheets:
        raise MicroLMError(f"{Path(path).name}: no worksheet in the .xlsx file")
    for row in ET.fromstring(z.read(sheets[0])).iter(f"{_XLSX}row"):
        cells: dict[int, str] = {}
        for c in row.iter(f"{_XLSX}c"):
            col = 0
            for ch in re.match(r"[A-Z]+", c.get("r", "A")).group():
                col = col * 26 + ord(ch) - 64
            v = c.find(f"{_XLSX}v")
            if c.get("t") == "s" and v is not None:
                cells[col - 1] = shared[int(v.text)]
            elif c.get("t") == "inlineStr":
                cells[col - 1] = "".join(t.text or "" for t in c.iter(f"{_XLSX}t"))
            elif v is not None:
                cells[col - 1] = v.text or ""
        yield [cells.get(i, "") for i in range(max(cells) + 1)] if cells else []


def adapt_people_xlsx(path, b: _Builder) -> Iterator[IERecord]:
    """percent4's person-relation table: sheet rows ``人物1, 人物2, 关系, 文本`` (the unmasked source of
    its train/test.txt, whose entities are masked with #)."""
    fname = Path(path).name
    it = read_xlsx_rows(path)
    try:
        header = next(it, None)
    except (MicroLMError, zipfile.BadZipFile, ParseError, KeyError, ValueError) as e:
        b.issues.add("unreadable_xlsx", fname, str(e))
        return iter(())
    if header is None or [h.strip() for h in header[:4]] != ["人物1", "人物2", "关系", "文本"]:
        b.issues.add("xlsx_unexpected_header", fname, header)
        return iter(())

    def rows():
        for n, row in enumerate(it, 2):
            if len(row) < 4 or not all(x.strip() for x in row[:4]):
                b.issues.add("malformed_xlsx_row", f"{fname}:{n}", row)
                continue
            yield f"{fname}:{n}", row[0].strip(), row[1].strip(), row[2].strip(), row[3].strip()

    return _group_facts(rows(), b, None)


ADAPTERS = {
    "instructie": (adapt_instructie, None, {}),
    "iepile_sample": (adapt_iepile_sample, "duie", {}),
    "duie_spo": (adapt_spo_list, "duie", {}),
    "cmeie": (adapt_spo_list, "cmeie", {}),
    "deepke_csv": (adapt_deepke_csv, "duie", {}),
    "finre": (adapt_tsv, "finre", {"passive_prefix": "被"}),
    "sanwen": (adapt_tsv, "sanwen", {}),
    "people_tsv": (adapt_tsv, "people", {}),
    "people_xlsx": (adapt_people_xlsx, "people", {}),
}


JSON_LINE_FORMATS = ("instructie", "iepile_sample", "duie_spo", "cmeie")  # one JSON object per line


def _first_bytes(path: Path, n: int = 64) -> bytes:
    """The first ``n`` bytes of the file's content after any whitespace and UTF-8 BOM (gzip unpacked)."""
    got = b""
    with _open_bytes(path) as f:
        while piece := f.read(1 << 16):
            got = (got + piece).lstrip(b"\xef\xbb\xbf \t\r\n\f\v")
            if len(got) >= n:
                break
    return got[:n]


def check_source_file(path: str | Path, fmt: str) -> None:
    """A source file that cannot hold a record is a one-line error naming it and what to do: an empty
    file (or only blank lines), or — for the JSON-lines formats — one JSON array instead of one JSON
    object per line (whose every line would otherwise be counted as malformed, leaving no record)."""
    path = Path(path)
    try:
        head = _first_bytes(path)
    except (OSError, EOFError, zlib.error) as e:  # a cut or damaged gzip stream, an unreadable file
        raise MicroLMError(f"IE source {path} cannot be read ({e}): replace the file or drop it from "
                           f"ie_data.sources") from None
    if not head:
        raise MicroLMError(f"IE source {path} holds no records (the file is empty): give one JSON object per "
                           f"line ({fmt}), or drop the file from ie_data.sources" if fmt in JSON_LINE_FORMATS else
                           f"IE source {path} holds no records (the file is empty): fill it ({fmt}) or drop it "
                           f"from ie_data.sources")
    if fmt in JSON_LINE_FORMATS and head.startswith(b"["):
        raise MicroLMError(f"IE source {path} is one JSON array, not JSON lines: give one JSON object per line "
                           f"(`jq -c '.[]'` converts it) and point ie_data.sources at that file")


def standardize_file(path: str | Path, fmt: str, source: str, rmap: RelationMap, issues: Issues) -> Iterator[IERecord]:
    """The records of one file in format ``fmt`` (a key of ``ADAPTERS``), streamed (the CSV/TSV
    formats group rows by sentence, so they hold their file's facts until the end).  An empty file, or
    one JSON array where JSON lines are expected, is a ``MicroLMError`` (``check_source_file``)."""
    if fmt not in ADAPTERS:
        raise MicroLMError(f"unknown IE format {fmt!r} (known: {', '.join(ADAPTERS)})")
    check_source_file(path, fmt)
    fn, family, kw = ADAPTERS[fmt]
    return fn(path, _Builder(source, rmap, family or "", issues), **kw)
