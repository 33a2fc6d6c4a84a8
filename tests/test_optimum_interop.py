"""Interop with Hugging Face optimum, both ways, on the tiny SD 1.x model:

- A: a folder exported by edgediff loads in optimum's ORTStableDiffusionPipeline and gives the same
  image as edgediff's Pipeline for the same latents;
- B: a folder exported by `optimum-cli export onnx` runs in edgediff and gives diffusers' image.

optimum-onnx cannot live in the dev venv (it pins transformers 4.57), so its side runs in a venv of its
own, built once by tests/optimum_env.py (about 17 s), through tests/optimum_run.py. The tests then
take about 30 s, 7 s of which build the tiny model that the rest of the suite shares. The module skips
only when that venv cannot be built because the package index is unreachable; any other problem fails.

The tiny diffusers folders are written by the dev venv's transformers 5, and two things in them do
not read in transformers 4.57 the way hub checkpoints (written by transformers 4) do, so B gives
optimum-cli a converted copy (`edgediff.bench.peers.hub_layout`):
- tokenizer/ has only tokenizer.json; transformers 4's CLIPTokenizer, the class model_index.json names,
  needs vocab.json and merges.txt (every SD repository on the hub has them). edgediff's export writes
  them (engine/clip_vocab.add_vocab_files), so A uses edgediff's folder exactly as exported.
- text_encoder/model.safetensors has CLIPTextModel's weights without the `text_model.` prefix;
  transformers 4.57 loads such a file with random weights and only a warning.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgediff.bench.peers import hub_layout

import optimum_env
from edgediff import Pipeline
from edgediff.backends.base import ORT_TYPES
from edgediff.engine import noise
from edgediff.engine.components import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from edgediff.engine.metrics import psnr
from edgediff.engine.model_folder import read_model_folder

pytestmark = pytest.mark.slow  # a venv of its own and optimum's exports

RUNNER = Path(__file__).with_name("optimum_run.py")
# The bar. Measured: identical 8-bit images both ways, PNDM and Euler (B with the engine fix for
# the scalar timestep, see test_optimum_export_runs_in_edgediff); tests/test_parity.py holds 60 dB.
MIN_PSNR = 40.0
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
STEPS, GUIDANCE = 8, 7.5
SCHEDULERS = ("pndm", "euler")
TIMEOUT = 600  # seconds for one optimum process; they take 5 to 15


class OptimumFailed(AssertionError):
    pass


@pytest.fixture(scope="module")
def optimum_python() -> Path:
    try:
        return optimum_env.optimum_python()
    except optimum_env.OptimumEnvUnavailable as e:
        pytest.skip(f"optimum interop: {e}")


def run_optimum(args: list[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=optimum_env.subprocess_env(),
                          timeout=TIMEOUT)
    if proc.returncode != 0:
        raise OptimumFailed(f"{what} failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                            f"{_tail(proc.stderr, 40)}\n{_tail(proc.stdout, 10)}")
    return proc


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _latents() -> np.ndarray:
    return noise.batch_noise([7], noise.INITIAL, (4, 8, 8))  # what tests/test_parity.py uses


def _to_8bit(image: np.ndarray) -> np.ndarray:
    """diffusers' float output (H, W, 3) in [0, 1] rounded as its numpy_to_pil rounds."""
    return (image * 255).round().astype(np.uint8)


# A: edgediff -> optimum

def test_edgediff_export_runs_in_optimum(optimum_python, tiny, tmp_path, record_property):
    folder = tiny("sd1")[1]  # exactly as edgediff exported it
    latents = _latents()
    np.save(tmp_path / "latents.npy", latents)
    args = [optimum_python, RUNNER, "generate", folder, "--latents", tmp_path / "latents.npy",
            "--out", tmp_path / "optimum.npz", "--prompt", PROMPT, "--negative", NEGATIVE,
            "--steps", str(STEPS), "--guidance", str(GUIDANCE)]
    for name in SCHEDULERS:
        args += ["--scheduler", name]
    report = json.loads(run_optimum([str(a) for a in args], "optimum on edgediff's export").stdout)
    assert report["pipeline"] == "ORTStableDiffusionPipeline"
    theirs = np.load(tmp_path / "optimum.npz")

    pipe = Pipeline.from_pretrained(folder, backend="cpu")
    for name in SCHEDULERS:
        ours = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=latents, scheduler=name).images[0]
        want = _to_8bit(theirs[name][0])
        score = psnr(ours, want)
        record_property(f"psnr_edgediff_export_in_optimum_{name}", score)
        print(f"A edgediff -> optimum, {name}: {score:.1f} dB")
        assert np.asarray(ours).std() > 1.0, "edgediff's image is flat: the comparison would mean nothing"
        assert score >= MIN_PSNR, f"{name}: {score:.1f} dB against optimum {report['versions']}"


