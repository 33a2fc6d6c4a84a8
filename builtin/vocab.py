"""A small CLIP-format BPE vocabulary, written by code, for the built-in and test models.

Real CLIP vocabularies have 49,408 entries and come from the network; ours has CLIP's byte alphabet
(so any prompt tokenizes), whole-word tokens for the words below, and CLIP's special tokens, in the same
files (`vocab.json`, `merges.txt`, `tokenizer_config.json`) that transformers and edgediff both read.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.tokenizer import CLIP_CONTEXT

WORDS = """a an the of on in and with at to photo picture painting drawing of small large big tiny
red green blue yellow orange purple pink white black gray brown cyan magenta
circle square triangle star cross ring heart diamond shape background
top bottom left right center corner middle upper lower
cat dog house tree sky sea mountain city portrait landscape astronaut horse riding
high quality detailed blurry bad ugly""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters: printable Latin-1 bytes
    stand for themselves, the rest are moved to code points from 256 up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_vocab(words: list[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: each word is merged left to right into one `</w>`-terminated token."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    seen_merges = set()
    for word in dict.fromkeys(words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in seen_merges:
                seen_merges.add((left, right))
                merges.append((left, right))
                tokens.append(left + right)
            left = left + right
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>", words: list[str] = WORDS) -> int:
    """Write a CLIP tokenizer folder; returns the vocabulary size. SD 2.x models pad with "!"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_CONTEXT,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return len(vocab)
