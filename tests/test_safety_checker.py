"""The safety checker: exported when the source has one, run after the VAE, flagged images blacked out
and reported; CLIP's preprocessing reproduced without torch or transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edgediff import Pipeline
from edgediff.engine.safety import ClipPreprocess

SIDE = 32  # the tiny checker's CLIP vision input


def clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})


def tiny_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIDE, patch_size=8),
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
    return checker


def torch_concept_scores(checker, images: list[Image.Image]) -> np.ndarray:
    """Cosine similarity of each image to concept 0, as diffusers computes it, from transformers'
    own preprocessing."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    pixels = clip_processor()(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        return cosine_distance(embeds, checker.concept_embeds)[:, 0].numpy()


@pytest.mark.parametrize("size", [(64, 64), (96, 48), (40, 120)])
def test_clip_preprocessing_matches_transformers(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    want = clip_processor()([image], return_tensors="np").pixel_values
    got = ClipPreprocess(shortest_edge=SIDE, crop=(SIDE, SIDE))([image])
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_flagged_images_are_blacked_and_reported(tiny, tmp_path, capsys):
    """Concept 0's threshold is set between the images' scores, so about half of a batch is flagged;
    edgediff must flag exactly the images diffusers' PyTorch checker flags."""
    from edgediff.cli import main
    from edgediff.export.onnx_export import export_onnx

    src, plain = tiny("sd1")
    request = dict(prompt="a red circle", num_inference_steps=3, seed=11, num_images_per_prompt=4)
    images = Pipeline.from_pretrained(plain, backend="cpu")(**request).images

    checker = tiny_checker()
    scores = torch_concept_scores(checker, images)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)  # cosines never exceed 1: only concept 0 can flag
        checker.concept_embeds_weights[0] = float(np.median(scores))
        checker.special_care_embeds_weights.fill_(2.0)
    expected = list(scores > np.median(scores))
    assert 0 < sum(expected) < 4
    with torch.no_grad():  # diffusers' own decision on the same pictures agrees
        pixels = clip_processor()(images, return_tensors="pt").pixel_values
        nhwc = torch.from_numpy(np.stack([np.asarray(i, np.float32) / 255 for i in images]))
        assert list(checker.forward_onnx(pixels, nhwc)[1].numpy()) == expected

    folder = tmp_path / "with-checker"
    shutil.copytree(src, folder)
    checker.save_pretrained(folder / "safety_checker")
    clip_processor().save_pretrained(folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    m = export_onnx(folder, tmp_path / "onnx", profile_memory=False)
    assert m["components"]["safety_checker"]["psnr"] is None or m["components"]["safety_checker"]["psnr"] >= 60

    result = Pipeline.from_pretrained(tmp_path / "onnx", backend="cpu")(**request)
    assert result.nsfw_content_detected == expected
    for got, original, flagged in zip(result.images, images, expected):
        if flagged:
            assert np.asarray(got).max() == 0
        else:
            assert np.array_equal(np.asarray(got), np.asarray(original))
    unchecked = Pipeline.from_pretrained(tmp_path / "onnx", backend="cpu", safety_checker=False)(**request)
    assert unchecked.nsfw_content_detected == [False] * 4
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(unchecked.images, images))

    # the command line says which were flagged, and --no-safety-checker turns the checker off
    out = tmp_path / "pic.png"
    assert main(["generate", "a red circle", "--model", str(tmp_path / "onnx"), "--steps", "3", "--seed", "11",
                 "--batch", "4", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.count("flagged by the safety checker") == sum(expected)
    assert main(["export", str(folder), "--out", str(tmp_path / "none"), "--no-safety-checker"]) == 0
    assert not (tmp_path / "none" / "safety_checker").exists()
