"""The export stage: precision, attention variants, the parity gate and manifest, atomic output, the cache.

Single-file checkpoints are tests/test_single_file.py; Core ML is tests/test_coreml_export.py.
"""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from edgediff import Pipeline
from edgediff.engine.errors import EdgediffError
from edgediff.engine.metrics import psnr, tensor_psnr
from edgediff.export import attention, quantize
from edgediff.export import onnx_export as ox
from edgediff.export.onnx_export import ExportOptions, export_onnx

KINDS = ("sd1", "sd2", "inpaint")


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """Exports of the tiny models with other options, made once: exports[(kind, options key)]."""
    root = tmp_path_factory.mktemp("exports")
    made = {}

    def get(kind: str, options: ExportOptions):
        key = (kind, options.key())
        if key not in made:
            made[key] = root / f"{kind}-{options.key()}"
            export_onnx(tiny(kind)[0], made[key], options, profile_memory=False)
        return made[key]
    return get


def manifest(folder) -> dict:
    return json.loads((folder / "edgediff.json").read_text())


# -- attention variants ---------------------------------------------------------------------------

@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_variants_compute_standard_attention(cross, upcast):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    layer = Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8,
                      upcast_attention=upcast).eval()
    x = torch.randn(2, 64, 32)
    context = torch.randn(2, 77, 24) if cross else None
    with torch.no_grad():
        layer.set_processor(AttnProcessor())
        want = layer(x, context)
        for proc in (attention.QuerySlicedAttnProcessor(4), attention.QuerySlicedAttnProcessor(64),
                     attention.SplitEinsumAttnProcessor()):
            layer.set_processor(proc)
            got = layer(x, context)
            assert torch.allclose(got, want, atol=1e-5), (type(proc).__name__, float((got - want).abs().max()))


def test_vae_style_attention_with_group_norm_and_residual():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    layer = Attention(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True,
                      bias=True, upcast_softmax=True).eval()
    x = torch.randn(1, 32, 8, 8)  # (B, C, H, W): the VAE's mid-block attention
    with torch.no_grad():
        layer.set_processor(AttnProcessor())
        want = layer(x)
        layer.set_processor(attention.QuerySlicedAttnProcessor(8))
        assert torch.allclose(layer(x), want, atol=1e-5)


