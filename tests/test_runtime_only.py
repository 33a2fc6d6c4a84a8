"""The run time needs no torch: a new virtual environment with only edgediff's run-time dependencies
installs it from this checkout and generates an image from an exported model folder.

This also proves the package layout: installed with `pip install .`, everything imports as
`edgediff.*` from outside the checkout, and no bare `engine` or `export` lands in site-packages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgediff import Pipeline

# Not marked slow (20 s): CI runs it, as it guards the torch-free run-time install

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import edgediff, edgediff.engine, edgediff.export, edgediff.backends.cpu, edgediff.backends.cuda
from edgediff import Pipeline
pipe = Pipeline.from_pretrained(sys.argv[1], backend="cpu")
result = pipe("a red circle on a blue background", num_inference_steps=4, seed=9, scheduler="euler_a")
result.images[0].save(sys.argv[2])
assert "torch" not in sys.modules, "torch was imported"
try:
    import torch
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("torch is installed in the run-time environment")
print(edgediff.__file__)
"""


def test_generates_in_an_environment_without_torch(tiny, tmp_path):
    model = tiny("sd1")[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run([str(py), "-c", SCRIPT, str(model), str(outside / "a.png")], cwd=outside,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    site = Path(run.stdout.strip()).parents[1]
    assert Path(run.stdout.strip()).parent.name == "edgediff"
    assert not any((site / bare).exists() for bare in ("engine", "export", "backends", "bench", "builtin"))

    # The CLI works there too, and both give the picture this (torch-carrying) environment gives.
    cli = subprocess.run([str(venv / "bin" / "edgediff"), "generate", "a red circle on a blue background",
                          "--model", str(model), "--steps", "4", "--seed", "9", "--scheduler", "euler_a",
                          "--out", str(outside / "b.png")], cwd=outside, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    here = Pipeline.from_pretrained(model, backend="cpu")(
        "a red circle on a blue background", num_inference_steps=4, seed=9, scheduler="euler_a").images[0]
    for name in ("a.png", "b.png"):
        assert np.array_equal(np.asarray(Image.open(outside / name)), np.asarray(here)), name
