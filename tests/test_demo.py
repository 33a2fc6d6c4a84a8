"""`edgediff demo`, the README's main command: builds the built-in model once, then reuses it."""

from __future__ import annotations

import logging

from PIL import Image

from edgediff.cli import main


def test_demo_builds_once_generates_and_reports(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("EDGEDIFF_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="edgediff"):
        assert main(["demo", "--out", str(tmp_path / "pics"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    assert "backend: cpu" in out
    assert "timings:" in out and "unet" in out and "vae_decoder" in out
    png = tmp_path / "pics" / "demo.png"
    assert f"wrote {png.resolve()}" in out
    assert Image.open(png).text["parameters"].endswith("Model: builtin, Version: edgediff")
    assert "building the built-in model" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgediff"):
        assert main(["demo", "--out", str(tmp_path / "pics2"), "--steps", "3"]) == 0
    assert "building the built-in model" not in caplog.text  # cached
    assert (tmp_path / "pics2" / "demo.png").is_file()
