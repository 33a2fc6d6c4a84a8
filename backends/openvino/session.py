"""One exported component on OpenVINO: edgediff's ONNX graph, compiled once per set of input shapes.

OpenVINO reads the ONNX file itself (`Core.read_model`, external weights beside it), so nothing is
converted ahead of time. Each distinct set of input shapes gets a model reshaped to those static shapes
and compiled: static shapes are what OpenVINO's GPU plugin needs to run well and what lets its CPU
plugin pick its kernels and memory layout once. A plan calls each component with one or two shape sets
(the UNet's batch of both guidance halves, and of one half where they run apart), so each compiles once
and is kept by its shapes; the compiled models are also written to OpenVINO's cache (CACHE_DIR), so a
later process loads them instead of compiling again.

Measured on the 2-core CI machine (OpenVINO 2026.4.1, CPU plugin, f32), with a two-MatMul graph of
256 MiB of weights: the process grew by 545 MiB at its first compile (the file's weights, read through
a memory map and kept by the compiled model, plus the plugin's own copy) and by 257 MiB more at a second
batch size: each compiled shape set holds a copy of the weights. So the number kept is bounded
(MAX_COMPILED), the least recently used going first; one evicted comes back from the cache on disk.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ...engine.components import ComponentSpec
from ..base import EdgediffError, MissingComponent, Overrides, feed

log = logging.getLogger("edgediff")

# Shape sets kept compiled per session: a plan's UNet needs two (both guidance halves at once, and one
# half alone outside a guidance interval or in a lean plan), its VAE decoder one per tile size; four
# covers those, and bounds a long-lived pipeline that is asked for many sizes.
MAX_COMPILED = 4
# The first release whose ONNX reader converts com.microsoft.MultiHeadAttention, the node edgediff's
# default export (--attention fused) writes: 2025.1, 2025.4, 2026.0, 2026.1 and 2026.2 refuse it
# ("OpenVINO does not support the following ONNX operations"), 2026.3.0 and 2026.4.1 read it.
READS_FUSED_ATTENTION = "2026.3"


def reason(e: BaseException) -> str:
    """OpenVINO's message cut to one line: its last, where it says what went wrong ("OpenVINO does not
    support the following ONNX operations: ..."), after lines naming the C++ file that checked."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def read_model(core, path: Path, version: str):
    """The component's graph as OpenVINO reads it, or one line saying why it cannot."""
    if not path.is_file():
        raise MissingComponent(f"{path} is missing; export the model again with `edgediff export`")
    try:
        return core.read_model(str(path))
    except Exception as e:  # openvino raises RuntimeError and its own frontend exception types
        why = reason(e)
        if "MultiHeadAttention" in why:
            raise EdgediffError(f"OpenVINO {version} cannot read the fused attention (com.microsoft."
                                f"MultiHeadAttention) in {path}: pip install 'openvino>={READS_FUSED_ATTENTION}', "
                                "or export the model with `--attention standard`") from None
        raise EdgediffError(f"OpenVINO {version} cannot read {path} ({why}); export the model again with "
                            "`edgediff export`, or use --backend cpu") from None


def apply_overrides(model, overrides: Overrides, path: Path) -> None:
    """Put the LoRA-merged weights in place of the graph's. OpenVINO's ONNX reader makes each initializer
    a Constant named after it, so the weights are replaced by name in the model before it compiles (the
    file is not touched). The new Constants share the arrays' memory: the session holds `overrides`."""
    from openvino import op

    constants = {node.get_friendly_name(): node for node in model.get_ops() if node.get_type_name() == "Constant"}
    for name, value in overrides.values.items():
        old = constants.get(name)
        if old is None:
            raise EdgediffError(f"{path}: OpenVINO's reading of the graph has no weight {name!r} for a LoRA to "
                                "replace; use --backend cpu for LoRAs on this model")
        shape, dtype = tuple(old.get_output_shape(0)), old.get_element_type().to_dtype()
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise EdgediffError(f"{path}: the LoRA's weight for {name!r} is {value.dtype}{list(value.shape)}, the "
                                f"graph's is {dtype}{list(shape)}; use --backend cpu for LoRAs on this model")
        new = op.Constant(np.ascontiguousarray(value), shared_memory=True)
        new.set_friendly_name(name)
        old.output(0).replace(new.output(0))


