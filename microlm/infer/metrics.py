"""Repetition of generated text (MiniMind users' top complaint), measured on characters.

- ``distinct_n``: distinct n-grams / all n-grams over a set of answers (higher = more varied).
- ``repeated_ngram_rate``: in one answer, the share of n-grams that already occurred earlier in
  that answer (0 = never repeats itself; "的国家的国家的国家" is close to 1).
Whitespace is dropped first, so both work for Chinese and for spaced text alike.
"""

from __future__ import annotations

__all__ = ["distinct_n", "repeated_ngram_rate", "repetition_report"]


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
