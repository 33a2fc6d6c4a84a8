"""Statistics of a graph's intermediate tensors on sample inputs, measured by ONNX Runtime in one pass.

The fp16 export needs each tensor's largest magnitude (which values overflow fp16); the int8 export each
activation's range and mean square (how much uint8 rounding over that range costs it). ONNX Runtime's
own tools could measure both, but its MinMax calibrator places its probes by searching the node list
once per tensor (quadratic: 18 of a tiny model's 51 s fp16 export on two cores) and its qdq_loss_debug
returns the tensors themselves (GBs for a full-size UNet). Here each probed tensor gets its reductions
right after the node that makes it, in one pass, so ONNX Runtime frees the tensor as it would without
the probe: a full-size UNet's intermediates are never held at once. The weights stay where they are (an
augmented copy of the graph beside it, deleted after).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# reduction -> (ONNX ops applied in turn, how the values of several calls combine)
REDUCTIONS = {
    "absmax": (("Abs", "ReduceMax"), max),
    "min": (("ReduceMin",), min),
    "max": (("ReduceMax",), max),
    "meansq": (("Square", "ReduceMean"), lambda values: sum(values) / len(values)),
}


def tensor_statistics(path: Path, calls: list[dict], reductions: tuple[str, ...] = ("absmax",),
                      select: Callable[[object], list[str]] | None = None) -> dict[str, dict[str, float]]:
    """{tensor: {reduction: value}} over `calls` (each a dict of the graph's inputs) for the float
    tensors `select(node)` names among each node's inputs and outputs (default: every float tensor the
    graph computes, and its float inputs), weights aside."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input, *inferred.output)
             if v.type.HasField("tensor_type")}
    weights = {i.name for i in model.graph.initializer}
    nodes, probes = [], {}  # (tensor, reduction) -> output name

    def probe(name: str) -> None:
        if not name or name in weights or types.get(name) not in (TensorProto.FLOAT, TensorProto.FLOAT16) or \
                any((name, r) in probes for r in reductions):
            return
        for reduction in reductions:
            value = name
            for k, op in enumerate(REDUCTIONS[reduction][0]):
                out = f"{name}/edgediff_{reduction}{k}"
                if op == "Square":
                    nodes.append(helper.make_node("Mul", [value, value], [out]))
                else:
                    nodes.append(helper.make_node(op, [value], [out], **({"keepdims": 0} if op.startswith("Reduce") else {})))
                value = out
            probes[(name, reduction)] = value

    if select is None:
        for graph_input in model.graph.input:
            probe(graph_input.name)
    for node in model.graph.node:
        if select is not None:  # a node's inputs exist before it runs: probe them first
            for name in select(node):
                if name in node.input:
                    probe(name)
        nodes.append(node)
        for name in (node.output if select is None else [n for n in select(node) if n in node.output]):
            probe(name)
    graph = model.graph
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]  # own copies: the field is cleared
    graph.ClearField("node")
    graph.node.extend(kept)
    graph.output.extend(helper.make_tensor_value_info(out, types[t], []) for (t, _), out in probes.items())
    augmented = path.with_name(".probes.onnx")  # beside the graph: its external weights resolve there
    found: dict[tuple[str, str], list[float]] = {key: [] for key in probes}
    try:
        onnx.save(model, str(augmented))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as exported
        options.log_severity_level = 3
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        feeds = {i.name for i in session.get_inputs()}
        for inputs in calls:
            values = session.run(list(probes.values()), {k: v for k, v in inputs.items() if k in feeds})
            for key, value in zip(probes, values):
                found[key].append(float(value))
        del session
    finally:
        augmented.unlink(missing_ok=True)
    out: dict[str, dict[str, float]] = {}
    for (tensor, reduction), values in found.items():
        out.setdefault(tensor, {})[reduction] = REDUCTIONS[reduction][1](values)
    return out
