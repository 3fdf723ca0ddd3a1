"""Repetition of generated text (MiniMind users' top complaint), measured on characters; and how
far two greedy decodes of the same prompts agree (bf16 weights against fp32).

- ``distinct_n``: distinct n-grams / all n-grams over a set of answers (higher = more varied).
- ``repeated_ngram_rate``: in one answer, the share of n-grams that already occurred earlier in
  that answer (0 = never repeats itself; "的国家的国家的国家" is close to 1).
Whitespace is dropped first, so both work for Chinese and for spaced text alike.
"""

from __future__ import annotations

__all__ = ["distinct_n", "repeated_ngram_rate", "repetition_report", "greedy_agreement"]


def _chars(text: str) -> str:
    return "".join(text.split())


def _ngrams(text: str, n: int) -> list[str]:
    s = _chars(text)
    return [s[i:i + n] for i in range(len(s) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    grams = _ngrams(text, n)
    if not grams:
        return 0.0
    seen: set[str] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def repetition_report(texts: list[str]) -> dict:
    """Distinct-1/2 over all answers, mean repeated 4-gram rate, mean answer length (characters)."""
    rates = [repeated_ngram_rate(t, 4) for t in texts]
    return {"answers": len(texts), "distinct_1": round(distinct_n(texts, 1), 4),
            "distinct_2": round(distinct_n(texts, 2), 4),
            "repeated_4gram_rate": round(sum(rates) / max(len(rates), 1), 4),
            "mean_chars": round(sum(len(_chars(t)) for t in texts) / max(len(texts), 1), 1)}


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How far ``other``'s greedy ids follow ``reference``'s, prompt by prompt.

    ``prefix_share``: tokens before the first difference ÷ reference tokens (after a difference the
    two condition on different text, so later tokens are not comparable); ``same_position_share``:
    equal ids at equal positions ÷ reference tokens; ``identical``: share of prompts whose whole
    answers match."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference answers but {len(other)} others")
    total = prefix = same = identical = 0
    for a, b in zip(reference, other, strict=True):
        total += len(a)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
        same += sum(x == y for x, y in zip(a, b, strict=False))
        identical += a == b
    return {"prompts": len(reference), "tokens": total, "prefix_share": round(prefix / max(total, 1), 4),
            "same_position_share": round(same / max(total, 1), 4),
            "identical": round(identical / max(len(reference), 1), 4)}
