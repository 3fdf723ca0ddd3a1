import pytest

from microlm.data import clean
from microlm.data.clean import QualityRules, quality_reason

RULES = QualityRules(min_chars=10, max_chars=200, min_cjk_ratio=0.3, max_dup_line_ratio=0.3,
                     max_dup_ngram_ratio=0.5)
GOOD = "机器学习是人工智能的一个分支，它研究如何让计算机从数据中学习。"


def test_nfkc_folds_fullwidth_alnum_but_keeps_chinese_punctuation():
    assert clean.nfkc_safe("ＡＢＣ１２３") == "ABC123"
    for p in "，。！？：；（）【】《》“”、…～":
        assert clean.nfkc_safe(f"你{p}好") == f"你{p}好", p
    assert clean.nfkc_safe("ｶﾀｶﾅ") == "カタカナ"  # halfwidth katakana folded
    assert clean.nfkc_safe("\u3000") == " "


def test_controls_and_zero_width_removed_newlines_kept():
    s = "你\u200b好\ufeff\u00ad世\x00界\x07\r\n再见\u2028\t!"
    assert clean.remove_controls(s) == "你好世界\n再见\t!"


def test_markup_remnants():
    assert clean.strip_markup("<p class='x'>你好</p><!-- c -->") == "你好"
    assert clean.strip_markup("A&amp;B&nbsp;&#20320;") == "A&B\xa0你"
    assert clean.strip_markup("见[文档](https://a.b/c)和![图](x.png)") == "见文档和图"
    assert clean.strip_markup("访问 https://example.com/a?b=1 或 www.x.cn") == "访问  或 "
    assert clean.strip_markup("# 标题\n**重点**") == "标题\n重点"
    assert clean.strip_markup("1 < 2 且 3 > 2") == "1 < 2 且 3 > 2"  # not a tag


def test_special_tokens_in_raw_text_are_removed():
    assert "<|im_start|>" not in clean.normalize("<|im_start|>user\n你好<|im_end|><|endoftext|>")


def test_whitespace():
    assert clean.normalize_whitespace("  中 文  文\t本 \n\n\n\n下一段  ") == "中文文本\n\n下一段"
    assert clean.normalize_whitespace("hello   world") == "hello world"  # latin words keep one space


def test_normalize_is_idempotent():
    s = "＜b＞Ｈｉ＜/b＞ 中 文\u200b，测试！  https://x.y\n\n\n\n# 标题"
    once = clean.normalize(s)
    assert clean.normalize(once) == once


def test_ratios():
    assert clean.cjk_ratio("中文ab") == 0.5
    assert clean.cjk_ratio("   ") == 0.0
    assert clean.dup_line_ratio("甲乙\n甲乙\n丙丁") == pytest.approx(2 / 6)
    assert clean.dup_line_ratio("只有一行") == 0.0
    assert clean.dup_ngram_ratio("哈" * 50) > 0.9
    assert clean.dup_ngram_ratio(GOOD) < 0.1


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("太短了", "too_short"),
    ("长" * 201, "too_long"),
    ("This is an English sentence without Chinese.", "low_cjk_ratio"),
    ("同一行重复出现\n同一行重复出现\n同一行重复出现\n另一行", "repetitive_lines"),
    ("宝贝很好下次再来" * 10, "repetitive_ngrams"),
    (GOOD, None),
])
def test_quality_reasons(text, reason):
    assert quality_reason(text, RULES) == reason


def test_dedup_key_ignores_whitespace_and_case():
    assert clean.dedup_key("Hello 世界\n") == clean.dedup_key("hello世界")
