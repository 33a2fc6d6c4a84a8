"""The captioned scenes the built-in model learns from, and the judge the semantic tests will use."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from edgediff.builtin.scenes import COLOURS, POSITIONS, SHAPES, Scene, judge, render, scenes
from edgediff.builtin.vocab import WORDS

SAMPLE = scenes(0, 300)


def test_scenes_are_deterministic_from_the_seed():
    again = scenes(0, 300)
    assert again == SAMPLE
    assert np.array_equal(np.asarray(render(again[17])), np.asarray(render(SAMPLE[17])))
    assert scenes(1, 300) != SAMPLE


def test_captions_use_the_tokenizer_vocabulary_and_cover_the_grammar():
    words = set(WORDS)
    for s in SAMPLE:
        assert set(s.caption().split()) <= words, s.caption()
    assert {s.shape for s in SAMPLE} == set(SHAPES)
    assert {s.position for s in SAMPLE} == set(POSITIONS)
    assert {s.colour for s in SAMPLE} == set(COLOURS)
    assert SAMPLE[0].caption() == "a small black square in the top left corner on a white background"
    assert Scene("circle", "red", "blue").caption() == "a red circle on a blue background"


def test_judge_accepts_every_true_picture():
    failed = [(s.caption(), judge(render(s), s).reasons) for s in SAMPLE if not judge(render(s), s).passed]
    assert failed == []


@pytest.mark.parametrize("change", ["colour", "background", "position"])
def test_judge_rejects_a_picture_that_contradicts_its_caption(change):
    tried = rejected = 0
    for s in SAMPLE:
        picture = render(s)
        spare = [c for c in COLOURS if c not in (s.colour, s.background)][0]
        if change == "colour":
            wrong = dataclasses.replace(s, colour=spare)
        elif change == "background":
            wrong = dataclasses.replace(s, background=spare, name_background=True)
        elif s.position in ("in the top left corner", "on the left"):
            wrong = dataclasses.replace(s, position="in the bottom right corner")
        else:
            continue
        tried += 1
        rejected += not judge(picture, wrong).passed
    assert tried >= 30 and rejected == tried


def test_judge_rejects_noise_and_empty_pictures():
    """What the random-weight model draws must not pass: that is the point of the oracle."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    empty = Image.new("RGB", (64, 64), COLOURS["blue"])
    s = Scene("circle", "red", "blue")
    assert not judge(noise, s).passed
    verdict = judge(empty, s)
    assert not verdict.passed and verdict.reasons[0].startswith("shape: red covers 0.0%")
