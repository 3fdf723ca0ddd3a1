"""Hugging Face export: ``tokenizer.json`` + ``tokenizer_config.json`` giving our ids exactly.

The pre-tokenizer is ``Split(our regex, Isolated)`` then ``ByteLevel(use_regex=False)``, the model a
plain BPE with ``ignore_merges=false``, special tokens as ``added_tokens`` (split out before
pre-tokenisation, leftmost-longest, as ours).  Each added token is ``special`` (skipped by
``decode(skip_special_tokens=True)``), ``normalized: false`` (matched in the raw text) and has
``lstrip``/``rstrip``/``single_word`` off, so no whitespace around it is swallowed and it matches
inside words too.  ``tokenizers.Tokenizer.from_file(...).encode(text, add_special_tokens=False)`` and
``transformers.AutoTokenizer`` (class ``PreTrainedTokenizerFast``) then give ``Tokenizer.encode(text)``
on every text, and ``AutoTokenizer(..., split_special_tokens=True)`` gives ``encode_ordinary``'s ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from microlm.io import write_json
from microlm.tokenizer.bytes_unicode import bytes_to_text
from microlm.tokenizer.chat_template import CHAT_TEMPLATE

if TYPE_CHECKING:  # annotations only: tokenizer.py imports this module
    from microlm.tokenizer.tokenizer import Tokenizer

__all__ = ["hf_tokenizer_json", "hf_tokenizer_config", "write_hf_tokenizer"]


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    specials = tok.special_ids
    # special tokens sit in the model vocab too, under their own text: HF keeps the ``added_tokens``
    # ids only for tokens the model already knows (others would be renumbered after the vocab)
    names = {i: s for s, i in specials.items()}
    vocab = {names.get(i) or bytes_to_text(b): i for i, b in sorted(tok.vocab.items())}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(specials.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": [[bytes_to_text(a), bytes_to_text(b)] for a, b in tok.merges],
        },
    }


def hf_tokenizer_config(tok: Tokenizer) -> dict:
    eos = "<|im_end|>" if "<|im_end|>" in tok.special_ids else tok.special_tokens[0]
    pad = "<|endoftext|>" if "<|endoftext|>" in tok.special_ids else eos
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "bos_token": None,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": None,
        "additional_special_tokens": [s for s in tok.special_tokens if s not in (eos, pad)],
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for s, i in sorted(tok.special_ids.items(), key=lambda kv: kv[1])
        },
        "chat_template": CHAT_TEMPLATE,
    }


def write_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    write_json(out / "tokenizer.json", hf_tokenizer_json(tok))
    write_json(out / "tokenizer_config.json", hf_tokenizer_config(tok))
    write_json(out / "special_tokens_map.json", {
        k: v for k, v in hf_tokenizer_config(tok).items()
        if k in ("eos_token", "pad_token", "additional_special_tokens") and v})
    return out
