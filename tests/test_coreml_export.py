"""Core ML export of the tiny models (sd1, sd2, inpaint) at 64x64.

What is checked: each package's spec (an fp16 mlprogram for macOS 13 / iOS 16, the ONNX export's tensor
names, static shapes, fp32 I/O, the compute units in its metadata), the folder and manifest, and the
torch program that was converted against diffusers' own module on the same inputs.
What is not run here: the packages themselves. Core ML predicts only on macOS; on Linux coremltools
converts and saves but has no runtime for an mlprogram.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgediff.builtin.random_model import TinySpec, build_random_model
from edgediff.engine.components import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from edgediff.engine.errors import EdgediffError

ct = pytest.importorskip("coremltools")
from coremltools.proto import MIL_pb2  # noqa: E402

from edgediff.export.coreml_export import coreml_shapes, export_coreml  # noqa: E402

pytestmark = pytest.mark.slow  # Core ML conversion of every component

SIZE = 64
HIDDEN = 32  # TinySpec.text_width: CLIP's width = the UNet's cross-attention width
SPECS = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)}
# name -> (inputs, outputs) as (name, shape, dtype) for a 64x64 export of batch 1
EXPECTED = {
    "text_encoder": ([("input_ids", [2, 77], "INT32")],  # Core ML has no int64 arrays
                     [("last_hidden_state", [2, 77, HIDDEN], "FLOAT32"),
                      ("pooler_output", [2, HIDDEN], "FLOAT32")]),
    "unet": ([("sample", [2, 4, 8, 8], "FLOAT32"), ("timestep", [2], "FLOAT32"),
              ("encoder_hidden_states", [2, 77, HIDDEN], "FLOAT32")],
             [("out_sample", [2, 4, 8, 8], "FLOAT32")]),
    "vae_encoder": ([("sample", [1, 3, 64, 64], "FLOAT32")],
                    [("latent_parameters", [1, 8, 8, 8], "FLOAT32")]),
    "vae_decoder": ([("latent_sample", [1, 4, 8, 8], "FLOAT32")], [("sample", [1, 3, 64, 64], "FLOAT32")]),
}


class Exports:
    """Each tiny model converted once for the module: sd1 whole (standard attention), the sd2 text
    encoder and UNet with split-einsum, the inpainting UNet. A full export of one kind takes about 15 s
    on a shared 2-core CPU, so the other kinds convert only the parts where they differ."""

    def __init__(self, root):
        self.root = root
        self.src = {kind: build_random_model(root / kind, TinySpec(kind=kind, seed=1))
                    for kind in ("sd1", "sd2", "inpaint")}
        self.reports = {
            "sd1": export_coreml(self.src["sd1"], root / "sd1-coreml", SIZE, SIZE,
                                 compute_units="CPU_AND_NE"),
            "sd2": export_coreml(self.src["sd2"], root / "sd2-coreml", SIZE, SIZE, attention="split-einsum",
                                 components=("text_encoder", "unet")),
            "inpaint": export_coreml(self.src["inpaint"], root / "inpaint-coreml", SIZE, SIZE,
                                     components=("unet",)),
        }

    def out(self, kind):
        return self.root / f"{kind}-coreml"

    def spec(self, kind, component):
        return ct.utils.load_spec(str(self.out(kind) / component / "model.mlpackage"))

    def report(self, kind, component):
        return next(r for r in self.reports[kind] if r.name == component)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("coreml"))


def _io(features):
    return [(f.name, list(f.type.multiArrayType.shape),
             ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType))
            for f in features]


def _ops(spec):
    main = spec.mlProgram.functions["main"]
    return list(main.block_specializations[main.opset].operations)


def _dtype(op):
    return MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)


@pytest.mark.parametrize("component", list(EXPECTED))
def test_sd1_packages_are_fp16_mlprograms_with_the_onnx_names(exports, component):
    spec = exports.spec("sd1", component)
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == 7  # Core ML 6: macOS 13 / iOS 16
    inputs, outputs = EXPECTED[component]
    assert _io(spec.description.input) == inputs
    assert _io(spec.description.output) == outputs
    # the names are engine/components.py's, in its order, as the ONNX export writes them
    assert [n for n, _, _ in inputs] == [t.name for t in SPECS[component].inputs]
    assert [n for n, _, _ in outputs] == [t.name for t in SPECS[component].outputs]
    meta = dict(spec.description.metadata.userDefined)
    assert meta["com.edgediff.compute_units"] == "CPU_AND_NE"
    assert meta["com.edgediff.component"] == component
    assert meta["com.edgediff.attention"] == "standard"
    assert meta["com.edgediff.compute_precision"] == "fp16"
    # fp16 compute: every op with weights computes in fp16; fp32 remains only in the casts at the edges
    # and, in the UNet, the timestep sinusoids (export/coreml_export.py: _Fp16Selector).
    ops = [op for op in _ops(spec) if op.type != "const"]
    heavy = [op for op in ops if op.type in ("conv", "linear", "matmul", "gather")]
    assert heavy and all(_dtype(op) == "FLOAT16" for op in heavy)
    fp32 = sorted(op.type for op in ops if _dtype(op) == "FLOAT32" and op.type != "cast")
    assert fp32 == (["cos", "expand_dims", "mul", "sin"] if component == "unet" else [])
    report = exports.report("sd1", component)
    assert report.format == "coreml" and report.dtype == "fp16"
    assert report.extra["compute_units"] == "CPU_AND_NE"
    assert [(i["name"], i["shape"], i["dtype"].upper()) for i in report.inputs] == inputs
    assert [(o["name"], o["shape"], o["dtype"].upper()) for o in report.outputs] == outputs


@pytest.mark.parametrize("component", list(EXPECTED))
def test_converted_torch_program_equals_diffusers(exports, component):
    # The exporter runs the program it converts and diffusers' module on the same sample inputs.
    report = exports.report("sd1", component)
    assert report.max_abs_diff < 1e-6
    assert report.psnr is None or report.psnr > 120


def test_sd1_folder_and_manifest(exports):
    out = exports.out("sd1")
    for part in ("model_index.json", "tokenizer", "scheduler/scheduler_config.json", "edgediff.json"):
        assert (out / part).exists(), part
    for component in EXPECTED:
        assert (out / component / "config.json").is_file()
        assert (out / component / "model.mlpackage" / "Manifest.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    manifest = json.loads((out / "edgediff.json").read_text())
    assert manifest["format"] == "edgediff-coreml"
    assert (manifest["width"], manifest["height"], manifest["batch"]) == (SIZE, SIZE, 1)
    assert manifest["compute_units"] == "CPU_AND_NE" and manifest["dtype"] == "fp16"
    assert manifest["shapes"]["unet"]["sample"] == [2, 4, 8, 8]
    assert sorted(manifest["components"]) == sorted(EXPECTED)


def test_sd2_split_einsum(exports):
    for component in ("text_encoder", "unet"):
        inputs, outputs = EXPECTED[component]
        spec = exports.spec("sd2", component)
        assert _io(spec.description.input) == inputs and _io(spec.description.output) == outputs
        meta = dict(spec.description.metadata.userDefined)
        assert meta["com.edgediff.compute_units"] == "ALL"
        assert meta["com.edgediff.attention"] == ("split-einsum" if component == "unet" else "standard")
    # Split-einsum changes only the order of the sums: the converted program against diffusers' standard
    # attention, on the same inputs.
    report = exports.report("sd2", "unet")
    assert report.attention == "split-einsum"
    assert 0 < report.max_abs_diff < 1e-4
    # one einsum per head becomes one matmul per head: sd2's tiny UNet has 2 and 4 heads per level
    assert sum(op.type == "matmul" for op in _ops(exports.spec("sd2", "unet"))) > \
        sum(op.type == "matmul" for op in _ops(exports.spec("sd1", "unet")))
    assert not (exports.out("sd2") / "vae_decoder").exists()


def test_inpaint_unet_takes_nine_channels(exports):
    spec = exports.spec("inpaint", "unet")
    assert _io(spec.description.input)[0] == ("sample", [2, 9, 8, 8], "FLOAT32")
    assert _io(spec.description.output) == [("out_sample", [2, 4, 8, 8], "FLOAT32")]
    assert exports.report("inpaint", "unet").max_abs_diff < 1e-6


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_split_einsum_matches_standard_attention(exports, kind):
    """The processor on diffusers' modules directly, UNet and VAE: max abs diff under 1e-4."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from edgediff.export import attention

    g = torch.Generator().manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(exports.src[kind] / "unet").eval()
    vae = AutoencoderKL.from_pretrained(exports.src[kind] / "vae").eval()
    runs = [(unet, lambda: unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([981.0, 1.0]),
                                torch.randn(2, 77, HIDDEN, generator=g)).sample),
            (vae, lambda: vae.decode(torch.randn(1, 4, 8, 8, generator=g)).sample)]
    with torch.no_grad():
        for module, run in runs:
            attention.install(module, "standard")
            state = g.get_state()
            want = run()
            attention.install(module, "split-einsum")
            g.set_state(state)
            assert (run() - want).abs().max() < 1e-4


