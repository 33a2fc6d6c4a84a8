"""Where each PyTorch weight of the UNet and the text encoders ends up in the exported graph, so that the
runtime can change weights (LoRAs, textual-inversion embeddings) without PyTorch and without exporting
again (engine/adapters.py).

The TorchScript exporter keeps a parameter's name when the graph uses it as it is (convolutions, the
token-embedding table) and folds it into a new, anonymous initializer when it does not: a Linear layer
becomes MatMul(x, W^T), and its weight the folded `onnx::MatMul_1234`, transposed. The names of those
cannot be predicted, so each is found by value: same shape (transposed), same numbers at 64 sampled
positions. The fp16 conversion keeps initializer names (it casts them in place), so the map made on the
fp32 graph holds after it; the final graph is read again for each weight's dtype.

Every mapped weight is stored in the component's `model.onnx_data`, whatever its size, and the map
records its byte offset there: the runtime reads the few weights a LoRA touches straight from that file,
with numpy, and never parses the graph (the run-time install has no `onnx`).

    <component>/weight_map.json
      {"format": 1, "file": "model.onnx_data", "embedding_slots": [49408, 1024] (text encoders),
       "weights": {"down_blocks.0.attentions.0.proj_in.weight": ["<initializer>", "T" or "", "float16",
                                                                [320, 320], offset, length], ...}}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("edgediff")

WEIGHT_MAP = "weight_map.json"
DATA_FILE = "model.onnx_data"
# Rows added to each text encoder's token-embedding table at export, zero, for textual-inversion vectors:
# ONNX Runtime overrides an initializer only with one of the same shape, so the table cannot grow at load
# time. 1024 rows cost 3 MB (CLIP ViT-L) or 5 MB (bigG) and hold more embeddings than a prompt can use
# (CLIP reads 75 tokens).
EMBEDDING_SLOTS = 1024
TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"
SAMPLES = 64  # values compared per candidate weight: random and trained weights never agree on all of them
_DTYPES = {1: "float32", 10: "float16"}  # TensorProto data types


def canonical(name: str, text: bool) -> str:
    """A parameter's name as diffusers and transformers (before 5.6) spell it, which is what LoRA files
    use: without our wrapper's `m.`, and with CLIP's `text_model.` prefix, which transformers 5.6 dropped."""
    name = name.removeprefix("m.")
    if text and not name.startswith(("text_model.", "text_projection.")):
        name = "text_model." + name
    return name


def reserve_embedding_slots(model) -> tuple[int, int]:
    """Grow a transformers CLIP text model's token table by EMBEDDING_SLOTS zero rows; (first slot, count).
    Ordinary token ids never reach the new rows, so the graph computes what the model did."""
    import torch

    table = model.get_input_embeddings()
    first = table.weight.shape[0]
    grown = torch.nn.Embedding(first + EMBEDDING_SLOTS, table.weight.shape[1], dtype=table.weight.dtype)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[:first] = table.weight
    model.set_input_embeddings(grown)
    return first, EMBEDDING_SLOTS


def trace(module, path: Path, text: bool) -> dict[str, tuple[str, bool]]:
    """{parameter: (initializer, transposed)} for every weight of two or more dimensions of `module`
    (our export wrapper) in the fp32 graph just written at `path`."""
    import onnx
    from onnx import numpy_helper

    params = {canonical(n, text): p.detach().numpy() for n, p in module.named_parameters() if p.dim() >= 2}
    by_shape: dict[tuple, list[str]] = {}
    for name, value in params.items():
        by_shape.setdefault(tuple(value.shape), []).append(name)
    graph = onnx.load(str(path), load_external_data=False).graph
    found: dict[str, list[tuple[str, bool]]] = {}
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
            continue
        dims = tuple(init.dims)
        name = canonical(init.name, text)
        if name in params and params[name].shape == dims:
            found.setdefault(name, []).append((init.name, False))
            continue
        candidates = by_shape.get(dims[::-1], []) if len(dims) == 2 else []
        if not candidates:
            continue
        value = numpy_helper.to_array(init, base_dir=str(path.parent))
        flat = np.linspace(0, value.size - 1, min(SAMPLES, value.size)).astype(np.int64)
        rows, cols = np.unravel_index(flat, value.shape)
        sample = value[rows, cols]
        for candidate in candidates:
            if np.array_equal(params[candidate][cols, rows], sample):
                found.setdefault(candidate, []).append((init.name, True))
    # A weight found twice (two initializers agree with it), or an initializer two weights agree with
    # (the exporter shares equal constants), cannot be changed alone: such weights stay unmapped.
    owners: dict[str, int] = {}
    for places in found.values():
        for init, _ in places:
            owners[init] = owners.get(init, 0) + 1
    mapped = {p: places[0] for p, places in found.items() if len(places) == 1 and owners[places[0][0]] == 1}
    unmapped = sorted(set(params) - set(mapped))
    if unmapped:
        log.debug("%s: %d weights not found in the graph, e.g. %s", path.parent.name, len(unmapped), unmapped[:3])
    return mapped


def write(path: Path, traced: dict[str, tuple[str, bool]], shapes: dict[str, tuple[int, ...]],
          embedding_slots: tuple[int, int] | None = None, keep: tuple[str, ...] = ()) -> dict:
    """Store the final graph at `path` with every traced weight in its data file, and write
    `weight_map.json` beside it. Files of the folder other than the graph and `keep` are the exporter's
    one-file-per-weight output above 2 GB: gathered into the one data file too. Returns the map."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data, set_external_data

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    wanted = {init for init, _ in traced.values() if init in inits}
    stray = [f for f in path.parent.iterdir() if f.name not in (path.name, DATA_FILE, WEIGHT_MAP, *keep)]

    def outside(t) -> bool:
        entries = {e.key: e.value for e in t.external_data}
        return t.data_location == onnx.TensorProto.EXTERNAL and entries.get("location") == DATA_FILE

    if stray or not all(outside(inits[i]) for i in wanted):
        model = onnx.load(str(path))  # with its data, written again below
        for f in (*stray, path.parent / DATA_FILE):
            f.unlink(missing_ok=True)
        # Weights over 1 MB go to the data file, as export/onnx_export._consolidate does, and so does every
        # traced weight, whatever its size
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=DATA_FILE,
                                       size_threshold=1 << 20)
        for t in model.graph.initializer:
            if t.name in wanted and not outside(t):
                set_external_data(t, DATA_FILE)
        onnx.save_model(model, str(path))
        del model
        inits = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    weights = {}
    for param, (init, transposed) in sorted(traced.items()):
        t = inits.get(init)
        if t is None or t.data_type not in _DTYPES or not outside(t):
            continue  # the fp16 conversion replaced it: this weight cannot be changed at load time
        entries = {e.key: e.value for e in t.external_data}
        weights[param] = [init, "T" if transposed else "", _DTYPES[t.data_type], list(shapes[param]),
                          int(entries.get("offset", 0)), int(entries["length"])]
    record = {"format": 1, "file": DATA_FILE, "weights": weights}
    if embedding_slots is not None and TOKEN_TABLE in weights:
        record["embedding_slots"] = list(embedding_slots)
    (path.parent / WEIGHT_MAP).write_text(json.dumps(record, separators=(",", ":")))
    return record


