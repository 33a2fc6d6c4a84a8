"""LoRAs and textual-inversion embeddings, read and merged with numpy: no PyTorch, no export.

A LoRA changes a weight W of the UNet or a text encoder to W + w * (up @ down) * alpha / rank. The
export records where each weight lives in the graph (export/weight_map.py: the initializer, whether it
was transposed, its dtype, its byte range in model.onnx_data); this module reads the few weights a LoRA
touches from there, merges in fp32, casts back to the graph's dtype, and hands the results to ONNX
Runtime as overriding initializers when the component's session opens. The untouched weights are never
read here: the whole UNet is never held twice.

Formats, safetensors only (a pickle can run code when it is read, so .ckpt/.pt/.bin are refused):
- kohya / AUTOMATIC1111: `lora_unet_*`, `lora_te_*` (SDXL: `lora_te1_*`, `lora_te2_*`), each module's
  `lora_down.weight`, `lora_up.weight` and `alpha`; the UNet named as diffusers names it (kohya's SD 1.x
  and 2.x, LCM-LoRA) or as the original SGM/LDM code does (kohya's SDXL: `lora_unet_input_blocks_4_1_...`);
  convolutions too (LoCon).
- diffusers / PEFT: `unet.<module>.lora_A.weight` and `lora_B.weight`, `text_encoder.` and
  `text_encoder_2.` prefixes; diffusers' older attention-processor names (`processor.to_q_lora.down`).
- Embeddings: AUTOMATIC1111's and kohya's `emb_params`, diffusers' `{token: vectors}`, SDXL's
  `clip_l`/`clip_g` pairs; one vector or several. The trigger word is the file's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgediffError, first_line

log = logging.getLogger("edgediff")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"  # the rows embeddings are written into
WEIGHT_MAP = "weight_map.json"  # export/weight_map.py writes it into each mapped component's folder
# safetensors' dtype names -> numpy; BF16 is widened by hand (numpy has no bfloat16)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32}

# How each key of a LoRA file ends, and the part of the low-rank pair it holds. PEFT's keys may carry an
# adapter name (`lora_A.default.weight`).
_ROLES = (
    (re.compile(r"\.lora_down\.weight$"), "down"), (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.lora_A(\.[\w-]+)?\.weight$"), "down"), (re.compile(r"\.lora_B(\.[\w-]+)?\.weight$"), "up"),
    (re.compile(r"\.lora(_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"\.lora(_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"_lora\.down\.weight$"), "down"), (re.compile(r"_lora\.up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"), (re.compile(r"\.lora_mid\.weight$"), "mid"),
)
# LyCORIS's other decompositions and DoRA: recognised, to say plainly that they are not applied.
_OTHER_KINDS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "dora_scale": "DoRA",
                "lora_mid": "LoCon with a Tucker core (lora_mid)", "diff": "a full weight difference"}
# diffusers' attention-processor LoRAs name the projection's LoRA after the projection
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)(_lora)?$")


# -- reading files ------------------------------------------------------------------------------------

def refuse_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EdgediffError(f"{path.name} is a pickle ({path.suffix}): reading one can run any code it holds, so "
                            f"edgediff reads {what}s only as .safetensors; convert it, or get the .safetensors "
                            "release of it")


def read_safetensors(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, str], int]:
    """(tensors as fp32 numpy arrays, the header's metadata, the header's size) of a .safetensors file.

    Read here rather than with safetensors' numpy loader, which refuses bfloat16, the dtype many LoRAs
    ship in; and so that a truncated file is named as such before any value is used."""
    path = Path(path)
    refuse_pickle(path, what)
    if not path.is_file():
        raise EdgediffError(f"{what} {path} does not exist")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 1 or 8 + n > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
        tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if dtype is None:
                raise ValueError(f"tensor {key!r} has dtype {info.get('dtype') if isinstance(info, dict) else '?'}")
            start, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            if end > data.size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise ValueError(f"tensor {key!r} lies past the end of the file (the file is truncated)")
            raw = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
            if info["dtype"] == "BF16":  # the upper half of a float32
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            tensors[key] = raw.astype(np.float32) if raw.dtype.kind == "f" else raw
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise EdgediffError(f"{path.name} is not a readable .safetensors {what} ({first_line(e)}); download it "
                            "again") from None
    metadata = header.get("__metadata__") or {}
    return tensors, (metadata if isinstance(metadata, dict) else {}), n


def short_hash(path: Path, metadata: dict, header_size: int) -> str:
    """AUTOMATIC1111's "Lora hashes" value: the first 12 hex digits of kohya's addnet hash, a SHA-256 of
    the file after its header (kohya writes it into the metadata as sshs_model_hash; used when there)."""
    given = metadata.get("sshs_model_hash")
    if isinstance(given, str) and re.fullmatch(r"[0-9a-fA-F]{12,64}", given):
        return given[:12].lower()
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(8 + header_size)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


@dataclass(frozen=True, eq=False)  # numpy fields: compared by identity
class Layer:
    """One module's low-rank pair, as in the file."""

    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """(up @ down) * alpha / rank, in the weight's own (PyTorch) shape."""
        rank = self.down.shape[0]
        product = self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(rank, -1)
        scale = 1.0 if self.alpha is None else self.alpha / rank
        return (product * np.float32(scale)).reshape(shape)


