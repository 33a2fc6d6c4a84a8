"""The CLIP BPE vocabulary that SD 1.x and 2.x use, written out as a Hugging Face `tokenizer/` folder.

Single-file checkpoints carry no tokenizer, and both SD generations tokenize with OpenAI CLIP's 49,408
token vocabulary. We ship it once, as CLIP and open_clip do (`data/bpe_simple_vocab_16e6.txt.gz`: the
merge list, see data/README.md), and build `vocab.json` and `merges.txt` from it exactly as CLIP's
`simple_tokenizer.py` builds its tables, so the folder equals openai/clip-vit-large-patch14's.
No torch and no network: this runs wherever edgediff runs.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from .errors import EdgediffError
from .tokenizer import CLIP_CONTEXT

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's simple_tokenizer keeps the first 49152 - 256 - 2 merges: with the 256 byte tokens, their 256
# `</w>` forms and the two special tokens the vocabulary comes to 49408 (= 256 * 2 + 48894 + 2).
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
# Padding: SD 1.x (and openai/clip-vit-large-patch14) pads with the end token; stabilityai's SD 2.x
# repositories say "!" (id 0), which is what their text encoder was trained with.
PAD_SD1 = EOS
PAD_SD2 = "!"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters: printable Latin-1 bytes
    stand for themselves, the rest are moved to code points from 256 up. The order matters, as it gives
    the first 256 token ids: the printable bytes first ("!" is id 0), then the others."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clip_vocab(bpe_path: Path = BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) as openai/CLIP's simple_tokenizer.py constructs them."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is the "#version" header
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # a duplicate token would silently shift every later id
        raise EdgediffError(f"{bpe_path} gives {len(vocab)} distinct tokens instead of {VOCAB_SIZE}; "
                            "the file is damaged: reinstall edgediff")
    return vocab, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = PAD_SD1) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, the files of
    openai/clip-vit-large-patch14's tokenizer (SD 1.x); pass `pad_token=PAD_SD2` for SD 2.x."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        **special,
        "model_max_length": CLIP_CONTEXT,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


def add_vocab_files(folder: str | Path) -> None:
    """Give a tokenizer folder that has only `tokenizer.json` (as transformers 5 saves one) the
    `vocab.json` and `merges.txt` that transformers 4's CLIPTokenizer, the class model_index.json names,
    reads: optimum-onnx (transformers 4.57) cannot load an exported folder without them."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return
    bpe = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]  # tokenizers writes either
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
