"""Core ML: the export of the tiny models, and a Core ML folder read, planned and run by the pipeline.

What is checked: each package's spec (an fp16 mlprogram for macOS 15 / iOS 18, the ONNX export's tensor
names, the enumerated shapes of every size and batch, fp32 I/O, the compute units in its metadata), the
folder and manifest, the torch program that was converted against diffusers' own module on every shape,
and the pipeline on every plan rung through the Core ML backend and session up to MLModel.predict. There
a stand-in checks each call against the package's own spec, read with coremltools, and computes it with
the ONNX export of the same model.
What is not run here: the packages themselves. Core ML predicts only on macOS; on Linux coremltools
converts and saves but has no runtime for an mlprogram (README: what needs a Mac).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgediff.cli import main
from edgediff.engine.components import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from edgediff.engine.errors import EdgediffError

ct = pytest.importorskip("coremltools")
from coremltools.proto import MIL_pb2  # noqa: E402
from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType  # noqa: E402

from edgediff.export.coreml_export import export_coreml  # noqa: E402

pytestmark = pytest.mark.slow  # Core ML conversion of every component

SIZES = "64x64,320x256"  # 320 > the plan's 256 px tile: the tiled rungs cut the VAE's work in tiles
HIDDEN = 32  # TinySpec.text_width: CLIP's width = the UNet's cross-attention width
SPECS = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)}
# The sd1 export is for up to 2 images a call: text rows and UNet rows b or 2b for b in 1, 2
ROWS = (1, 2, 4)
LATENTS = ((8, 8), (32, 40))  # (h, w) of 64x64 and 320x256
# component -> {input: (dtype, the shapes it takes)}, written out from the sizes and the batch
EXPECTED = {
    "text_encoder": {"input_ids": ("INT32", {(b, 77) for b in ROWS})},  # Core ML has no int64 arrays
    "unet": {"sample": ("FLOAT32", {(b, 4, h, w) for b in ROWS for h, w in LATENTS}),
             "timestep": ("FLOAT32", {(b,) for b in ROWS}),
             "encoder_hidden_states": ("FLOAT32", {(b, 77, HIDDEN) for b in ROWS})},
    # whole, and the 256 px tiles the tiled rungs encode and decode in
    "vae_encoder": {"sample": ("FLOAT32", {(1, 3, 64, 64), (1, 3, 256, 320), (1, 3, 256, 256)})},
    "vae_decoder": {"latent_sample": ("FLOAT32", {(1, 4, 8, 8), (1, 4, 32, 40), (1, 4, 32, 32)})},
}
OUTPUTS = {"text_encoder": ["last_hidden_state", "pooler_output"], "unet": ["out_sample"],
           "vae_encoder": ["latent_parameters"], "vae_decoder": ["sample"]}


class Exports:
    """Each tiny model converted once for the module: sd1 whole (standard attention, two sizes, up to two
    images a call) through the command line, the sd2 text encoder and UNet with split-einsum, the
    inpainting UNet. sd1 is the tiny model the `tiny` fixture exported to ONNX: the same weights."""

    def __init__(self, root, tiny):
        self.root = root
        self.src = {kind: tiny(kind)[0] for kind in ("sd1", "sd2", "inpaint")}
        self.onnx = tiny("sd1")[1]
        code = main(["export", str(self.src["sd1"]), "--out", str(self.out("sd1")), "--format", "coreml",
                     "--sizes", SIZES, "--batch", "2", "--compute-units", "CPU_AND_NE"])
        assert code == 0
        self.reports = {
            "sd2": export_coreml(self.src["sd2"], self.out("sd2"), [(64, 64)], attention="split-einsum",
                                 components=("text_encoder", "unet")),
            "inpaint": export_coreml(self.src["inpaint"], self.out("inpaint"), [(64, 64)], components=("unet",)),
        }

    def out(self, kind):
        return self.root / f"{kind}-coreml"

    def spec(self, kind, component):
        return ct.utils.load_spec(str(self.out(kind) / component / "model.mlpackage"))

    def report(self, kind, component):
        if kind == "sd1":
            return json.loads((self.out("sd1") / "edgediff.json").read_text())["components"][component]
        return vars(next(r for r in self.reports[kind] if r.name == component))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny) -> Exports:
    return Exports(tmp_path_factory.mktemp("coreml"), tiny)


def _takes(array) -> set[tuple[int, ...]]:
    """The shapes a package input takes, read from its spec."""
    if array.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
        return {tuple(s.shape) for s in array.enumeratedShapes.shapes}
    return {tuple(array.shape)}


def _inputs(spec) -> dict[str, tuple[str, set]]:
    return {f.name: (ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType),
                     _takes(f.type.multiArrayType)) for f in spec.description.input}


def _ops(spec):
    main_ = spec.mlProgram.functions["main"]
    return list(main_.block_specializations[main_.opset].operations)


def _dtype(op):
    return MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)


@pytest.mark.parametrize("component", list(EXPECTED))
def test_sd1_packages_are_fp16_mlprograms_that_take_every_size_and_batch(exports, component):
    spec = exports.spec("sd1", component)
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == 9  # Core ML 8: macOS 15 / iOS 18, several enumerated inputs
    assert _inputs(spec) == EXPECTED[component]
    # the names are engine/components.py's, in its order, as the ONNX export writes them
    assert [f.name for f in spec.description.input] == [t.name for t in SPECS[component].inputs]
    assert [f.name for f in spec.description.output] == [t.name for t in SPECS[component].outputs]
    assert {ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType)
            for f in spec.description.output} == {"FLOAT32"}
    meta = dict(spec.description.metadata.userDefined)
    assert meta["com.edgediff.compute_units"] == "CPU_AND_NE"
    assert meta["com.edgediff.component"] == component
    assert meta["com.edgediff.attention"] == "standard"
    assert meta["com.edgediff.compute_precision"] == "fp16"
    # fp16 compute: every op with weights computes in fp16; in the UNet the timestep sinusoids and the
    # ops they are computed from (the timestep tiled to the batch, ...) stay fp32 (coreml_export._Fp16Selector)
    ops = [op for op in _ops(spec) if op.type != "const"]
    # (the gathers of token embeddings; the others read the dynamic axes' sizes, integers)
    heavy = [op for op in ops if op.type in ("conv", "linear", "matmul")
             or (op.type == "gather" and _dtype(op).startswith("FLOAT"))]
    assert heavy and all(_dtype(op) == "FLOAT16" for op in heavy)
    fp32 = {op.type for op in ops if _dtype(op) == "FLOAT32" and op.type != "cast"}
    assert fp32 == ({"cos", "expand_dims", "mul", "sin", "tile"} if component == "unet" else set())
    report = exports.report("sd1", component)
    assert report["format"] == "coreml" and report["dtype"] == "fp16"
    assert report["extra"]["compute_units"] == "CPU_AND_NE"
    assert {i["name"]: {tuple(s) for s in i.get("shapes", [i["shape"]])} for i in report["inputs"]} == \
        {name: shapes for name, (_, shapes) in EXPECTED[component].items()}


@pytest.mark.parametrize("component", list(EXPECTED))
def test_converted_torch_program_equals_diffusers_on_every_shape(exports, component):
    # The exporter runs the program it converts and diffusers' module on the same inputs, every shape.
    report = exports.report("sd1", component)
    shapes = max(len(s) for _, s in EXPECTED[component].values())
    assert report["extra"]["shapes_checked"] == (len(ROWS) * len(LATENTS) if component == "unet" else shapes)
    assert report["max_abs_diff"] < 1e-5
    assert report["psnr"] is None or report["psnr"] > 100


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
    assert manifest["sizes"] == [[64, 64], [320, 256]] and manifest["batch"] == 2
    assert manifest["compute_units"] == "CPU_AND_NE" and manifest["dtype"] == "fp16"
    assert manifest["minimum_deployment_target"] == "macOS15"
    # the k-th shapes of a component's inputs are one call: the UNet's agree on the batch
    unet = manifest["shapes"]["unet"]
    assert [s[0] for s in unet["sample"]] == [t[0] for t in unet["timestep"]] == \
        [e[0] for e in unet["encoder_hidden_states"]]
    assert sorted(manifest["components"]) == sorted(EXPECTED)


def test_the_folder_is_read_and_planned_from_its_own_facts(exports):
    from edgediff.backends.base import Device
    from edgediff.engine.model_folder import read_model_folder
    from edgediff.engine.plan import RUNGS, Request, _plan, component_facts, make_plan

    model = read_model_folder(exports.out("sd1"))
    assert (model.format, model.sizes, model.max_batch) == ("coreml", ((64, 64), (320, 256)), 2)
    assert model.component(UNET) == exports.out("sd1") / "unet" / "model.mlpackage" and model.has(UNET)
    assert model.dtype("unet") == "fp16"
    facts = component_facts(model)
    assert sorted(facts) == sorted(EXPECTED)
    for name, found in facts.items():  # weights: the package's bytes; activations: SD 1.5's profile, scaled
        package = exports.out("sd1") / name / "model.mlpackage"
        assert found.weights == sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        assert found.activations(1, 32, 40) > 0
    m1 = Device("coreml", "Apple M1", (), 8 * 2**30, 6 * 2**30, unified_memory=True, fp16=True,
                compute_units=("ALL",))
    request = Request(320, 256, 2)
    plan = make_plan(model, request, m1)
    assert plan.backend == "coreml" and plan.dtype == "fp16" and plan.rung == "resident"
    # no rung asks for an export the packages cannot become (sliced attention is an ONNX variant)
    for rung in RUNGS:
        assert _plan(model, facts, request, m1, 8 * 2**30, *rung).needs_export is None


class OnnxBehindPackage:
    """coremltools' MLModel for one package, as the session uses it: `get_spec()` is the package's own
    spec (read with coremltools); `predict` checks each call against that spec (names, dtypes, one of
    its shapes), records it, and computes the outputs with the ONNX export of the same model."""

    def __init__(self, package, onnx_folder, calls: list, wrong: list):
        import onnxruntime as ort

        self.component = package.parent.name
        self.spec = ct.utils.load_spec(str(package))
        self.session = ort.InferenceSession(str(onnx_folder / self.component / "model.onnx"),
                                            providers=["CPUExecutionProvider"])
        self.calls, self.wrong = calls, wrong

    def get_spec(self):
        return self.spec

    def predict(self, feeds):
        takes = _inputs(self.spec)
        if set(feeds) != set(takes):
            self.wrong.append((self.component, sorted(feeds)))
        for name, value in feeds.items():
            dtype, shapes = takes[name]
            if value.dtype != {"FLOAT32": np.float32, "INT32": np.int32}[dtype] or value.shape not in shapes:
                self.wrong.append((self.component, name, value.dtype, value.shape))
            self.calls.append((self.component, name, value.shape))
        types = {i.name: i.type for i in self.session.get_inputs()}
        out = self.session.run(None, {n: v.astype(np.int64) if types[n] == "tensor(int64)" else v
                                      for n, v in feeds.items()})
        return {o.name: v for o, v in zip(self.session.get_outputs(), out)}


@pytest.fixture
def on_a_mac(exports, monkeypatch):
    """The registry's coreml backend as on an M1 with macOS 15 and coremltools, its packages loaded as
    OnnxBehindPackage. Yields (calls, wrong)."""
    from edgediff.backends import coreml

    calls, wrong = [], []
    backend = coreml.CoreMLBackend(
        available_providers=lambda: ["CPUExecutionProvider"], system=lambda: "Darwin", machine=lambda: "arm64",
        mac_version=lambda: "15.1", run=lambda args: "Apple M1\n", memory=lambda: (16 * 2**30, 12 * 2**30),
        has_coremltools=lambda: True,
        load_model=lambda path, units: OnnxBehindPackage(path, exports.onnx, calls, wrong),
        read_spec=lambda path: ct.utils.load_spec(str(path)))
    monkeypatch.setattr(coreml, "BACKEND", backend)
    return calls, wrong


def test_every_plan_rung_runs_through_the_core_ml_session_with_the_packages_shapes(exports, on_a_mac):
    """Text to image (two prompts), image to image (one prompt, two images) and guidance 1, at 320x256
    on every rung of the plan, and once at 64x64: every call the pipeline makes reaches predict with a
    shape and dtype the package's spec takes, every shape the packages take is used, and the pictures
    are the ONNX pipeline's on the same rung (the same graphs compute behind the stand-in)."""
    from PIL import Image

    from edgediff import Pipeline
    from edgediff.engine.plan import RUNGS, Request, _plan, component_facts

    calls, wrong = on_a_mac
    pipe = Pipeline.from_pretrained(exports.out("sd1"), backend="auto", safety_checker=False)
    assert pipe.backend.name == "coreml" and pipe.model.format == "coreml"
    onnx = Pipeline.from_pretrained(exports.onnx, backend="cpu", safety_checker=False)
    init = Image.new("RGB", (320, 256), (200, 40, 40))
    runs = [  # (request, call)
        (Request(320, 256, 2), dict(prompt=["a red circle", "a blue square"])),
        (Request(320, 256, 2, img2img=True), dict(prompt="a red circle", num_images_per_prompt=2, image=init,
                                                  strength=0.5)),
        (Request(320, 256, 1, cfg=False), dict(prompt="a red circle", guidance_scale=1.0)),
    ]
    facts, onnx_facts = component_facts(pipe.model), component_facts(onnx.model)
    rungs = []
    for rung in RUNGS:
        for request, call in runs:
            plan = _plan(pipe.model, facts, request, pipe.device, 64 * 2**30, *rung)
            # the ONNX pipeline on the same rung: blended tiles of the whole decoder, as the packages
            # (its split decoder would decode differently), and no sliced variant to export
            args = dict(width=320, height=256, num_inference_steps=2, seed=3, **call)
            got = pipe(plan=plan, **args)
            kind = (plan.cfg_batched, plan.vae_tile, bool(call.get("image")))
            if kind not in {k for _, k in rungs}:  # the rungs that differ only in what stays loaded compute alike
                same = next(r for r in RUNGS if r[0] == ("streamed-lean" if rung[0] == "lowest" else rung[0]))
                reference = _plan(onnx.model, onnx_facts, request, onnx.device, 64 * 2**30, *same, False)
                want = onnx(plan=reference, **args)
                assert [np.asarray(im).tolist() for im in got.images] == \
                    [np.asarray(im).tolist() for im in want.images], (rung, call)
            rungs.append((plan.rung, kind))
    one = (Request(64, 64, 1), dict(prompt="a red circle"))  # guidance batched for one image: 2 rows
    for request, call in runs + [one]:  # and at the other size, on the plan the pipeline makes
        got = pipe(width=64, height=64, num_inference_steps=2, seed=3,
                   **{**call, "image": init.resize((64, 64))} if "image" in call else call)
        assert got.plan.rung == "resident" and len(got.images) == request.batch
    assert wrong == []
    # every rung kind ran: batched and sequential guidance, whole and tiled VAE
    assert {k[:2] for _, k in rungs} == {(True, None), (False, None), (True, 256), (False, 256)}
    assert {name for name, _ in rungs} == {r[0] for r in RUNGS}
    used: dict[str, dict[str, set]] = {}
    for component, name, shape in calls:
        used.setdefault(component, {}).setdefault(name, set()).add(shape)
    assert used == {c: {n: shapes for n, (_, shapes) in inputs.items()} for c, inputs in EXPECTED.items()}