@dataclass(frozen=True, eq=False)  # numpy fields: compared by identity
class LoraFile:
    path: Path
    name: str  # the file's stem: what `<lora:name:w>` and "Lora hashes" call it
    hash: str  # AUTOMATIC1111's short hash
    layers: dict[str, Layer]  # module key as in the file -> its pair
    unsupported: dict[str, str] = field(default_factory=dict)  # module key -> kind (LoHa, DoRA, ...)

    @property
    def family_hint(self) -> str | None:
        return guess_family(self.layers)


def read_lora(path: str | Path) -> LoraFile:
    path = Path(path)
    tensors, metadata, header = read_safetensors(path, "LoRA")
    parts: dict[str, dict[str, np.ndarray]] = {}
    unsupported: dict[str, str] = {}
    for key, value in tensors.items():
        role = next(((pattern, r) for pattern, r in _ROLES if pattern.search(key)), None)
        if role is None:
            module, _, leaf = key.rpartition(".")
            kind = _OTHER_KINDS.get(leaf.removesuffix(".weight")) or _OTHER_KINDS.get(module.rpartition(".")[2])
            unsupported[module or key] = kind or "an unknown kind"
            continue
        pattern, r = role
        module = pattern.sub("", key)
        if r == "mid":
            unsupported[module] = _OTHER_KINDS["lora_mid"]
            continue
        parts.setdefault(module, {})[r] = value
    layers = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            if "down" in p or "up" in p:
                unsupported[module] = "half a pair (lora_down without lora_up, or the reverse)"
            continue
        if module in unsupported:
            continue
        alpha = p.get("alpha")
        if alpha is not None and np.asarray(alpha).size != 1:  # else an IndexError, not a sentence
            raise EdgediffError(f"{path.name}: {module}.alpha holds {np.asarray(alpha).size} values, not one; "
                                "download it again")
        layers[module] = Layer(p["down"], p["up"], None if alpha is None else float(np.asarray(alpha).reshape(-1)[0]))
    if not layers:
        kinds = sorted(set(unsupported.values()))
        what = f"it holds {', '.join(kinds)}, which edgediff does not apply" if kinds else "it holds no LoRA weights"
        raise EdgediffError(f"{path.name} is not a LoRA edgediff can apply: {what}")
    return LoraFile(path, path.stem, short_hash(path, metadata, header), layers, unsupported)


def guess_family(layers: dict[str, Layer]) -> str | None:
    """The family a LoRA was trained for, from its cross-attention's context width (SD 1.x: CLIP ViT-L's
    768, SD 2.x: OpenCLIP ViT-H's 1024, SDXL: both encoders, 2048) or its second text encoder."""
    widths = {layer.down.shape[1] for key, layer in layers.items()
              if re.search(r"attn2[._]to_[kv]$", key) and layer.down.ndim == 2}
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in layers) or 2048 in widths:
        return "sdxl"
    if 1024 in widths:
        return "sd2"
    if 768 in widths:
        return "sd1"
    return None


# -- matching keys to the model's weights -------------------------------------------------------------

