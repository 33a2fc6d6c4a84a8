"""int8 UNet for CPUs: ONNX Runtime's static quantization, calibrated on the UNet's own inputs.

The UNet is almost all of a generation's time on a CPU, and nearly all of its time is convolutions
and matrix products. ONNX Runtime's static quantization (QDQ format: int8 weights per output channel,
uint8 activations, the U8S8 pairing its x86 kernels run with VNNI and AMX) turns both into integer
kernels once the session fuses the Q/DQ pairs. Dynamic quantization was measured to cover only the
MatMuls well (4.05 s against 5.2 s a call for SD 1.5 at 512x512 on 2 cores): its ConvInteger kernel
is no faster than fp32 convolutions, so the activations' ranges are calibrated up front instead.

Calibration data are the UNet's real inputs: edgediff generates a few images with the fp32 export
(CALIBRATION_PROMPTS, a small size and few steps, CFG on) and records every UNet call, so the ranges
cover the noise levels of a whole schedule and both halves of classifier-free guidance.

The text encoder and the VAE stay fp32: they run once per image, and the VAE is where a coarse
number shows as a ruined picture.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("edgediff")

CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a red circle on a blue square",
    "a close-up portrait of a cat, studio lighting",
    # more data (issue 15): the ranges of a few more pictures, of other kinds
    "an oil painting of a crowded market street at night",
    "a pencil sketch of a mountain landscape",
    "a green triangle on a white background",
    "a macro photograph of a dew drop on a leaf",
)
CALIBRATION_STEPS = 6
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# An activation quantized to uint8 over its calibrated range [lo, hi] gets rounding noise of
# ((hi - lo) / 255)^2 / 12; against its mean square that is its SQNR. A Gaussian spanning +-4 sigma
# keeps 41 dB; one whose range is stretched by outliers to +-13 sigma falls to 30 dB, and each halving
# of the range's use costs 6 dB more. The layers fed by an activation under this floor stay fp32.
# Measured on the sd15-256 protocol (SD 1.5 architecture, 20 Euler steps, the int8 picture against the
# fp32 one): floor 30 kept 17 of 282 layers fp32 (the feed-forward output MatMuls) and drew 25.4 dB;
# 33 kept 24 (+ the up blocks' 1x1 shortcut convolutions) and drew 32.5 dB; 36 kept 35 (+ the down- and
# upsampling convolutions, conv_in) and drew 40.7 dB; 40 kept 203 and drew 53.0 dB. 36 holds the
# issue's 30 dB with a margin for other models and CPUs while 87% of the layers stay int8.
INT8_MIN_SQNR = 36.0


HELD_OUT_PROMPT, HELD_OUT_STEPS = "a bowl of fruit on a wooden table", 2


def calibration_inputs(folder: Path, size: int, prompts=CALIBRATION_PROMPTS,
                       steps: int = CALIBRATION_STEPS, decoder: list | None = None) -> tuple[list[dict], dict]:
    """The UNet's inputs during generations with the fp32 export in `folder`, and the last UNet call
    of a short generation of HELD_OUT_PROMPT, kept apart for the gate: calibration never sees it.
    `decoder`, when given, gets the VAE decoder's input of each calibration generation (its final
    latents, unscaled) and then the held-out generation's, last."""
    from ..engine.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, backend="cpu", safety_checker=False)
    scale = np.float32(pipe.model.scaling_factor)

    def final(step, total, latents):  # the denoised latents, as the decoder receives them
        if decoder is not None and step + 1 == total:
            decoder.append({"latent_sample": np.array(latents) / scale})

    calls: list[dict] = []
    record = lambda inputs: calls.append({k: np.array(v) for k, v in inputs.items()})  # noqa: E731 (copies)
    for k, prompt in enumerate(prompts):
        pipe(prompt, width=size, height=size, num_inference_steps=steps, seed=k, scheduler="euler",
             unet_inputs=record, callback=final)
    held_out: list[dict] = []
    # the gate's generation runs the calibration's steps when the decoder is calibrated too: its final
    # latents are then a picture's, as the decoder sees them
    pipe(HELD_OUT_PROMPT, width=size, height=size, num_inference_steps=steps if decoder is not None else HELD_OUT_STEPS,
         seed=0, scheduler="euler", callback=final,
         unet_inputs=lambda inputs: held_out.append({k: np.array(v) for k, v in inputs.items()}))
    return calls, held_out[-1]


def sensitive_nodes(fp32: Path, calls: list[dict], floor: float = INT8_MIN_SQNR) -> tuple[list[str], dict]:
    """The quantizable nodes to keep fp32, measured: those with an activation input whose uint8
    quantization over its range on `calls` would have a SQNR under `floor` dB (see INT8_MIN_SQNR). Returns
    (node names, {"floor", "nodes", "kept", "worst": [(node, dB), ...]}) for the manifest."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    quantizable = [n for n in graph.node if n.op_type in QUANTIZED_OPS]
    activations = {n.name: [i for i in n.input[:2] if i and i not in weights] for n in quantizable}
    wanted = {t for names in activations.values() for t in names}
    from .probes import tensor_statistics

    stats = tensor_statistics(fp32, calls, ("min", "max", "meansq"),
                              select=lambda node: [i for i in node.input if i in wanted])

    def sqnr(tensor: str) -> float:
        s = stats.get(tensor)
        if not s:
            return float("inf")
        scale = (max(s["max"], 0.0) - min(s["min"], 0.0)) / 255
        noise = scale * scale / 12
        return float("inf") if noise == 0 else float(10 * np.log10(max(s["meansq"], 1e-30) / noise))

    scores = {name: min((sqnr(t) for t in tensors), default=float("inf")) for name, tensors in activations.items()}
    kept = sorted((n for n, v in scores.items() if v < floor), key=scores.get)
    worst = sorted(scores.items(), key=lambda kv: kv[1])[:10]
    return kept, {"floor": floor, "nodes": len(quantizable), "kept": len(kept),
                  "worst": [[n, round(v, 1)] for n, v in worst]}


def quantize_graph(fp32: Path, out: Path, calls: list[dict], exclude: tuple[str, ...] = (),
                  reduce_range: bool = False, keep: tuple[str, ...] = ()) -> None:
    """Write the int8 (QDQ) graph calibrated on `calls` to `out` (a model.onnx path): the UNet, or the VAE
    decoder. Nodes named in `keep`, or whose names match a pattern of `exclude`, stay fp32. `reduce_range`: 7-bit weights, for
    CPUs whose int8 kernels are AVX2's (backends/host.int8_kernels): pmaddubsw adds pairs of u8 x s8
    products in int16, which saturates with full-range weights and cannot with 7-bit ones (ONNX
    Runtime's quantization docs advise it for CPUs without VNNI)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = list(calls)

        def get_next(self):
            return self.left.pop() if self.left else None

    excluded = list(keep)
    if exclude:
        import re

        import onnx

        graph = onnx.load(str(fp32), load_external_data=False).graph
        excluded += [n.name for n in graph.node if any(re.search(p, n.name) for p in exclude)]
    quantize_static(
        str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=excluded, reduce_range=reduce_range,
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        # MinMax: the UNet's activations have no outliers worth clipping away on these inputs, and
        # entropy or percentile calibration hold every tensor's histogram (many GB for SD's UNet).
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=fp32.stat().st_size > 1_000_000_000 or (fp32.parent / "model.onnx_data").exists(),
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                       # the UNet's output projection feeds the sampler directly: keep its input exact
                       "ForceQuantizeNoInputCheck": False},
    )