def mark_quantized(path: Path) -> None:
    """The component's weights were quantized after the map was made: its offsets no longer hold."""
    if path.is_file():
        record = json.loads(path.read_text())
        record["quantized"] = True
        path.write_text(json.dumps(record, separators=(",", ":")))


def source_weights(src: Path, family) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {parameter: shape}} of a diffusers folder's UNet and text encoders, from the
    safetensors headers alone (nothing is loaded)."""
    from safetensors import safe_open

    out = {}
    for spec, text in ((family.unet, False), *((t.spec, True) for t in family.text_encoders)):
        files = sorted((src / spec.name).glob("*.safetensors"))
        if not files:
            from ..engine.errors import EdgediffError

            raise EdgediffError(f"{src / spec.name} has no .safetensors weights, which --lora needs to match "
                                "the LoRA's keys; convert the folder's weights to safetensors")
        shapes = {}
        for f in files:
            with safe_open(str(f), framework="numpy") as weights:
                for name in weights.keys():
                    shape = tuple(weights.get_slice(name).get_shape())
                    if len(shape) >= 2:
                        shapes[canonical(name, text)] = shape
        out[spec.name] = shapes
    return out


def bake_plan(src: Path, family, unet_config: dict, loras) -> dict[str, list]:
    """{component: [(parameter, layer, weight), ...]}: what `bake` adds, for LoRAs ((path, weight), ...)
    matched against the source's weights before any export starts (a LoRA that does not fit is refused
    now, not after an hour of export)."""
    from ..engine.adapters import Targets, Weight, match, read_lora

    weights = {(c, p): Weight(c, p, p, False, "float32", shape, None)
               for c, params in source_weights(src, family).items() for p, shape in params.items()}
    targets = Targets.of(family, weights, unet_config)
    plan: dict[str, list] = {}
    for path, weight in loras:
        lora = read_lora(path)
        for (component, param), layer in match(lora, targets).items():
            plan.setdefault(component, []).append((param, layer, weight))
        log.info("baking LoRA %s at %g", lora.name, weight)
    return plan


def lora_hashes(loras) -> list[str]:
    from ..engine.adapters import read_lora

    return [read_lora(path).hash for path, _ in loras]


def bake(model, plan: list | None, text: bool) -> None:
    """Add each planned LoRA delta to `model`'s PyTorch weight (in fp32)."""
    import torch

    if not plan:
        return
    params = {canonical(n, text): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for param, layer, weight in plan:
            p = params[param]
            p += torch.from_numpy(layer.delta(tuple(p.shape)) * np.float32(weight)).to(p.dtype)