@pytest.mark.parametrize("prompts, per_prompt", [
    (["a red circle", "a blue square"], 1),
    pytest.param(["a red circle"], 2, marks=pytest.mark.xfail(strict=True, reason=(
        "the pipeline encodes each prompt once and repeats its embeddings for the prompt's images, so the "
        "text encoder gets (2 x prompts, 77), while a package exported for batch B takes (2B, 77) only"))),
])
def test_shapes_follow_the_pipeline_calls(tiny, monkeypatch, prompts, per_prompt):
    """The packages' static shapes are the ones the pipeline feeds: its calls, recorded through the ONNX
    sessions of the same tiny model (text to image and image to image, two images a call, guidance on:
    the plan a package's shapes are made for), against coreml_shapes for that request."""
    from PIL import Image

    from edgediff import Pipeline
    from edgediff.backends.base import OrtSession

    model = tiny("sd1")[1]  # exported before the recording starts: the export runs sessions too
    fed: dict[str, dict[str, set]] = {}
    run, keep = OrtSession.run, OrtSession.keep

    def record(session, name, array):
        fed.setdefault(session.spec.name, {}).setdefault(name, set()).add(tuple(np.shape(array)))

    def recording_run(self, **inputs):
        for name, array in inputs.items():
            record(self, name, array)
        return run(self, **inputs)

    def recording_keep(self, name, array):
        record(self, name, array)
        return keep(self, name, array)

    monkeypatch.setattr(OrtSession, "run", recording_run)
    monkeypatch.setattr(OrtSession, "keep", recording_keep)
    width, height = 64, 48  # not square: the shapes' H and W must not be swapped
    pipe = Pipeline.from_pretrained(model, backend="cpu", safety_checker=False)
    call = dict(width=width, height=height, num_images_per_prompt=per_prompt, num_inference_steps=2, seed=1)
    result = pipe(prompts, **call)
    pipe(prompts, image=Image.new("RGB", (width, height), (200, 40, 40)), strength=0.5, **call)
    assert result.plan.rung == "resident" and result.plan.cfg_batched and not result.plan.vae_tile
    want = coreml_shapes(width, height, len(prompts) * per_prompt, in_channels=4, hidden=HIDDEN)
    assert {c: fed[c] for c in want} == {c: {n: {s} for n, s in inputs.items()} for c, inputs in want.items()}


def test_bad_requests_fail_in_one_line_and_leave_nothing(exports, tmp_path):
    src = exports.src["sd1"]
    with pytest.raises(EdgediffError, match="supported: standard, split-einsum"):
        export_coreml(src, tmp_path / "a", SIZE, SIZE, attention="sliced")
    with pytest.raises(EdgediffError, match="CPU_AND_NE"):
        export_coreml(src, tmp_path / "a", SIZE, SIZE, compute_units="NE")
    with pytest.raises(EdgediffError, match="multiples of 16"):  # tiny: 8x VAE, one UNet downsampling
        export_coreml(src, tmp_path / "a", 72, SIZE)
    with pytest.raises(EdgediffError, match="already holds an edgediff export"):
        export_coreml(src, exports.out("sd1"), SIZE, SIZE)
    assert list(tmp_path.iterdir()) == []
