"""edgediff's CLIP tokenizer (tokenizers package, no transformers) against transformers' CLIPTokenizer."""

import logging

import pytest
from transformers import CLIPTokenizer

from edgediff.builtin.vocab import write_tokenizer
from edgediff.engine.tokenizer import ClipTokenizer

PROMPTS = [
    "a red circle on a blue background",
    "An Astronaut   RIDING a horse!!, high-quality; 4k",
    "héllo wörld 123 <|endoftext|> xyz",
    "",
    "it's a cat's toy, isn't it",
    "red " * 100,  # longer than CLIP's 75-token window
]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SD 1.x pads with the end token, SD 2.x with "!"
def test_ids_match_transformers(tmp_path, pad):
    write_tokenizer(tmp_path, pad_token=pad)
    ours = ClipTokenizer.from_folder(tmp_path)
    ref = CLIPTokenizer.from_pretrained(tmp_path)
    got = ours.encode(PROMPTS)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert got.ids.shape == (len(PROMPTS), 77)
    assert got.ids.tolist() == want
    # a tokenizer.json written by transformers is read as it is, with the same result
    saved = tmp_path / "saved"
    ref.save_pretrained(saved)
    assert ClipTokenizer.from_folder(saved).encode(PROMPTS).ids.tolist() == want


def test_truncation_counts_dropped_tokens(tmp_path):
    write_tokenizer(tmp_path)
    enc = ClipTokenizer.from_folder(tmp_path).encode(["red " * 100, "red"])
    assert enc.dropped == (25, 0)  # "red" is one token: 100 tokens, 75 kept


def test_long_prompt_warns_how_many_tokens_were_dropped(tiny, caplog):
    from edgediff import Pipeline

    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")
    with caplog.at_level(logging.WARNING, logger="edgediff"):
        pipe("red " * 80, num_inference_steps=1, seed=1)
    assert any("the last 5 of" in r.getMessage() for r in caplog.records), caplog.text


def test_missing_tokenizer_files_is_one_clear_error(tmp_path):
    from edgediff import EdgediffError

    with pytest.raises(EdgediffError, match="no tokenizer found"):
        ClipTokenizer.from_folder(tmp_path)