def test_slices_per_level_divide_the_query_length_for_multiples_of_64():
    for side in range(64, 1025, 64):
        for level in range(3):
            n = (side // 8 // 2 ** level) ** 2
            assert n % attention.slices_for_level(16, level) == 0, (side, level)


def test_a_broken_variant_is_refused_before_export(tiny, tmp_path, monkeypatch):
    real = attention.QuerySlicedAttnProcessor.attend

    def drops_a_slice(self, attn, q, k, v):
        out = real(self, attn, q, k, v)
        return out * (torch.arange(out.shape[1]) < out.shape[1] - 1)[None, :, None]
    monkeypatch.setattr(attention.QuerySlicedAttnProcessor, "attend", drops_a_slice)
    with pytest.raises(EdgediffError, match="sliced attention in the unet differs from standard"):
        export_onnx(tiny("sd1")[0], tmp_path / "o", ExportOptions(attention="sliced"))
    assert list(tmp_path.iterdir()) == []


# -- every option passes the gate, for every kind -------------------------------------------------

# Every kind with fp16 (its islands are measured per model), every attention variant on one kind: the
# variants are the same code for every kind, and each tiny export costs 20-60 s on two cores (issue 11's
# suite budget), so the full cross product (9 exports) bought no coverage these 5 do not.
OPTIONS = [(kind, ExportOptions(dtype="fp16")) for kind in KINDS] + [
    ("sd1", ExportOptions(attention="sliced")),
    ("sd2", ExportOptions(dtype="fp16", attention="sliced", slices=4)),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind, options", OPTIONS, ids=lambda o: o if isinstance(o, str) else o.key())
def test_export_options_pass_the_parity_gate(exports, tiny, kind, options):
    folder = exports(kind, options)
    m = manifest(folder)
    assert (m["dtype"], m["attention"]) == (options.dtype, options.attention)
    assert set(m["components"]) == {"text_encoder", "unet", "vae_encoder", "vae_decoder", "vae_decoder_head",
                                    "vae_decoder_tail"}
    for c in m["components"].values():
        assert c["psnr"] is None or c["psnr"] >= ox.MIN_PSNR[options.dtype], c
        assert c["dtype"] == options.dtype
    unet = onnx.load(str(folder / "unet" / "model.onnx"))
    weights = [i.data_type for i in unet.graph.initializer if len(i.dims) == 4]  # conv kernels
    want = onnx.TensorProto.FLOAT16 if options.dtype == "fp16" else onnx.TensorProto.FLOAT
    assert weights and all(w == want for w in weights)
    assert {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}["sample"] == onnx.TensorProto.FLOAT
    # the variant is really in the graph: one softmax per slice
    softmaxes = sum(n.op_type == "Softmax" for n in unet.graph.node)
    standard = sum(n.op_type == "Softmax" for n in onnx.load(str(tiny(kind)[1] / "unet" / "model.onnx")).graph.node)
    assert softmaxes > standard if options.attention == "sliced" else softmaxes == standard


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_pictures_are_close_to_fp32(exports, tiny, kind):
    """The issue's bar: at least 30 dB between the images of the fp16 and fp32 exports (CPU provider)."""
    from pictures import centre_mask, scene

    extra = dict(image=scene(), mask_image=centre_mask()) if kind == "inpaint" else {}
    args = dict(prompt="a red circle", negative_prompt="blue", num_inference_steps=6, seed=3, **extra)
    fp32 = Pipeline.from_pretrained(tiny(kind)[1], backend="cpu")(**args).images[0]
    fp16 = Pipeline.from_pretrained(exports(kind, ExportOptions(dtype="fp16")), backend="cpu")(**args).images[0]
    assert psnr(np.asarray(fp16), np.asarray(fp32)) >= 30.0


def test_manifest_describes_each_component(tiny):
    folder = tiny("sd1")[1]
    m = manifest(folder)
    from edgediff import __version__
    from edgediff.engine.components import COMPONENTS

    assert m["edgediff_version"] == __version__
    assert m["source"]["sha256"] == ox.folder_hash(tiny("sd1")[0])
    specs = {s.name: s for s in COMPONENTS}
    for name, c in m["components"].items():
        spec = specs[name]
        assert [i["name"] for i in c["inputs"]] == [t.name for t in spec.inputs]
        assert [o["name"] for o in c["outputs"]] == [t.name for t in spec.outputs]
        # the graph and its data file (the UNet's and text encoders' weights are all in it: weight_map.json)
        assert c["bytes"] == sum(f.stat().st_size for f in (folder / name).glob("model.onnx*"))
        assert c["psnr"] is None or c["psnr"] >= 60
        assert c["parameters"] > 0 and c["format"] == "onnx"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny("sd1")[0] / "unet")
    assert m["components"]["unet"]["parameters"] == sum(p.numel() for p in unet.parameters())


# -- fp16 must not turn a VAE black ---------------------------------------------------------------

def test_fp16_vae_decoder_does_not_overflow(tiny, tmp_path):
    """SD's VAE decoder carries activations beyond fp16's 65504 in its residual stream: a plain fp16
    conversion gives inf/NaN (black images). A tiny VAE with its decoder input scaled into that range
    shows the export keeps those parts fp32, where the plain conversion breaks."""
    from diffusers import AutoencoderKL
    from onnxruntime.transformers.onnx_model import OnnxModel

    from edgediff.backends.base import OrtSession
    from edgediff.engine.components import VAE_DECODER

    src = tmp_path / "hot"
    shutil.copytree(tiny("sd1")[0], src)
    vae = AutoencoderKL.from_pretrained(src / "vae")
    with torch.no_grad():  # GroupNorm undoes the scale, so the picture is unchanged; the residual stream is not
        vae.decoder.conv_in.weight.mul_(8e4)
        vae.decoder.conv_in.bias.mul_(8e4)
    vae.save_pretrained(src / "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = vae.decode(z).sample.numpy()
        hidden = vae.decoder.conv_in(vae.post_quant_conv(z))
    assert float(hidden.abs().max()) > 65504 and np.isfinite(want).all()

    fp32 = tmp_path / "fp32"
    export_onnx(src, fp32, profile_memory=False, only=("vae_decoder",))  # the rest is not the point
    naive = OnnxModel(onnx.load(str(fp32 / "vae_decoder" / "model.onnx")))
    naive.convert_float_to_float16(keep_io_types=True)
    onnx.save(naive.model, str(tmp_path / "naive.onnx"))
    broken = OrtSession(tmp_path / "naive.onnx", VAE_DECODER, ["CPUExecutionProvider"]).run(latent_sample=z.numpy())
    assert not np.isfinite(broken["sample"]).all()  # the bug users know, reproduced

    fp16 = tmp_path / "fp16"
    m = export_onnx(src, fp16, ExportOptions(dtype="fp16"), profile_memory=False, only=("vae_decoder",))
    got = OrtSession(fp16 / "vae_decoder" / "model.onnx", VAE_DECODER,
                     ["CPUExecutionProvider"]).run(latent_sample=z.numpy())["sample"]
    assert np.isfinite(got).all()
    assert tensor_psnr(got, want)[0] >= 35
    assert m["components"]["vae_decoder"]["fp32_nodes"] > 0


@pytest.mark.slow
def test_calibration_measures_what_onnx_runtimes_calibrator_measures(tiny):
    """fp16's islands come from export/onnx_export._calibrate, a one-pass stand-in for ONNX Runtime's
    MinMax calibrator (whose probe placement is quadratic): the same tensors, the same largest values."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    rng = np.random.default_rng(0)
    cases = {"vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)},
             "unet": {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                      "timestep": np.array([981.0, 981.0], np.float32),
                      "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}}
    for component, inputs in cases.items():
        path = tiny("sd1")[1] / component / "model.onnx"
        ours = ox._calibrate(path, inputs)

        class One(CalibrationDataReader):
            left = [inputs]

            def get_next(self):
                return self.left.pop() if self.left else None

        calibrator = create_calibrator(path, augmented_model_path=path.with_name(".ort-calibrate.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(One())
        theirs = {name: max(abs(float(np.min(r.range_value[0]))), abs(float(np.max(r.range_value[1]))))
                  for name, r in calibrator.compute_data().data.items()}
        theirs = {k: v for k, v in theirs.items() if v < 1e30}
        path.with_name(".ort-calibrate.onnx").unlink()
        assert len(ours) > 50 and ours.keys() == theirs.keys(), component
        for name, value in ours.items():
            assert value == pytest.approx(theirs[name], rel=1e-6, abs=1e-30), (component, name)
        assert not any(p.name.startswith(".calibrate") for p in path.parent.iterdir())


# -- the gate, the output folder, the disk --------------------------------------------------------

def test_gate_failure_leaves_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(ox.MIN_PSNR, "fp32", 500.0)  # above what any real export reaches (about 125 dB)
    with pytest.raises(EdgediffError, match="below the 500 dB gate"):
        export_onnx(tiny("sd1")[0], tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_holding_something_else_is_refused_unless_forced(tiny, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EdgediffError, match="already holds 1 other entries.*--force"):
        export_onnx(tiny("sd1")[0], out)
    assert (out / "notes.txt").read_text() == "mine"
    export_onnx(tiny("sd1")[0], out, force=True, profile_memory=False)
    assert (out / "edgediff.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_no_space_left_mid_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    real = torch.onnx.export

    def fills_the_disk(module, args, path, **kw):
        if "unet" in str(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)  # half-written, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(module, args, path, **kw)
    monkeypatch.setattr(torch.onnx, "export", fills_the_disk)
    with pytest.raises(EdgediffError, match="no space left"):
        export_onnx(tiny("sd1")[0], tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_unknown_options_are_refused():
    with pytest.raises(EdgediffError, match="unknown dtype"):
        ExportOptions(dtype="int4")
    with pytest.raises(EdgediffError, match="unknown attention"):
        ExportOptions(attention="flash")
    with pytest.raises(EdgediffError, match="power of two"):
        ExportOptions(attention="sliced", slices=3)


@pytest.mark.slow
def test_default_attention_is_one_fused_node_per_layer(exports, tiny):
    """The default export writes ONNX Runtime's MultiHeadAttention, one per attention layer, and no
    softmax of its own in the UNet; --attention standard keeps the plain graph, with the same outputs."""
    fused = onnx.load(str(tiny("sd1")[1] / "unet" / "model.onnx"))
    ops = [n.op_type for n in fused.graph.node]
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    unet = UNet2DConditionModel.from_pretrained(tiny("sd1")[0] / "unet")
    layers = sum(isinstance(m, Attention) for m in unet.modules())
    assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
    standard = exports("sd1", ExportOptions(attention="standard"))
    plain = [n.op_type for n in onnx.load(str(standard / "unet" / "model.onnx")).graph.node]
    assert "MultiHeadAttention" not in plain and plain.count("Softmax") == layers
    args = dict(prompt="a red circle", num_inference_steps=4, seed=3)
    a = Pipeline.from_pretrained(tiny("sd1")[1], backend="cpu")(**args).images[0]
    b = Pipeline.from_pretrained(standard, backend="cpu")(**args).images[0]
    assert psnr(np.asarray(a), np.asarray(b)) >= 45.0


@pytest.mark.slow
def test_int8_export_quantizes_the_unet_only(builtin_model):
    """--dtype int8: the UNet's convolutions and matmuls get int8 weights, calibrated on generations; the
    rest stays fp32; the UNet passes its gate against the fp32 graph; the picture stays close."""
    from edgediff.export.sources import ensure_exported

    out = ensure_exported("builtin", ExportOptions(dtype="int8"))  # shared with tests/test_semantic.py
    m = manifest(out)
    unet = m["components"]["unet"]
    assert m["dtype"] == "int8" and unet["dtype"] == "int8" and unet["psnr"] >= ox.MIN_PSNR["int8"]
    assert unet["extra"]["calibration"]["calls"] > 0
    from edgediff.backends.host import int8_kernels

    assert unet["extra"]["int8_kernels"] == int8_kernels()  # the kernels the gate's figure was measured with
    assert all(c["dtype"] == "fp32" for name, c in m["components"].items() if name != "unet")
    # beside the fp32 decoder, an int8 one with its figure against it on held-out latents
    decoder = m["components"]["vae_decoder"]["extra"]["int8"]
    int8_decoder = onnx.load(str(out / "vae_decoder" / decoder["file"]))
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in int8_decoder.graph.initializer)
    kept = [n.name for n in int8_decoder.graph.node if n.op_type == "Conv" and "conv_out" in n.name]
    assert kept and not any(n.op_type == "DequantizeLinear" and "conv_out" in n.name for n in int8_decoder.graph.node)
    from edgediff.export.quantize import CALIBRATION_PROMPTS

    assert decoder["psnr"] >= 25 and decoder["calibration_latents"] == len(CALIBRATION_PROMPTS)
    graph = onnx.load(str(out / "unet" / "model.onnx"))
    # the layers whose inputs would lose most to uint8, measured, stay fp32: none of their inputs is dequantized
    layers = unet["extra"]["fp32_layers"]
    kept = [name for name, db in layers["worst"] if db < layers["floor"]]
    assert layers["floor"] == quantize.INT8_MIN_SQNR and 0 < layers["kept"] < layers["nodes"] and len(kept) == min(layers["kept"], 10)
    dequantized = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    nodes = {n.name: n for n in graph.graph.node}
    assert all(not set(nodes[name].input) & dequantized for name in kept)
    assert any(set(n.input) & dequantized for n in graph.graph.node if n.op_type == "MatMul")
    int8_weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert len(int8_weights) >= len(convs) - 1  # every conv kernel (conv_in may be left fp32)
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    fp32 = builtin_model
    args = dict(prompt="a red circle on a blue square", num_inference_steps=12, seed=3)
    pipe = Pipeline.from_pretrained(out, backend="cpu")
    a = pipe(**args).images[0]
    b = Pipeline.from_pretrained(fp32, backend="cpu")(**args).images[0]
    assert psnr(np.asarray(a), np.asarray(b)) >= 25.0
    c = pipe(**args, vae_decoder="int8")
    assert 25.0 <= psnr(np.asarray(c.images[0]), np.asarray(a)) < float("inf")  # the int8 decode of the same latents
    assert "VAE: int8" in c.parameters[0].a1111()
    with pytest.raises(EdgediffError) as e:  # an fp32 export has no int8 decoder
        Pipeline.from_pretrained(fp32, backend="cpu")(**args, vae_decoder="int8")
    assert "has no int8 VAE decoder" in str(e.value) and "--dtype int8" in str(e.value)


@pytest.mark.parametrize("flags, kernels", [
    ("fpu sse2 avx avx2 fma avx512f avx512_vnni amx_bf16 amx_tile amx_int8", "amx"),  # Sapphire Rapids
    ("fpu avx avx2 avx512f avx512_vnni avx512_bf16", "vnni"),  # Zen 4
    ("fpu avx avx2 avx_vnni", "vnni"),  # Alder Lake
    ("fpu avx avx2 fma f16c", "avx2"),  # Zen 2 EPYC
    ("fpu sse2 sse4_2", "other"),
])
def test_int8_kernels_from_the_cpu_flags(flags, kernels):
    from edgediff.backends.host import int8_kernels

    assert int8_kernels(f"processor\t: 0\nflags\t\t: {flags}\n") == kernels
    assert int8_kernels("Processor\t: ARMv8\nFeatures\t: fp asimd\n") is None  # no x86 flags line


def test_int8_unet_on_other_int8_kernels_is_warned_about(tiny, tmp_path, monkeypatch, caplog):
    """An int8 UNet's export figure holds for the int8 kernels of the CPU that measured it: on a CPU
    with other kernels (AVX2's saturate where VNNI's do not), loading it says so."""
    import shutil

    from edgediff.backends import host

    folder = shutil.copytree(tiny("sd1")[1], tmp_path / "int8")
    m = manifest(folder)
    m["components"]["unet"].update(dtype="int8", psnr=42.5, extra={"int8_kernels": "amx"})
    (folder / "edgediff.json").write_text(json.dumps(m))
    for here, warned in (("avx2", True), ("amx", False), (None, False)):
        monkeypatch.setattr(host, "int8_kernels", lambda cpuinfo=None, here=here: here)
        caplog.clear()
        with caplog.at_level("WARNING", logger="edgediff"):
            Pipeline.from_pretrained(folder, backend="cpu", safety_checker=False)
        said = "calibrated and gated (42.5 dB) on a CPU with AMX int8 kernels; this one runs AVX2 kernels"
        assert (said in caplog.text) == warned, caplog.text


@pytest.mark.slow
def test_int8_export_for_avx2_kernels_uses_7_bit_weights(tiny, tmp_path, monkeypatch):
    """On a CPU whose int8 kernels are AVX2's (u8 x s8 pairs summed in int16, which saturate), the
    quantizer gets reduce_range: weights in 7 bits, never beyond +-64; on a VNNI CPU, the full 8 bits."""
    from edgediff.backends import host

    def int8_weights(folder):
        graph = onnx.load(str(folder / "unet" / "model.onnx"))
        return np.concatenate([onnx.numpy_helper.to_array(i).ravel() for i in graph.graph.initializer
                               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4])

    found = {}
    for kernels in ("avx2", "vnni"):
        monkeypatch.setattr(host, "int8_kernels", lambda cpuinfo=None, k=kernels: k)
        out = tmp_path / kernels
        m = export_onnx(tiny("sd1")[0], out, ExportOptions(dtype="int8"), profile_memory=False)
        unet = m["components"]["unet"]
        assert unet["extra"]["int8_kernels"] == kernels and unet["extra"]["reduce_range"] == (kernels == "avx2")
        assert m["components"]["vae_decoder"]["extra"]["int8"]["reduce_range"] == (kernels == "avx2")
        found[kernels] = int8_weights(out)
    assert np.abs(found["avx2"].astype(int)).max() <= 64
    assert np.abs(found["vnni"].astype(int)).max() == 127
