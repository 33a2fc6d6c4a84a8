"""A tiny autoencoder (TAESD, diffusers' AutoencoderTiny) exported beside the VAE: drafts decoded with
it match diffusers' AutoencoderTiny, and previews reach the callback (the tiny decoder's, or the family's
latent-to-RGB projection without one). The tiny autoencoder is a random one built from diffusers' class."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff import EdgediffError, Pipeline
from edgediff.cli import main
from edgediff.engine.metrics import psnr

STEPS = 5


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """A TAESD-shaped AutoencoderTiny with random weights, saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    m = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    m.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def with_tiny(tiny, taesd, tmp_path_factory):
    """The tiny SD 1.x model exported with the tiny autoencoder, through the command line."""
    out = tmp_path_factory.mktemp("tiny-vae") / "sd1-taesd"
    assert main(["export", str(tiny("sd1")[0]), "--out", str(out), "--tiny-vae", str(taesd)]) == 0
    return out


def test_tiny_decode_matches_diffusers_autoencoder_tiny(with_tiny, taesd):
    import json

    import torch
    from diffusers import AutoencoderTiny

    manifest = json.loads((with_tiny / "edgediff.json").read_text())
    record = manifest["components"]["vae_decoder_tiny"]
    assert manifest["tiny_vae"] == str(taesd) and record["psnr"] is None or record["psnr"] >= 60
    pipe = Pipeline.from_pretrained(with_tiny, backend="cpu", safety_checker=False)
    final = []
    result = pipe("a red circle", num_inference_steps=STEPS, seed=2, width=64, height=64, vae_decoder="tiny",
                  callback=lambda n, total, latents: final.append(latents.copy()))
    assert "VAE: TAESD" in result.parameters[0].a1111()
    with torch.no_grad():
        m = AutoencoderTiny.from_pretrained(taesd).eval()
        want = m.decode(torch.from_numpy(final[-1]) / m.config.scaling_factor).sample.numpy()
    want = (np.clip(want / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)[0] * 255).round().astype(np.uint8)
    got = np.asarray(result.images[0])
    assert got.shape == want.shape == (64, 64, 3)
    score = psnr(got, want)
    print(f"tiny autoencoder decode against diffusers' AutoencoderTiny: {score} dB")
    assert score >= 40
    # the full VAE still decodes the same latents its own way
    full = pipe("a red circle", num_inference_steps=STEPS, seed=2, width=64, height=64)
    assert "VAE:" not in full.parameters[0].a1111() and psnr(np.asarray(full.images[0]), got) < 40


def test_previews_reach_the_callback(with_tiny, tiny):
    seen = {}

    def callback(n, total, latents, preview):
        seen[n] = preview

    Pipeline.from_pretrained(with_tiny, backend="cpu", safety_checker=False)(
        ["a red circle", "a blue square"], num_inference_steps=STEPS, seed=2, width=64, height=64,
        scheduler="euler", callback=callback, preview_every=2)
    assert sorted(n for n, p in seen.items() if p is not None) == [1, 3, 4]  # every 2 steps, and the last
    assert all(len(p) == 2 and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in p)
               for p in seen.values() if p is not None)
    # without a tiny autoencoder: the latent-to-RGB projection, at latent resolution
    plain = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu", safety_checker=False)
    latents, previews = [], []
    plain("a red circle", num_inference_steps=STEPS, seed=2, width=64, height=64, preview_every=STEPS,
          scheduler="euler",
          callback=lambda n, total, x, p: (latents.append(x.copy()), previews.append(p)))
    assert previews[:-1] == [None] * (STEPS - 1) and previews[-1][0].size == (8, 8)
    factors = np.asarray(plain.model.family.latent_rgb)
    want = np.einsum("chw,cr->hwr", latents[-1][0], factors)
    want = (np.clip(want / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(previews[-1][0]), want)


def test_tiny_decoder_mistakes_are_one_line(tiny, tmp_path, capsys):
    pipe = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu", safety_checker=False)
    with pytest.raises(EdgediffError, match="has no tiny autoencoder: export it with --tiny-vae madebyollin/taesd"):
        pipe("a cat", num_inference_steps=2, width=64, height=64, vae_decoder="tiny")
    with pytest.raises(EdgediffError, match="vae_decoder must be 'full', 'tiny' or 'int8'"):
        pipe("a cat", num_inference_steps=2, width=64, height=64, vae_decoder="taesd")
    with pytest.raises(EdgediffError, match="preview_every passes previews to the callback"):
        pipe("a cat", num_inference_steps=2, width=64, height=64, preview_every=1)
    for ref, words, extra in ((str(tmp_path / "none"), "is neither a folder nor a hub id", []),
                              (str(tiny("sd1")[0] / "vae"), "not a diffusers AutoencoderTiny", []),
                              ("madebyollin/taesd", "for ONNX exports only", ["--format", "coreml"])):
        code = main(["export", str(tiny("sd1")[0]), "--out", str(tmp_path / "out"), "--tiny-vae", ref, *extra])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def test_generate_with_the_tiny_decoder_from_the_command_line(with_tiny, tmp_path):
    out = tmp_path / "draft.png"
    assert main(["generate", "a red circle", "--model", str(with_tiny), "--steps", "2", "--vae-decoder", "tiny",
                 "--out", str(out), "--no-safety-checker"]) == 0
    assert "VAE: TAESD" in Image.open(out).text["parameters"]
