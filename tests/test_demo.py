"""`edgediff demo`, the README's main command: exports the built-in model once, then reuses it."""

from __future__ import annotations

import logging

import hosts
import pytest
from PIL import Image

from edgediff.cli import DEMO_CAPTIONS, main

# Not marked slow (20 s): CI runs it, as it guards the README's demo command on a fresh machine


@pytest.fixture(autouse=True)
def cpu_only_host(monkeypatch):
    """The demo on a PC with onnxruntime's CPU build, whatever runs the test: `auto` picks the CPU, and the
    report names the accelerators it did not find."""
    hosts.simulate(monkeypatch)


def test_demo_exports_once_generates_and_reports(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="edgediff"):
        assert main(["demo", "--out", str(tmp_path / "pics")]) == 0
    out = capsys.readouterr().out
    assert "model: built-in" in out
    assert "backend: cpu" in out and "plan: resident plan on cpu" in out
    assert "others: cuda: onnxruntime-gpu is not installed" in out
    assert "ms per image on average" in out
    sheet = tmp_path / "pics" / "contact-sheet.png"
    assert f"wrote {len(DEMO_CAPTIONS)} PNGs and {sheet.resolve()}" in out
    assert Image.open(sheet).size == (3 * 256, 2 * (256 + 34))
    first = Image.open(tmp_path / "pics" / "demo-1.png")
    assert first.text["parameters"].startswith(DEMO_CAPTIONS[0] + "\nSteps: 20")
    assert "Model: builtin" in first.text["parameters"]
    assert "exporting the built-in model" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgediff"):
        assert main(["demo", "--out", str(tmp_path / "pics2"), "--steps", "3"]) == 0
    assert "exporting the built-in model" not in caplog.text  # cached
    assert (tmp_path / "pics2" / "demo-6.png").is_file()


def test_builtin_is_a_model_name_everywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle on a blue background", "--model", "builtin", "--steps", "4",
                 "--seed", "1", "--out", str(out)]) == 0
    from edgediff import Pipeline

    again = Pipeline.from_pretrained("builtin")("a red circle on a blue background", num_inference_steps=4,
                                                seed=1).images[0]
    assert list(Image.open(out).getdata()) == list(again.getdata())
