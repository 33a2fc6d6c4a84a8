"""CLIP's byte-level BPE tokenizer, read from a model folder's `tokenizer/` without transformers.

The `tokenizers` package (the Rust core of Hugging Face's fast tokenizers, about 3 MB) does the BPE; we
only assemble CLIP's normalizer and pre-tokenizer around the folder's `vocab.json` and `merges.txt`,
because transformers itself would bring torch-sized dependencies into the run time. A `tokenizer.json`,
where the folder has one, is used as it is. tests/test_tokenizer.py checks the ids against
transformers' `CLIPTokenizer`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import EdgediffError, first_line

log = logging.getLogger("edgediff")

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py): contractions, runs of letters, single
# digits, runs of other symbols. Special tokens are matched whole so that a prompt may spell them.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP's context: start token, 75 prompt tokens, end token. Every CLIP text tower SD uses (SD 1.x, 2.x and
# SDXL's two) has this many positions; the tokenizer pads every prompt to it.
CLIP_CONTEXT = 77


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # (batch, max_length) int64
    dropped: tuple[int, ...]  # per prompt, how many tokens truncation removed


class ClipTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos: str, eos: str, pad: str, max_length: int = CLIP_CONTEXT,
                 words: dict[int, list[int]] | None = None):
        self._tok = tokenizer
        self.max_length = max_length
        self._specials = (bos, eos, pad)
        # added words (textual-inversion triggers): the id the tokenizer gives each -> the ids it stands for
        self._words = dict(words or {})
        ids = [tokenizer.token_to_id(t) for t in (bos, eos, pad)]
        if None in ids:
            missing = [t for t, i in zip((bos, eos, pad), ids) if i is None]
            raise EdgediffError(f"tokenizer vocabulary lacks the special token(s) {missing}")
        self.bos_id, self.eos_id, self.pad_id = ids

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ClipTokenizer":
        folder = Path(folder)
        cfg = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")

        def token(name: str, default: str) -> str:
            value = cfg.get(name) or special.get(name) or default
            return value["content"] if isinstance(value, dict) else str(value)

        bos = token("bos_token", "<|startoftext|>")
        eos = token("eos_token", "<|endoftext|>")
        # SD 1.x pads with the end token; SD 2.x's tokenizer_config says "!" (id 0). Each model was
        # trained with its own padding, so the folder decides.
        pad = token("pad_token", eos)
        unk = token("unk_token", eos)
        max_length = cfg.get("model_max_length", CLIP_CONTEXT)
        if isinstance(max_length, bool) or not isinstance(max_length, (int, float)) or max_length < 3:
            raise EdgediffError(f"{folder / 'tokenizer_config.json'}: model_max_length is {max_length!r}, not a "
                                f"token count (CLIP: {CLIP_CONTEXT}); fix the file or export the model again")
        max_length = int(max_length)
        if max_length > 10_000:  # transformers writes a huge sentinel when no length was set
            max_length = CLIP_CONTEXT

        if (folder / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the Rust core raises a plain Exception for any parse error
                raise EdgediffError(f"{folder / 'tokenizer.json'} is not a tokenizer the tokenizers library can "
                                    f"read ({first_line(e)}); export the model again") from None
            tok.no_padding()
            tok.no_truncation()
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = build_clip_bpe(folder / "vocab.json", folder / "merges.txt", unk)
            # As transformers does: the special tokens are matched whole even inside a prompt.
            tok.add_special_tokens(list(dict.fromkeys([bos, eos, unk])))
        else:
            raise EdgediffError(f"{folder}: no tokenizer found (need tokenizer.json, or vocab.json and "
                                "merges.txt); export the model again with `edgediff export`")
        return cls(tok, bos, eos, pad, max_length)

    def without_words(self) -> "ClipTokenizer":
        """The tokenizer as the model folder gave it, with no added words."""
        if not self._words:
            return self
        return self._original

    def with_words(self, words: dict[str, list[int]]) -> "ClipTokenizer":
        """A copy that reads each word (a textual-inversion trigger) as the given token ids, wherever it
        appears in a prompt, as the tokens diffusers' load_textual_inversion adds (matched on the
        lowercased text: "MyStyle" and "mystyle" are one word)."""
        from tokenizers import AddedToken

        tok = Tokenizer.from_str(self._tok.to_str())
        tok.add_tokens([AddedToken(w.lower(), normalized=True) for w in words])
        expand = {tok.token_to_id(w.lower()): list(ids) for w, ids in words.items()}
        out = ClipTokenizer(tok, *self._specials, self.max_length, expand)
        out._original = self.without_words()
        return out

    def encode(self, prompts: list[str]) -> Encoded:
        """Ids padded to `max_length`: [start] prompt tokens [end] [pad]..., truncated like diffusers."""
        room = self.max_length - 2
        rows, dropped = [], []
        for enc in self._tok.encode_batch(prompts, add_special_tokens=False):
            body = enc.ids
            if self._words:
                body = [i for token in body for i in self._words.get(token, (token,))]
            dropped.append(max(len(body) - room, 0))
            row = [self.bos_id, *body[:room], self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return Encoded(np.asarray(rows, dtype=np.int64), tuple(dropped))


def build_clip_bpe(vocab_path: Path, merges_path: Path, unk: str) -> Tokenizer:
    """CLIP's tokenizer from the two files every CLIP checkpoint ships (what transformers' CLIPTokenizer
    assembles too): NFC, whitespace folded, lowercase; CLIP's split; byte-level BPE with `</w>` ends."""
    vocab = _read_json(vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    except Exception as e:  # unreadable text, or the Rust core's refusal of the vocabulary or a merge
        raise EdgediffError(f"{vocab_path.parent}: vocab.json and merges.txt do not make a BPE tokenizer "
                            f"({first_line(e)}); export the model again") from None
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgediffError(f"{path} cannot be read: {first_line(e)}; export the model again") from None
    if not isinstance(data, dict):
        raise EdgediffError(f"{path} is not a JSON object; export the model again")
    return data