def test_what_the_packages_cannot_take_is_refused_in_one_line(exports, on_a_mac, monkeypatch, capsys):
    from edgediff import Pipeline

    # `edgediff plan` plans a Core ML folder for the coreml backend, and refuses what generate would
    assert main(["plan", "--model", str(exports.out("sd1")), "--width", "320", "--height", "256"]) == 0
    assert "resident plan on coreml: 320x256 x1, fp16" in capsys.readouterr().out
    assert main(["plan", "--model", str(exports.out("sd1")), "--width", "128", "--height", "128"]) == 2
    err = capsys.readouterr().err
    assert "take 64x64, 320x256 only, not 128x128" in err and len(err.splitlines()) == 1
    pipe = Pipeline.from_pretrained(exports.out("sd1"), backend="coreml", safety_checker=False)
    with pytest.raises(EdgediffError, match=r"take 64x64, 320x256 only, not 128x128: generate at one of those "
                                            r"sizes, or export again with --sizes 64x64,320x256,128x128$"):
        pipe("a cat", width=128, height=128, num_inference_steps=2)
    with pytest.raises(EdgediffError, match="make at most 2 image\\(s\\) a call, not 3"):
        pipe("a cat", width=64, height=64, num_inference_steps=2, num_images_per_prompt=3)
    with pytest.raises(EdgediffError, match="cannot change their weights when loaded; bake LoRAs in"):
        pipe.set_loras([("x.safetensors", 1.0)])
    on_a_mac[1].clear()
    # off the Mac (the real probe here), and on another backend: one line, not a broken ONNX session
    from edgediff.backends import coreml

    monkeypatch.setattr(coreml, "BACKEND", coreml.CoreMLBackend(system=lambda: "Linux", machine=lambda: "x86_64"))
    for backend, why in (("auto", "not on macOS with Apple Silicon"), ("cpu", "backend cpu was asked for")):
        with pytest.raises(EdgediffError, match=f"holds Core ML packages, which run on Apple Silicon .*{why}.*"
                                                "export the model with --format onnx"):
            Pipeline.from_pretrained(exports.out("sd1"), backend=backend)