@dataclass(frozen=True)
class Weight:
    """Where one PyTorch weight lives in the exported graph (a row of weight_map.json)."""

    component: str
    param: str  # diffusers' / transformers' name
    initializer: str
    transposed: bool
    dtype: str  # the graph's: float32, float16
    shape: tuple[int, ...]  # PyTorch's
    file: Path | None  # the data file and the bytes in it; None for a PyTorch module's own weight
    offset: int = 0
    length: int = 0

    def read(self) -> np.ndarray:
        """The exported value, in PyTorch's layout, as float32."""
        count = self.length // np.dtype(self.dtype).itemsize
        value = np.fromfile(self.file, dtype=self.dtype, count=count, offset=self.offset)
        shape = self.shape[::-1] if self.transposed else self.shape
        value = value.reshape(shape)
        return (value.T if self.transposed else value).astype(np.float32)

    def graph_value(self, value: np.ndarray) -> np.ndarray:
        """A PyTorch-layout float32 value as the graph stores it."""
        value = value.T if self.transposed else value
        return np.ascontiguousarray(value, dtype=self.dtype)


@dataclass(frozen=True)
class Targets:
    """Every weight of a model a LoRA or an embedding may change, and the names files use for them."""

    family: str
    weights: dict[tuple[str, str], Weight]  # (component, param) -> where it is
    aliases: dict[str, tuple[str, str]]  # a file's module key -> (component, param)
    embedding_slots: dict[str, tuple[int, int]]  # text encoder -> (first slot id, slots)
    text_encoders: tuple[str, ...]  # in the family's order

    @classmethod
    def of(cls, family, weights: dict[tuple[str, str], Weight], unet_config: dict,
           embedding_slots: dict[str, tuple[int, int]] | None = None) -> "Targets":
        encoders = tuple(t.spec.name for t in family.text_encoders)
        kohya = {family.unet.name: ("lora_unet_",)}
        peft = {family.unet.name: ("unet.",)}
        for k, name in enumerate(encoders):
            kohya[name] = ("lora_te_",) if len(encoders) == 1 else (f"lora_te{k + 1}_",)
            peft[name] = (f"{name}.",)
        ldm = ldm_unet_names(unet_config)
        aliases: dict[str, tuple[str, str]] = {}
        for component, param in weights:
            if not param.endswith(".weight"):
                continue
            module = param[:-len(".weight")]
            names = [module]
            if module.startswith("text_model."):
                names.append(module[len("text_model."):])
            if component == family.unet.name and ldm.get(module):
                names.append(ldm[module])
            for name in names:
                for prefix in kohya.get(component, ()):
                    aliases[prefix + name.replace(".", "_")] = (component, param)
                for prefix in peft.get(component, ()):
                    aliases[prefix + name] = (component, param)
        return cls(family.name, weights, aliases, dict(embedding_slots or {}), encoders)

    @classmethod
    def of_folder(cls, folder: Path, family) -> "Targets":
        """The targets an export recorded (export/weight_map.py); none for folders it did not write."""
        weights, slots = {}, {}
        try:
            unet_config = json.loads((folder / family.unet.name / "config.json").read_text())
        except (OSError, ValueError):
            unet_config = {}
        for spec in (family.unet, *(t.spec for t in family.text_encoders)):
            path = folder / spec.name / WEIGHT_MAP
            if not path.is_file():
                continue
            try:
                record = json.loads(path.read_text())
                quantized = bool(record.get("quantized"))
                for param, (init, layout, dtype, shape, offset, length) in record["weights"].items():
                    dtype = "int8" if quantized else dtype  # export/weight_map.mark_quantized
                    weights[(spec.name, param)] = Weight(spec.name, param, init, layout == "T", dtype, tuple(shape),
                                                         folder / spec.name / record["file"], offset, length)
                if record.get("embedding_slots"):
                    slots[spec.name] = tuple(record["embedding_slots"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise EdgediffError(f"{path} cannot be read ({first_line(e)}); export the model again") from None
        return cls.of(family, weights, unet_config, slots)

    def resolve(self, key: str) -> tuple[str, str] | None:
        key = key.removeprefix("base_model.model.")
        found = self.aliases.get(key)
        if found is None and _PROCESSOR.search(key):  # diffusers' attention-processor LoRAs
            key = _PROCESSOR.sub(lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out" else ""), key)
            found = self.aliases.get(key)
        return found


_FAMILY_TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def family_title(name: str | None) -> str:
    base = (name or "").removesuffix("-inpainting")
    return _FAMILY_TITLES.get(base, name or "unknown")


def match(lora: LoraFile, targets: Targets) -> dict[tuple[str, str], Layer]:
    """{(component, param): layer} for the file's layers on this model, or one line saying why it does not
    fit. A few unmatched keys are reported, as AUTOMATIC1111 does, and skipped."""
    matched: dict[tuple[str, str], Layer] = {}
    missed = []
    for key, layer in lora.layers.items():
        found = targets.resolve(key)
        if found is None:
            missed.append(key)
            continue
        shape = targets.weights[found].shape
        if layer.up.shape[0] != shape[0] or int(np.prod(layer.down.shape[1:])) != int(np.prod(shape[1:])):
            hint = lora.family_hint
            # a hint of the model's own family explains nothing (a LoRA of a fine-tune with other widths)
            same = hint == targets.family.removesuffix("-inpainting")
            theirs = f"an {family_title(hint)} LoRA" if hint and not same else "a LoRA for another model"
            raise EdgediffError(f"{lora.path.name} is {theirs}: its {key} is {tuple(layer.up.shape[:1])} x "
                                f"{tuple(layer.down.shape[1:])}, the model's weight is {shape}; use a LoRA made for "
                                f"{family_title(targets.family)} models")
        matched[found] = layer
    base = targets.family.removesuffix("-inpainting")
    hint = lora.family_hint
    if not matched:
        if hint and hint != base:
            raise EdgediffError(f"{lora.path.name} is an {family_title(hint)} LoRA and this model is "
                                f"{family_title(targets.family)}; use a LoRA made for it")
        raise EdgediffError(f"{lora.path.name}: none of its {len(lora.layers)} LoRA layers matches a weight of this "
                            f"{family_title(targets.family)} model (e.g. {sorted(lora.layers)[0]}); is it a LoRA "
                            "for another model?")
    if missed:
        log.warning("LoRA %s didn't match keys: %s", lora.name, ", ".join(sorted(missed)[:8])
                    + (f" and {len(missed) - 8} more" if len(missed) > 8 else ""))
    for key, kind in sorted(lora.unsupported.items())[:1]:
        log.warning("LoRA %s: %d module(s) hold %s, which edgediff does not apply (e.g. %s); skipped", lora.name,
                    len(lora.unsupported), kind, key)
    missing = sorted({c for c, _ in matched} - {c for c, _ in targets.weights})
    if missing:
        raise EdgediffError(f"{lora.path.name} changes the {', '.join(missing)}, whose weights this export did not "
                            "record; export the model again with this edgediff")
    return matched


# -- embeddings ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # numpy fields: compared by identity
class Embedding:
    name: str  # the trigger word: the file's name
    path: Path
    vectors: tuple[np.ndarray, ...]  # one (n, width) array per text encoder of the model


def read_embedding(path: str | Path, widths: tuple[int, ...], family: str) -> Embedding:
    """An embedding file's vectors for each text encoder, whose widths are `widths` (768; or 768 and
    1280 for SDXL)."""
    path = Path(path)
    tensors, _, _ = read_safetensors(path, "embedding")
    floats = {k: v for k, v in tensors.items() if v.dtype == np.float32}
    if len(widths) == 2:
        pair = (floats.get("clip_l"), floats.get("clip_g"))
        if pair[0] is None or pair[1] is None:
            raise EdgediffError(f"{path.name} is not an SDXL embedding (it lacks clip_l/clip_g vectors); "
                                f"this model is {family_title(family)}")
        found = tuple(v.reshape(-1, v.shape[-1]) for v in pair)
    else:
        if "clip_l" in floats or "clip_g" in floats:
            raise EdgediffError(f"{path.name} is an SDXL embedding (clip_l/clip_g); this model is "
                                f"{family_title(family)}")
        value = floats.get("emb_params")
        if value is None and len(floats) == 1:  # diffusers' {token: vectors}
            value = next(iter(floats.values()))
        if value is None:
            raise EdgediffError(f"{path.name} holds no embedding vectors (expected emb_params, or one tensor)")
        found = (value.reshape(-1, value.shape[-1]),)
    for vectors, width in zip(found, widths):
        if vectors.shape[1] != width:
            hint = {768: "SD 1.x", 1024: "SD 2.x"}.get(vectors.shape[1], "another model")
            raise EdgediffError(f"{path.name} holds {vectors.shape[1]}-wide vectors (an {hint} embedding); this "
                                f"model's text encoder takes {width}")
        if not np.isfinite(vectors).all():
            raise EdgediffError(f"{path.name} holds NaN or infinite values; download it again")
    return Embedding(path.stem, path, found)


# -- merging ------------------------------------------------------------------------------------------

def merged(targets: Targets, loras: list[tuple[LoraFile, float]]) -> tuple[dict[str, dict[str, np.ndarray]],
                                                                          dict[str, list[tuple[LoraFile, float]]]]:
    """({component: {initializer: value in the graph's dtype}} for every weight the LoRAs touch: the
    export's weight plus each LoRA's weighted delta, summed in fp32 and cast once; {component: the
    (LoRA, weight) pairs that touch it}, what its weights depend on)."""
    deltas: dict[tuple[str, str], list[tuple[Layer, float]]] = {}
    touching: dict[str, list[tuple[LoraFile, float]]] = {}
    for lora, weight in loras:
        for target, layer in match(lora, targets).items():
            deltas.setdefault(target, []).append((layer, weight))
            if (lora, weight) not in touching.setdefault(target[0], []):
                touching[target[0]].append((lora, weight))
    quantized = sorted({c for c, p in deltas if targets.weights[(c, p)].dtype == "int8"})
    if quantized:
        raise EdgediffError(f"this export's {', '.join(quantized)} is int8, whose weights cannot take a LoRA at "
                            "load time; bake the LoRA in: `edgediff export SRC --dtype int8 --lora FILE:WEIGHT`")
    out: dict[str, dict[str, np.ndarray]] = {}
    for target, layers in sorted(deltas.items()):
        w = targets.weights[target]
        value = w.read()  # (out, in, ...) float32: a fresh array, changed in place below
        for layer, weight in layers:
            value += np.float32(weight) * layer.delta(w.shape)
        out.setdefault(w.component, {})[w.initializer] = w.graph_value(value)
    return out, touching


def embedding_tables(targets: Targets, embeddings: list[Embedding]) -> tuple[dict[str, dict[str, np.ndarray]],
                                                                             list[dict[str, list[int]]]]:
    """The token tables with the embeddings' vectors in their reserved rows, and per text encoder the ids
    each trigger word stands for: ({component: {initializer: table}}, [{trigger: ids}, ...])."""
    tables: dict[str, dict[str, np.ndarray]] = {}
    ids: list[dict[str, list[int]]] = []
    for k, component in enumerate(targets.text_encoders):
        table = targets.weights.get((component, TOKEN_TABLE))
        slots = targets.embedding_slots.get(component)
        if table is None or slots is None:
            raise EdgediffError(f"this export reserved no token rows for embeddings in its {component}; export "
                                "the model again with this edgediff")
        first, count = slots
        needed = sum(e.vectors[k].shape[0] for e in embeddings)
        if needed > count:
            raise EdgediffError(f"{len(embeddings)} embeddings need {needed} token vectors; the export reserved "
                                f"{count}: use fewer embeddings")
        value = table.read()
        words, row = {}, first
        for e in embeddings:
            n = e.vectors[k].shape[0]
            value[row:row + n] = e.vectors[k]
            words[e.name] = list(range(row, row + n))
            row += n
        tables[component] = {table.initializer: table.graph_value(value)}
        ids.append(words)
    return tables, ids


def overrides_key(component: str, loras, embeddings) -> str:
    """A short name for the weights a component gets from these LoRAs and embeddings (what compiled-graph
    caches key on): the files' hashes and weights, in order."""
    parts = [f"{lora.hash}x{weight!r}" for lora, weight in loras] + [f"{e.name}:{e.path.stat().st_size}"
                                                                    for e in embeddings]
    return hashlib.sha256(f"{component}|{'|'.join(parts)}".encode()).hexdigest()[:16]


# -- finding files ------------------------------------------------------------------------------------

def lora_list(loras) -> list[tuple[object, float]]:
    """[(file or name, weight)] from what set_loras and from_pretrained take: pairs, or bare files."""
    if loras is None:
        return []
    if isinstance(loras, (str, Path)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, (str, Path)):
            ref, weight = item, 1.0
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            ref, weight = item
        else:
            raise EdgediffError(f"a LoRA is a file or name, or a (file, weight) pair, not {item!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)) \
                or not np.isfinite(float(weight)):
            raise EdgediffError(f"the weight of LoRA {ref} must be a finite number, not {weight!r}")
        if not isinstance(ref, (str, Path)):
            raise EdgediffError(f"a LoRA is a file or a name, not {type(ref).__name__}")
        out.append((ref, float(weight)))
    return out


def find_lora(ref, folder: Path | None) -> Path:
    """A LoRA file: `ref` as a path, else `folder/ref.safetensors`. Names from a prompt or a request
    resolve only inside the folder: no separators, no absolute paths."""
    path = Path(ref)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path, "LoRA")
    if path.is_file():
        return path
    name = str(ref)
    if folder is not None and name and "/" not in name and "\\" not in name and name not in (".", ".."):
        for suffix in (".safetensors", ""):
            candidate = Path(folder) / f"{name}{suffix}"
            if candidate.is_file():
                refuse_pickle(candidate, "LoRA")
                return candidate
        if any((Path(folder) / f"{name}{s}").is_file() for s in PICKLE_SUFFIXES):
            refuse_pickle(Path(f"{name}.ckpt"), "LoRA")
        have = sorted(f.stem for f in Path(folder).glob("*.safetensors"))
        listing = f"it has: {', '.join(have[:12])}" + (" ..." if len(have) > 12 else "") if have else "it has none"
        raise EdgediffError(f"LoRA {name!r} is not in {folder} ({listing})")
    where = f" or in the LoRA folder {folder}" if folder is not None else " (give a file, or a LoRA folder: --lora-dir)"
    raise EdgediffError(f"LoRA {name!r} is not a file{where}")


def embedding_files(folder) -> list[Path]:
    """The embeddings of a folder (AUTOMATIC1111's embeddings/): its .safetensors files, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgediffError(f"embedding folder {folder} does not exist")
    return sorted(folder.glob("*.safetensors"))


# -- the UNet's original (LDM/SGM) module names -------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_names(config: dict) -> dict[str, str]:
    """{diffusers module: LDM/SGM module} for a UNet2DConditionModel config: kohya's SDXL LoRAs name the
    UNet's modules as the original code did (input_blocks / middle_block / output_blocks)."""
    names: dict[str, str] = {}
    blocks = len(config.get("block_out_channels", ()))
    per = config.get("layers_per_block", 2)
    per = per if isinstance(per, int) else per[0]
    downs = config.get("down_block_types", ())
    ups = config.get("up_block_types", ())
    depth = config.get("transformer_layers_per_block", 1)
    depth = max(depth) if isinstance(depth, (list, tuple)) else depth

    def resnet(diffusers: str, ldm: str) -> None:
        for a, b in _RESNET.items():
            names[f"{diffusers}.{a}"] = f"{ldm}.{b}"

    def attention(diffusers: str, ldm: str) -> None:
        for leaf in ("norm", "proj_in", "proj_out"):
            names[f"{diffusers}.{leaf}"] = f"{ldm}.{leaf}"
        for t in range(depth):
            for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                         "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
                names[f"{diffusers}.transformer_blocks.{t}.{leaf}"] = f"{ldm}.transformer_blocks.{t}.{leaf}"

    names.update({"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                  "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"})
    for i in range(blocks):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            if i < len(downs) and "CrossAttn" in downs[i]:
                attention(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1")
        if i < blocks - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    attention("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    for i in range(blocks):
        crossattn = i < len(ups) and "CrossAttn" in ups[i]
        for j in range(per + 1):
            n = i * (per + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0")
            if crossattn:
                attention(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1")
        if i < blocks - 1:
            n = i * (per + 1) + per
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if crossattn else 1}.conv"
    return names


# -- the prompt's <lora:name:weight> ------------------------------------------------------------------

# AUTOMATIC1111's extra-network syntax: <lora:name>, <lora:name:0.8>; its te/unet split (<lora:n:0.8:0.5>)
# is refused in the parser below rather than half-applied.
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def parse_weight(text: str, where: str, example: str) -> float:
    """A LoRA's weight written as text (a prompt's tag, a command-line value), or one line saying why not."""
    try:
        weight = float(text)
    except ValueError:
        raise EdgediffError(f"{where}: the weight {text!r} is not a number (write {example})") from None
    if not np.isfinite(weight):
        raise EdgediffError(f"{where}: the weight must be a finite number")
    return weight


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its <lora:...> tags, and the (name, weight) each tag asks for."""
    found = []
    for m in LORA_TAG.finditer(prompt):
        name, rest = m.group(1).strip(), m.group(2)
        weight = 1.0
        if rest is not None and ":" in rest:
            raise EdgediffError(f"{m.group(0)}: separate text-encoder and UNet weights are not supported; give one "
                                f"weight, as <lora:{name}:0.8>")
        if rest is not None:
            weight = parse_weight(rest, m.group(0), f"<lora:{name}:0.8>")
        found.append((name, weight))
    if not found:
        return prompt, found
    text = LORA_TAG.sub("", prompt)
    return re.sub(r"\s{2,}", " ", text).strip().strip(",").strip(), found
