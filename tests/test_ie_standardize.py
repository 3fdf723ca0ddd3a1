"""Stage B1 step 01: the source adapters, the relation mapping and the counted bad input."""

import gzip
import json

import pytest

from microlm.errors import MicroLMError
from microlm.ie.standardize import Issues, RelationMap, record_id, standardize_file
from microlm.stages.ie_data import pipeline

RMAP = RelationMap()


def run(path, fmt, rmap=RMAP):
    issues = Issues()
    return list(standardize_file(path, fmt, "test", rmap, issues)), issues


def test_instructie_records_keep_their_topic_and_bad_lines_are_counted(tmp_path):
    good = {"id": "x", "cate": "人物", "text": "李白出生于碎叶城。",
            "relation": [{"head": "李白", "head_type": "人物", "relation": "出生地点", "tail": "碎叶城",
                          "tail_type": "地理地区"}]}
    lines = [json.dumps(good, ensure_ascii=False), "{not json", json.dumps({**good, "relation": "oops"}),
             json.dumps({**good, "cate": ""}), json.dumps({"format": "instructie_instruction", "record": {}}),
             json.dumps({"format": "instructie", "origin": "o", "record": good}, ensure_ascii=False), "[1, 2]"]
    p = tmp_path / "ie.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recs, iss = run(p, "instructie")
    assert len(recs) == 2 and recs[0].cate == "人物" and recs[0].relation == good["relation"]
    assert recs[0].id == record_id(good["text"]) == recs[1].id  # stable hash of the text, not the upstream id
    assert iss.counts == {"malformed_json": 2, "relation_not_a_list": 1, "missing_cate": 1,
                          "other_format:instructie_instruction": 1}
    assert iss.samples["malformed_json"][0]["at"] == "ie.jsonl:2"


def test_spo_list_and_cmeie_values_are_mapped_onto_the_schema(tmp_path):
    ske = {"text": "《静夜思》是李白创作的诗。", "spo_list": [
        {"predicate": "作者", "subject": "静夜思", "object": "李白", "subject_type": "图书作品", "object_type": "人物"},
        {"predicate": "朝代", "subject": "李白", "object": "唐朝", "subject_type": "历史人物", "object_type": "Text"}]}
    cme = {"text": "糖尿病@常见症状为多饮多尿。", "spo_list": [
        {"Combined": False, "predicate": "临床表现", "subject": "糖尿病", "subject_type": "疾病",
         "object": {"@value": "多饮多尿"}, "object_type": {"@value": "症状"}}]}
    (tmp_path / "ske.json").write_text(json.dumps(ske, ensure_ascii=False), encoding="utf-8")
    with gzip.open(tmp_path / "cme.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(cme, ensure_ascii=False) + "\n")
    recs, iss = run(tmp_path / "ske.json", "duie_spo")
    by = {r.cate: r for r in recs}
    assert by["作品"].relation == [{"head": "静夜思", "head_type": "图书作品", "relation": "作者", "tail": "李白",
                                   "tail_type": "人物"}]
    assert by["其他"].relation[0]["relation"] == "朝代" and iss.counts["relation_unmapped_kept"] == 1
    recs, _ = run(tmp_path / "cme.json.gz", "cmeie")
    assert recs[0].cate == "医学" and recs[0].relation[0]["relation"] == "症状"
    assert recs[0].relation[0]["tail"] == "多饮多尿" and recs[0].relation[0]["tail_type"] == "症状"
    # unmapped relations can be dropped instead of kept — still counted
    recs, iss = run(tmp_path / "ske.json", "duie_spo", RelationMap(unmapped_topic=None))
    assert [r.cate for r in recs] == ["作品"] and iss.counts["relation_dropped:朝代"] == 1


def test_finre_directions_collapse_unknown_is_dropped_and_gb18030_is_read(tmp_path):
    sent = "工行两位洋股东美国运通和安联集团做出承诺。"
    rows = [f"美国运通\t工行\t持股\t{sent}", f"工行\t美国运通\t被持股\t{sent}", "", f"工行\t安联集团\tunknown\t{sent}",
            "只有\t三列\t字段"]
    (tmp_path / "finre.txt").write_bytes(("\n".join(rows) + "\n").encode("gb18030"))
    recs, iss = run(tmp_path / "finre.txt", "finre")
    assert len(recs) == 1 and recs[0].text == sent
    assert recs[0].relation == [{"head": "美国运通", "head_type": "", "relation": "持股", "tail": "工行",
                                 "tail_type": ""}]
    assert iss.counts["direction_collapsed"] == 1 and iss.counts["relation_dropped:unknown"] == 1
    assert iss.counts["encoding_gb18030"] == 1 and iss.counts["malformed_tsv_row"] == 1


def test_deepke_csv_groups_rows_and_checks_offsets(tmp_path):
    rows = ["sentence,relation,head,head_offset,tail,tail_offset",
            "《娘家的故事》是张玲执导的电视剧,导演,娘家的故事,1,张玲,8",
            "《娘家的故事》是张玲执导的电视剧,上映时间,娘家的故事,1,2010年,3",
            "黄得功，安徽合肥人,出生地,黄得功,0,安徽合肥,9",
            "broken,row"]
    (tmp_path / "re.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    recs, iss = run(tmp_path / "re.csv", "deepke_csv")
    first = next(r for r in recs if r.text.startswith("《娘家"))
    assert [t["relation"] for t in first.relation] == ["导演", "出版时间"] and first.cate == "作品"
    assert iss.counts["tail_offset_mismatch"] == 2  # "2010年" is not in the sentence; 安徽合肥 is at 4, not 9
    assert iss.counts["malformed_csv_row"] == 1
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    recs, iss = run(tmp_path / "bad.csv", "deepke_csv")
    assert recs == [] and iss.counts["csv_unexpected_header"] == 1


def test_swap_entries_and_unknown_formats(tmp_path):
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"drop": [], "people": {"子女": ["人物", "父母", "swap"]}}, ensure_ascii=False),
                 encoding="utf-8")
    (tmp_path / "p.txt").write_text("李世民\t李治\t子女\t李治是李世民的儿子。\n", encoding="utf-8")
    recs, _ = run(tmp_path / "p.txt", "people_tsv", RelationMap(m))
    assert recs[0].relation[0]["head"] == "李治" and recs[0].relation[0]["tail"] == "李世民"
    with pytest.raises(MicroLMError, match="unknown IE format"):
        run(tmp_path / "p.txt", "brat")