def test_edgediff_export_loads_in_optimum_unchanged(optimum_python, tiny):
    proc = subprocess.run([str(optimum_python), str(RUNNER), "load", str(tiny("sd1")[1])], capture_output=True,
                          text=True, env=optimum_env.subprocess_env(), timeout=TIMEOUT)
    if proc.returncode != 0:
        raise OptimumFailed(f"optimum could not load edgediff's export:\n{_tail(proc.stderr, 40)}")


# B: optimum -> edgediff

@pytest.fixture(scope="module")
def optimum_export(optimum_python, tiny, tmp_path_factory) -> Path:
    """The tiny SD 1.x model exported by `optimum-cli export onnx`."""
    root = tmp_path_factory.mktemp("optimum-export")
    src = hub_layout(tiny("sd1")[0], root / "diffusers")
    out = root / "onnx"
    cli = optimum_python.parent / "optimum-cli"
    # a local folder needs --task: optimum cannot infer it from one ("Cannot infer the task from a local
    # directory yet")
    run_optimum([str(cli), "export", "onnx", "--model", str(src), "--task", "text-to-image", str(out)],
                "optimum-cli export onnx")
    return out


def test_optimum_export_matches_edgediff_components(optimum_export):
    import onnxruntime as ort

    model = read_model_folder(optimum_export)
    assert (model.unet_in_channels, model.sample_size, model.vae_scale_factor) == (4, 8, 8)
    for spec in (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER):
        session = ort.InferenceSession(str(optimum_export / spec.onnx_path), providers=["CPUExecutionProvider"])
        inputs = {i.name: ORT_TYPES.get(i.type) for i in session.get_inputs()}
        outputs = {o.name: ORT_TYPES.get(o.type) for o in session.get_outputs()}
        assert list(inputs) == [t.name for t in spec.inputs], spec.name
        assert [t.name for t in spec.outputs if t.name in outputs] == [t.name for t in spec.outputs], spec.name
        for t in spec.inputs:
            # int32 input_ids (older optimum exports) are cast by the session; everything else must agree
            assert inputs[t.name] == np.dtype(t.dtype) or t.name == "input_ids", (spec.name, t.name)


def test_optimum_export_runs_in_edgediff(optimum_export, tiny, record_property):
    import torch
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline

    latents = _latents()
    pipe = Pipeline.from_pretrained(optimum_export, backend="cpu")
    reference = StableDiffusionPipeline.from_pretrained(tiny("sd1")[0], safety_checker=None,
                                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    # The scheduler config edgediff reads: optimum's export rewrites it with every default spelled out
    # (timestep_spacing "leading", PNDM's), which Euler then takes instead of its own "linspace".
    config = json.loads((optimum_export / "scheduler" / "scheduler_config.json").read_text())
    for name, cls in zip(SCHEDULERS, (PNDMScheduler, EulerDiscreteScheduler)):
        ours = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=latents, scheduler=name).images[0]
        reference.scheduler = cls.from_config(config)
        want = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         latents=torch.from_numpy(latents)).images[0]
        score = psnr(ours, want)
        record_property(f"psnr_optimum_export_in_edgediff_{name}", score)
        print(f"B optimum -> edgediff, {name}: {score:.1f} dB")
        assert np.asarray(ours).std() > 1.0, "edgediff's image is flat: the comparison would mean nothing"
        assert score >= MIN_PSNR, f"{name}: {score:.1f} dB against diffusers"
