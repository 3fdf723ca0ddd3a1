"""GPT-2's reversible byte ↔ printable-unicode map, used by ``vocab.json``/``merges.txt`` and by the
Hugging Face ``ByteLevel`` pre-tokenizer/decoder (so our exported ``tokenizer.json`` is readable)."""

from __future__ import annotations

from functools import lru_cache

__all__ = ["byte_to_unicode", "bytes_to_text", "text_to_bytes"]


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Printable bytes map to themselves; the rest to code points 256, 257, … in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def bytes_to_text(b: bytes) -> str:
    t = byte_to_unicode()
    return "".join(t[x] for x in b)


def text_to_bytes(s: str) -> bytes:
    t = _unicode_to_byte()
    return bytes(t[c] for c in s)