def test_sd2_split_einsum(exports):
    for component in ("text_encoder", "unet"):
        spec = exports.spec("sd2", component)
        assert _inputs(spec) == {  # one size, one image a call: batches 1 and 2
            "text_encoder": {"input_ids": ("INT32", {(1, 77), (2, 77)})},
            "unet": {"sample": ("FLOAT32", {(1, 4, 8, 8), (2, 4, 8, 8)}), "timestep": ("FLOAT32", {(1,), (2,)}),
                     "encoder_hidden_states": ("FLOAT32", {(1, 77, HIDDEN), (2, 77, HIDDEN)})}}[component]
        meta = dict(spec.description.metadata.userDefined)
        assert meta["com.edgediff.compute_units"] == "ALL"
        assert meta["com.edgediff.attention"] == ("split-einsum" if component == "unet" else "standard")
    # Split-einsum changes only the order of the sums: the converted program against diffusers' standard
    # attention, on the same inputs.
    report = exports.report("sd2", "unet")
    assert report["attention"] == "split-einsum"
    assert 0 < report["max_abs_diff"] < 1e-4
    # one einsum per head becomes one matmul per head: sd2's tiny UNet has 2 and 4 heads per level
    assert sum(op.type == "matmul" for op in _ops(exports.spec("sd2", "unet"))) > \
        sum(op.type == "matmul" for op in _ops(exports.spec("sd1", "unet")))
    assert not (exports.out("sd2") / "vae_decoder").exists()