def test_step_01_writes_records_and_stats_and_names_missing_sources(tmp_cfg, tmp_path):
    from microlm.ie.pipeline import run_step

    root = tmp_path / "data" / "ie" / "re_raw" / "thunlp_finre"
    root.mkdir(parents=True)
    (root / "train.txt").write_text("甲公司\t乙公司\t收购\t甲公司收购了乙公司。\n\n甲公司\t乙公司\tunknown\t甲乙无关。\n",
                                    encoding="utf-8")
    (root / "relation2id.txt").write_text("unknown 0\n", encoding="utf-8")
    cfg = tmp_cfg(**{"data.root": str(tmp_path / "data"), "ie_data.sources": {"ie/re_raw/thunlp_finre/[tv]*.txt": "finre"},
                     "ie_data.embedded": False})
    stats = run_step(pipeline(cfg), 1, cfg.run_path / "ie_data")
    lines = (cfg.run_path / "ie_data" / "01_standardized.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["text"] for x in lines] == ["甲公司收购了乙公司。"]
    saved = json.loads((cfg.run_path / "ie_data" / "01_standardize_stats.json").read_text(encoding="utf-8"))
    assert saved["records"] == stats["records"] == 1 and saved["by_source"] == {"thunlp_finre": 1}
    assert saved["issues"]["counts"] == {"relation_unmapped_kept": 1, "relation_dropped:unknown": 1,
                                         "no_usable_triple": 1}
    assert saved["files"][0]["file"] == "train.txt"  # relation2id.txt is not a data file
    bad = tmp_cfg(**{"data.root": str(tmp_path / "data"), "ie_data.sources": {"ie/nothing/*.json": "finre"}})
    with pytest.raises(MicroLMError, match="matches no file"):
        run_step(pipeline(bad), 1, bad.run_path / "ie_data")
    with pytest.raises(MicroLMError, match=r"unknown format\(s\) \['brat'\]"):  # refused when the config loads
        tmp_cfg(**{"data.root": str(tmp_path / "data"), "ie_data.sources": {"ie/re_raw/*/*.txt": "brat"}})
    with pytest.raises(MicroLMError, match="steps are 1–6"):
        run_step(pipeline(cfg), 7, cfg.run_path / "ie_data")


def _xlsx(path, rows, inline_row=None):
    """A minimal .xlsx (shared strings; one row with an inline string and a numeric cell), gzipped."""
    import io
    import zipfile
    from xml.sax.saxutils import escape

    strings = sorted({c for r in rows for c in r if c})
    idx = {s: i for i, s in enumerate(strings)}
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    sst = f'<sst {ns}>' + "".join(f"<si><t>{escape(s)}</t></si>" for s in strings) + "</sst>"
    xml_rows = []
    for n, r in enumerate(rows, 1):
        cells = "".join(f'<c r="{"ABCD"[i]}{n}" t="s"><v>{idx[c]}</v></c>' for i, c in enumerate(r) if c)
        xml_rows.append(f'<row r="{n}">{cells}</row>')
    if inline_row:
        n = len(rows) + 1
        a, b_, rel, text = inline_row
        xml_rows.append(f'<row r="{n}"><c r="A{n}" t="inlineStr"><is><t>{a}</t></is></c><c r="B{n}" t="inlineStr">'
                        f'<is><t>{b_}</t></is></c><c r="C{n}" t="inlineStr"><is><t>{rel}</t></is></c>'
                        f'<c r="D{n}" t="inlineStr"><is><r><t>{text[:3]}</t></r><r><t>{text[3:]}</t></r></is></c></row>')
    sheet = f'<worksheet {ns}><sheetData>{"".join(xml_rows)}</sheetData></worksheet>'
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("xl/sharedStrings.xml", sst)
        z.writestr("xl/worksheets/sheet1.xml", sheet)
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def test_people_xlsx_reads_the_unmasked_table_and_counts_bad_rows(tmp_path):
    from microlm.ie.standardize import read_xlsx_rows

    rows = [["人物1", "人物2", "关系", "文本"],
            ["韩庚", "卢靖姗", "夫妻", "韩庚和卢靖姗结婚了。"],
            ["韩庚", "卢靖姗", "夫妻", "韩庚和卢靖姗结婚了。"],  # the same fact twice
            ["曹操", "刘备", "unknown", "曹操与刘备煮酒论英雄。"],
            ["张三", "", "师生", "张三是老师。"],  # a missing cell
            ["周杰伦", "方文山", "合作", "周杰伦和方文山合作了很多歌。"]]
    p = _xlsx(tmp_path / "t.xlsx.gz", rows, inline_row=("梁思成", "林徽因", "夫妻", "梁思成与林徽因是夫妻。"))
    got = list(read_xlsx_rows(p))
    assert got[0] == rows[0] and got[4] == ["张三", "", "师生", "张三是老师。"]
    assert got[-1] == ["梁思成", "林徽因", "夫妻", "梁思成与林徽因是夫妻。"]  # inline rich-text runs joined
    recs, iss = run(p, "people_xlsx")
    assert [r.text for r in recs] == ["韩庚和卢靖姗结婚了。", "周杰伦和方文山合作了很多歌。", "梁思成与林徽因是夫妻。"]
    assert recs[0].cate == "人物" and [t["relation"] for t in recs[0].relation] == ["配偶"]
    assert recs[1].cate == "其他" and recs[1].relation[0]["relation"] == "合作"  # kept under the extra topic
    assert iss.counts["duplicate_triple"] == 1 and iss.counts["malformed_xlsx_row"] == 1
    assert iss.counts["relation_dropped:unknown"] == 1
    bad = _xlsx(tmp_path / "b.xlsx.gz", [["a", "b", "c", "d"], ["1", "2", "3", "4"]])
    recs, iss = run(bad, "people_xlsx")
    assert recs == [] and iss.counts == {"xlsx_unexpected_header": 1}
    (tmp_path / "z.xlsx").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    with pytest.raises(MicroLMError, match="no worksheet"):
        list(read_xlsx_rows(tmp_path / "z.xlsx"))
    (tmp_path / "n.xlsx").write_bytes(b"not a zip at all")
    for f in ("z.xlsx", "n.xlsx"):  # the pipeline counts an unreadable file, it does not stop
        recs, iss = run(tmp_path / f, "people_xlsx")
        assert recs == [] and list(iss.counts) == ["unreadable_xlsx"]
