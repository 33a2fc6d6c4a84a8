"""The training script runs end to end and is deterministic: the same recipe gives the same weights,
bit for bit, which is what lets the committed built-in model be reproduced from its model card."""

from __future__ import annotations

import dataclasses
import json

import pytest

from safetensors.numpy import load_file

from edgediff.builtin.train import Recipe, train

pytestmark = pytest.mark.slow  # two short trainings

TINY = dataclasses.replace(Recipe(), train_scenes=256, vae_steps=6, vae_batch=4, unet_steps=6, unet_batch=8,
                           warmup=2)


def test_training_writes_a_model_folder_and_repeats_exactly(tmp_path):
    a = train(tmp_path / "a", TINY, log=lambda msg: None)
    b = train(tmp_path / "b", TINY, log=lambda msg: None)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        wa, wb = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert wa.keys() == wb.keys()
        assert all((wa[k] == wb[k]).all() for k in wa), part
    assert a["losses"] == b["losses"] and len(a["losses"]["unet"]) == 1
    config = json.loads((tmp_path / "a" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler" and config["prediction_type"] == "epsilon"
    assert config["clip_sample"] is False and "timestep_spacing" not in config
    card = (tmp_path / "a" / "README.md").read_text()
    assert "python -m edgediff.builtin.train --out builtin/model --train-scenes 256" in card
    vae = json.loads((tmp_path / "a" / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == a["scaling_factor"]
