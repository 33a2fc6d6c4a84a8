"""How much activation memory a component's graph needs, by size, measured on the graph at export time.

The planner (engine/plan.py) must predict peaks before anything is loaded, and the runtime has no
`onnx` package to read graphs with. So the export does it once: it fixes the graph's inputs to a few
small sizes, infers every tensor's shape with ONNX Runtime's symbolic shape inference, and walks the
nodes in their (topological) order, freeing each tensor after its last reader, as ONNX Runtime's
allocation planner does. The largest live set at each size is then fitted as

    peak(batch, A) = batch * (c1 * A + c2 * A^2)        A = latent height x width (1 for the text encoder)

the A^2 term being attention's score matrices, which is what makes large images run out of memory.
The coefficients go into edgediff.json; the runtime evaluates the polynomial for any size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..engine.components import HIDDEN_SCALE, ComponentSpec
from ..engine.tokenizer import CLIP_CONTEXT

log = logging.getLogger("edgediff")

# Latent sides to measure at; small enough that shape inference of a full UNet takes seconds, varied
# enough to separate the linear and quadratic terms.
SIDES = (8, 16, 24)
BYTES = {1: 4, 10: 2, 7: 8, 6: 4, 9: 1, 11: 8, 16: 2, 2: 1, 3: 1}  # ONNX TensorProto dtype -> bytes


def profile(path: Path, spec: ComponentSpec, vae_scale: int, sequence: int = CLIP_CONTEXT) -> dict:
    """{"fit": [c0, c1, c2], "samples": [[side, peak], ...]} for `spec`'s graph at `path`, measured at
    batch 1: every tensor but the weights scales with the batch. The text encoder's size does not depend
    on the image: its fit is [0, peak, 0], evaluated with A = 1."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the graph only; weights stay on disk
    sides = SIDES if spec.image_sized else SIDES[:1]
    try:
        samples = [(side, _peak(model, spec, 1, side, vae_scale, sequence)) for side in sides]
    except Exception as e:  # shape inference is a tool's best effort: the planner has fallbacks
        log.warning("could not profile the %s's memory (%s: %s); the planner will use SD 1.5's profile",
                    spec.name, type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
        return {}
    if not spec.image_sized:
        return {"fit": [0.0, float(samples[0][1]), 0.0], "samples": [list(s) for s in samples]}
    a = np.array([[s * s, (s * s) ** 2] for s, _ in samples], dtype=np.float64)
    y = np.array([p for _, p in samples], dtype=np.float64)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    if coef[1] < 0:  # no quadratic term (fused attention holds no score matrix): a line, not a downturn
        coef = [float(np.linalg.lstsq(a[:, :1], y, rcond=None)[0][0]), 0.0]
    return {"fit": [0.0, float(coef[0]), float(coef[1])], "samples": [list(s) for s in samples]}


def evaluate(fit: list[float], batch: int, latent_height: int, latent_width: int) -> int:
    c0, c1, c2 = fit
    area = latent_height * latent_width
    return int(max(0.0, c0 + batch * (c1 * area + c2 * area * area)))


def _peak(model, spec: ComponentSpec, batch: int, side: int, vae_scale: int, sequence: int) -> int:
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    sizes = {"batch": batch, "sequence": sequence, "height": side, "width": side,
             "image_height": side * vae_scale, "image_width": side * vae_scale,
             "hidden_height": side * HIDDEN_SCALE, "hidden_width": side * HIDDEN_SCALE}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for graph_input in fixed.graph.input:
        for dim in graph_input.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    inferred = SymbolicShapeInference.infer_shapes(fixed, auto_merge=True)
    sizes_of = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if dims and None not in dims:
            sizes_of[v.name] = int(np.prod(dims)) * BYTES.get(t.elem_type, 4)
        elif not dims and t.elem_type:
            sizes_of[v.name] = BYTES.get(t.elem_type, 4)
    initializers = {i.name for i in inferred.graph.initializer}
    # A quantized graph dequantizes its int8 weights with DequantizeLinear nodes; ONNX Runtime fuses each
    # into the QLinearConv or QLinearMatMul that reads it, so the fp32 copies never exist: weights here.
    for node in inferred.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            initializers.update(node.output)
            sizes_of.update({o: 0 for o in node.output})
    nodes = list(inferred.graph.node)
    last_use = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = k
    outputs = {o.name for o in inferred.graph.output}
    live = sum(sizes_of.get(i.name, 0) for i in inferred.graph.input)
    peak = live
    for k, node in enumerate(nodes):
        if node.op_type == "Constant":
            continue
        live += sum(sizes_of.get(o, 0) for o in node.output)
        peak = max(peak, live)
        for name in set(node.input):
            if name and name not in initializers and last_use.get(name) == k and name not in outputs:
                live -= sizes_of.get(name, 0)
        for o in node.output:
            if o not in last_use and o not in outputs:  # written and never read
                live -= sizes_of.get(o, 0)
    return int(peak)
