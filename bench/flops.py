"""Arithmetic of an ONNX graph at a given size, counted from the graph itself.

    python -m edgediff.bench.flops MODEL_FOLDER --width 512 --height 512 [--batch 1] [--no-cfg]

The UNet's inputs are fixed to the protocol's shapes, ONNX Runtime's symbolic shape inference gives every
tensor's shape, and each Conv, ConvTranspose, MatMul, Gemm, Einsum and (ONNX Runtime's) MultiHeadAttention is counted as multiply-accumulates
x 2. Nothing else is counted (bias adds, normalisation, softmax, activations: a few percent of SD's UNet),
so the figure is the work the matrix units must do, and achieved FLOP/s = this / measured time is a
slight underestimate of the work done. Only the graph's structure is read: weights stay on disk.
"""

from __future__ import annotations

import argparse
import re
from math import prod
from pathlib import Path

from ..engine.errors import EdgediffError
from ..engine.tokenizer import CLIP_CONTEXT

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "MultiHeadAttention")


def unet_flops(unet: Path, width: int, height: int, batch: int = 1, cfg: bool = True,
               vae_scale_factor: int = 8) -> int:
    """FLOPs of one UNet evaluation for one denoising step of `batch` images: with CFG the UNet sees 2 x
    batch (batched, or in two calls of `batch`: the same work)."""
    n = 2 * batch if cfg else batch
    return graph_flops(unet, {"sample": {0: n, 2: height // vae_scale_factor, 3: width // vae_scale_factor},
                              "timestep": {0: n},
                              "encoder_hidden_states": {0: n, 1: CLIP_CONTEXT},
                              # SDXL's added conditioning (absent from SD's graphs: ignored there)
                              "text_embeds": {0: n}, "time_ids": {0: n}})


def graph_flops(path: Path, dims: dict[str, dict[int, int]]) -> int:
    """2 x the multiply-accumulates of the graph at `path` with input dimensions fixed by `dims`
    ({input name: {axis: size}}; unnamed axes must already be fixed in the graph)."""
    try:
        import onnx

        SymbolicShapeInference = _symbolic_shape_inference()
    except ImportError as e:
        raise EdgediffError(f"counting FLOPs needs the onnx package ({e}); pip install onnx") from None
    model = onnx.load(str(path), load_external_data=False)  # structure only: the weights' shapes are in it
    for value in model.graph.input:
        fixed = dims.get(value.name, {})
        shape = value.type.tensor_type.shape
        for axis, size in fixed.items():
            if axis < len(shape.dim):
                shape.dim[axis].Clear()
                shape.dim[axis].dim_value = size
    del model.graph.value_info[:]
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = _shapes(inferred.graph)
    total = 0
    for node in inferred.graph.node:
        if node.op_type in COUNTED:
            total += _macs(node, shapes)
    return 2 * total


def _symbolic_shape_inference():
    """ONNX Runtime's SymbolicShapeInference, loaded from its file: the package onnxruntime.tools imports
    torch whenever torch is installed (for its PyTorch export helpers), and the benchmark's parent process
    must not; the module itself needs only numpy, onnx, sympy and packaging."""
    import importlib.util
    import sys

    import onnxruntime

    name = "_edgediff_ort_symbolic_shape_infer"
    if name not in sys.modules:
        path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or not path.is_file():
            raise ImportError(f"this onnxruntime has no {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].SymbolicShapeInference


def _shapes(graph) -> dict[str, list[int | None]]:
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _macs(node, shapes: dict) -> int:
    def shape(i: int, outputs=False) -> list[int]:
        name = (node.output if outputs else node.input)[i]
        s = shapes.get(name)
        if s is None or any(d is None for d in s):
            raise EdgediffError(f"shape inference left {node.op_type} node {node.name!r}'s tensor {name!r} "
                                f"with an unknown shape ({s}); cannot count its FLOPs")
        return s

    out = shape(0, outputs=True)
    if node.op_type == "Conv":  # W: (M, C/group, k...) ; out: (N, M, spatial...)
        return prod(out) * prod(shape(1)[1:])
    if node.op_type == "ConvTranspose":  # W: (C, M/group, k...) ; every input pixel scatters a kernel
        x, w = shape(0), shape(1)
        return prod(x) * prod(w[1:])
    if node.op_type == "MatMul":  # (..., M, K) @ (..., K, N)
        a = shape(0)
        return prod(out) * a[-1]
    if node.op_type == "Gemm":
        a = shape(0)
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return prod(out) * (a[0] if trans_a else a[1])
    if node.op_type == "MultiHeadAttention":  # ONNX Runtime's fused attention: Q K^T, then (scores) V
        q, k = shape(0), shape(1)  # (B, S, D), (B, L, D): D = heads x head size
        return 2 * q[0] * q[1] * k[1] * q[2]
    if node.op_type == "Einsum":  # a binary contraction: one MAC per combination of every index
        equation = next(attr.s.decode() for attr in node.attribute if attr.name == "equation")
        terms = re.split(r",", equation.split("->")[0].replace(" ", ""))
        sizes: dict[str, int] = {}
        for i, term in enumerate(terms):
            if "..." in term:
                raise EdgediffError(f"Einsum {equation!r} with an ellipsis is not counted")
            sizes.update(zip(term, shape(i)))
        return prod(sizes.values())
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgediff.bench.flops", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="an exported model folder (its unet/model.onnx is counted)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-cfg", action="store_true", help="the UNet sees the batch once, not twice")
    args = p.parse_args(argv)
    flops = unet_flops(args.model / "unet" / "model.onnx", args.width, args.height, args.batch, not args.no_cfg)
    print(f"UNet, {args.width}x{args.height}, batch {args.batch}{'' if args.no_cfg else ' with CFG'}: "
          f"{flops / 1e9:.1f} GFLOP per denoising step (Conv, MatMul, Gemm, Einsum, MultiHeadAttention MACs x 2)")


if __name__ == "__main__":
    main()