def test_inpaint_unet_takes_nine_channels(exports):
    takes = _inputs(exports.spec("inpaint", "unet"))
    assert takes["sample"] == ("FLOAT32", {(1, 9, 8, 8), (2, 9, 8, 8)})
    assert exports.report("inpaint", "unet")["max_abs_diff"] < 1e-5


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


def test_bad_requests_fail_in_one_line_and_leave_nothing(exports, tmp_path, capsys):
    src = exports.src["sd1"]
    with pytest.raises(EdgediffError, match="supported: standard, split-einsum"):
        export_coreml(src, tmp_path / "a", [(64, 64)], attention="sliced")
    with pytest.raises(EdgediffError, match="CPU_AND_NE"):
        export_coreml(src, tmp_path / "a", [(64, 64)], compute_units="NE")
    with pytest.raises(EdgediffError, match="multiples of 16"):  # tiny: 8x VAE, one UNet downsampling
        export_coreml(src, tmp_path / "a", [(64, 64), (72, 64)])
    with pytest.raises(EdgediffError, match="batch must be a whole number from 1 to 4"):
        export_coreml(src, tmp_path / "a", [(64, 64)], batch=5)
    with pytest.raises(EdgediffError, match="already holds an edgediff export"):
        export_coreml(src, exports.out("sd1"), [(64, 64)])
    for sizes in ("64", "64x", "64x64,,", "axb"):
        code = main(["export", str(src), "--out", str(tmp_path / "b"), "--format", "coreml", "--sizes", sizes])
        err = capsys.readouterr().err
        assert code == 2 and "is not WIDTHxHEIGHT; write it like 512x512,768x512" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
