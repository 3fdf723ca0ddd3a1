"""Cleaning and quality rules for Chinese pretraining text — pure functions, one per rule.

``normalize`` rewrites text (it never drops); ``quality_reason`` decides whether a normalized
document is kept and, if not, names the rule that removed it.  Every rule is a small function so the
notebook can show it on real examples and the tests can pin it on bad inputs.
"""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass

import regex

# Control tokens the tokenizer stage reserves.  Raw text must never carry them (a scraped
# "<|im_start|>" would otherwise become a real control token): they are replaced by a newline.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_SPECIAL_RE = regex.compile("|".join(regex.escape(t) for t in SPECIAL_TOKENS))

# NFKC "where safe for Chinese": fullwidth letters/digits/space become ASCII, halfwidth katakana and
# compatibility forms are folded, but the fullwidth punctuation Chinese text is written with
# (，。！？：；（）…) is kept as it is.  NFKC would turn "，" into "," and "…" into "...".
_PROTECTED_PUNCT = (
    "\uff01-\uff0f"  # ！＂＃＄％＆＇（）＊＋，－．／
    "\uff1a-\uff20"  # ：；＜＝＞？＠
    "\uff3b-\uff40"  # ［＼］＾＿｀
    "\uff5b-\uff65"  # ｛｜｝～｟｠｡｢｣､･
    "\u2026\u2025"  # … ‥
)
_NFKC_SPLIT = regex.compile(f"([{_PROTECTED_PUNCT}]+)")

# Cc controls except \t \n, plus Cf format characters (zero-width space/joiners, BOM, soft hyphen,
# bidi marks...), plus the Unicode line/paragraph separators and the replacement character.
_CONTROL = regex.compile(r"[\p{Cc}\p{Cf}\u2028\u2029\ufffd--[\t\n]]", flags=regex.V1)
_HSPACE = regex.compile(r"[^\S\n]+")  # any whitespace run except newlines
_SPACE_AROUND_NL = regex.compile(r" *\n *")
_MANY_NL = regex.compile(r"\n{3,}")
_HAN = r"\p{Han}"
_CJK_PUNCT = r"\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2026"
# a space with a Chinese character or fullwidth punctuation on both sides is layout, not content
_SPACE_IN_CJK = regex.compile(rf"(?<=[{_HAN}{_CJK_PUNCT}]) (?=[{_HAN}{_CJK_PUNCT}])")

# markup remnants left by scrapers and converters
_HTML_TAG = regex.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]{0,300})?/?>")
_HTML_COMMENT = regex.compile(r"<!--.*?-->", flags=regex.S)
_HTML_ENTITY = regex.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[A-Za-z]{2,8});")
_MD_IMAGE = regex.compile(r"!\[([^\]\n]{0,200})\]\([^)\n]{0,500}\)")
_MD_LINK = regex.compile(r"\[([^\]\n]{1,200})\]\((?:https?://|/|\.)[^)\n]{0,500}\)")
_URL = regex.compile(r"(?:https?://|www\.)[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+")
_MD_HEADING = regex.compile(r"(?m)^#{1,6}[ \t]+")
_MD_EMPH = regex.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_MD_RULE = regex.compile(r"(?m)^[ \t]*(?:[-*_=][ \t]*){3,}$")
_HAN_RE = regex.compile(_HAN)
_NON_SPACE = regex.compile(r"\S")


def remove_special_tokens(text: str) -> str:
    return _SPECIAL_RE.sub("\n", text)


def nfkc_safe(text: str) -> str:
    """NFKC everywhere except on the fullwidth punctuation Chinese uses."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    parts = _NFKC_SPLIT.split(text)
    parts[0::2] = [unicodedata.normalize("NFKC", p) for p in parts[0::2]]
    return "".join(parts)


def remove_controls(text: str) -> str:
    """Drop control and zero-width characters (keeping \\n and \\t); \\r\\n and \\r become \\n."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def strip_markup(text: str) -> str:
    """Remove HTML tags/comments/entities, markdown image/link/heading/emphasis syntax and bare URLs."""
    if "<" in text:
        text = _HTML_COMMENT.sub("", text)
        text = _HTML_TAG.sub("", text)
    if "&" in text:
        text = _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    if "](" in text:
        text = _MD_IMAGE.sub(r"\1", text)
        text = _MD_LINK.sub(r"\1", text)
    if "http" in text or "www." in text:
        text = _URL.sub("", text)
    if "#" in text:
        text = _MD_HEADING.sub("", text)
    if "**" in text or "__" in text:
        text = _MD_EMPH.sub(r"\2", text)
    if "--" in text or "**" in text or "==" in text or "__" in text:
        text = _MD_RULE.sub("", text)
    return text


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs to one space, drop spaces between Chinese characters, keep at most
    one blank line between paragraphs, strip the ends."""
    text = _HSPACE.sub(" ", text)
    text = _SPACE_AROUND_NL.sub("\n", text)
    text = _MANY_NL.sub("\n\n", text)
    text = _SPACE_IN_CJK.sub("", text)
    return text.strip()


def normalize(text: str, *, markup: bool = True) -> str:
    """The full rewrite, in order: special tokens → controls → NFKC-safe → markup → whitespace."""
    text = remove_special_tokens(text)
    text = remove_controls(text)
    text = nfkc_safe(text)
    if markup:
        text = strip_markup(text)
    return normalize_whitespace(text)


def cjk_ratio(text: str) -> float:
    """Share of Han characters among the non-space characters."""
    non_space = len(_NON_SPACE.findall(text)) if " " in text or "\n" in text else len(text)
    if non_space == 0:
        return 0.0
    return len(_HAN_RE.findall(text)) / non_space


def dup_line_ratio(text: str) -> float:
    """Gopher's duplicate-line rule: share of characters in lines that repeat an earlier line."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) < 2:
        return 0.0
    seen: set[str] = set()
    dup_chars = 0
    total = 0
    for ln in lines:
        total += len(ln)
        if ln in seen:
            dup_chars += len(ln)
        else:
            seen.add(ln)
    return dup_chars / total if total else 0.0


def dup_ngram_ratio(text: str, n: int = 5) -> float:
    """Share of character n-grams that repeat an earlier n-gram of the same document
    (RefinedWeb/Gopher-style repetition, on characters because Chinese has no spaces)."""
    total = len(text) - n + 1
    if total <= 1:
        return 0.0
    grams = {text[i : i + n] for i in range(total)}
    return 1.0 - len(grams) / total


@dataclass(frozen=True)
class QualityRules:
    min_chars: int = 20
    max_chars: int = 20000
    min_cjk_ratio: float = 0.3
    max_dup_line_ratio: float = 0.3
    max_dup_ngram_ratio: float = 0.5
    ngram: int = 5


def quality_reason(text: str, rules: QualityRules) -> str | None:
    """``None`` if the normalized document is kept, else the name of the first rule it fails."""
    n = len(text)
    if n == 0:
        return "empty"
    if n < rules.min_chars:
        return "too_short"
    if n > rules.max_chars:
        return "too_long"
    if cjk_ratio(text) < rules.min_cjk_ratio:
        return "low_cjk_ratio"
    if "\n" in text and dup_line_ratio(text) > rules.max_dup_line_ratio:
        return "repetitive_lines"
    if dup_ngram_ratio(text, rules.ngram) > rules.max_dup_ngram_ratio:
        return "repetitive_ngrams"
    return None


def dedup_key(text: str) -> str:
    """What exact dedup compares: the normalized text without any whitespace, case-folded."""
    return "".join(text.split()).casefold()