class OpenVinoSession:
    """The `Session` protocol (backends/base.py) over OpenVINO. Inputs are checked by name and cast to the
    dtypes the graph declares, as OrtSession does (optimum's int32 input_ids, a 0-d timestep)."""

    def __init__(self, core, path: Path, spec: ComponentSpec, device_name: str, config: dict,
                 overrides: Overrides | None = None, version: str = "?", max_compiled: int = MAX_COMPILED):
        self._core = core
        self._model = read_model(core, path, version)
        self._overrides = overrides  # the Constants made from it share its arrays' memory
        if overrides:
            apply_overrides(self._model, overrides, path)
        self.spec = spec
        self.path = path
        self.device_name = device_name
        self.config = dict(config)  # what compile_model is given (tests read it)
        self.providers = (f"OpenVINO:{device_name}",)
        inputs = self._model.inputs
        self.input_types = {p.get_any_name(): np.dtype(p.get_element_type().to_dtype()) for p in inputs}
        # optimum-onnx exports the UNet's timestep as a 0-d scalar; edgediff's take one per batch row
        self.scalar_inputs = {p.get_any_name() for p in inputs if p.get_partial_shape().rank.is_static
                              and p.get_partial_shape().rank.get_length() == 0}
        self.output_names = [_output_name(p, spec) for p in self._model.outputs]
        self._max_compiled = max_compiled
        self._compiled: OrderedDict[tuple, object] = OrderedDict()  # shape key -> infer request
        self._kept: dict[str, np.ndarray] = {}
        self.compiles = 0  # models compiled (or loaded from the cache): tests check one per shape set

    def keep(self, name: str, array: np.ndarray) -> None:
        """Hold an input that stays the same across calls. OpenVINO copies host inputs to its device at
        each call; SD's kept inputs (the text embeddings, 2 x 77 x 768 floats) take microseconds to send,
        so they stay on the host rather than in the device's own tensors."""
        if name not in self.input_types:
            raise EdgediffError(f"{self.path}: the graph has no input {name!r} to keep "
                                f"(its inputs: {', '.join(self.input_types)})")
        self._kept[name] = self._feed(name, array)

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_types) - set(inputs) - set(self._kept)
        if missing:
            raise EdgediffError(f"{self.path}: the graph needs input(s) {sorted(missing)} that edgediff does "
                                f"not provide for {self.spec.name}; is this a Stable Diffusion export?")
        feeds = {name: self._feed(name, inputs[name]) if name in inputs else self._kept[name]
                 for name in self.input_types}
        request = self._request({name: value.shape for name, value in feeds.items()})
        # share_inputs: OpenVINO reads our (contiguous, cast) arrays in place; outputs are copied out of
        # the request's buffers, which the next call overwrites
        values = request.infer(feeds, share_inputs=True).to_tuple()
        return {name: np.asarray(v) for name, v in zip(self.output_names, values)}

    def _request(self, shapes: dict[str, tuple]):
        key = tuple(shapes.items())
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self._model.clone()
        model.reshape({name: list(shape) for name, shape in shapes.items()})
        try:
            compiled = self._core.compile_model(model, self.device_name, self.config)
        except Exception as e:
            raise EdgediffError(f"OpenVINO could not compile {self.path} for {self.device_name} at "
                                f"{', '.join(f'{n} {list(s)}' for n, s in shapes.items())} ({reason(e)}); "
                                "use --backend cpu") from None
        self.compiles += 1
        while len(self._compiled) >= self._max_compiled:
            self._compiled.popitem(last=False)
        self._compiled[key] = request = compiled.create_infer_request()
        return request

    def _feed(self, name: str, array: np.ndarray) -> np.ndarray:
        return feed(self.path, name, array, self.input_types[name], name in self.scalar_inputs)


def _output_name(port, spec: ComponentSpec) -> str:
    """The graph's name for an output. OpenVINO gives a tensor every name it had on the way (the ONNX
    output and the node that made it, "/m/Gather_6_output_0"), and any one may come first: the spec's
    name where it is one of them, else a name the exporter did not derive from a node path."""
    names = port.get_names()
    declared = [t.name for t in spec.outputs if t.name in names]
    if declared:
        return declared[0]
    plain = sorted(n for n in names if not n.startswith("/"))
    return plain[0] if plain else port.get_any_name()
