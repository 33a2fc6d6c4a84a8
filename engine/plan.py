"""The memory plan: made once, before anything is loaded, from measured facts, and then followed.

    plan = make_plan(model, Request(512, 512), device, budget=parse_budget("4GB"))
    print(plan.describe())

The planner walks a ladder of plans from fastest to leanest and takes the first whose predicted peak
fits the budget; when none fits it refuses before loading anything, saying what would fit. Each rung
trades speed for memory in the way users of AUTOMATIC1111 pick by hand (--medvram, --lowvram,
"tiled VAE"), but chosen here from numbers:

    resident          every component loaded for the whole run, cond and uncond in one UNet call
    text-streamed     as resident, but the text encoders (and the safety checker: components whose
                      work does not grow with the picture) loaded, run and freed each call: the UNet
                      stays loaded between calls (SDXL's 1.6 GB of encoders on an 8 GB card)
    sequential-cfg    as resident, the UNet called twice per step with half the batch
    text-streamed-tiled  text-streamed, and the VAE decodes in tiles (below): SDXL's whole decode at
                      1024x1024 needs 4 GB beside a UNet that stays loaded
    streamed          each component loaded, run and freed in turn (text -> UNet -> VAE)
    streamed-tiled    streamed, and the VAE decodes in tiles (engine/tiling.py: with image-wide
                      GroupNorm statistics where the export has the split decoder)
    streamed-lean     streamed, sequential cfg, tiled VAE
    lowest            streamed-lean with the UNet's attention computed in slices of the queries (an
                      export with --attention sliced, made from the model's source when it is not one;
                      exports with fused attention need none: their kernel never holds the scores)

Predictions, per stage: the weights that are in memory during it + the activations of the component
running (from the export's graph profile, export/memory_profile.py) + the backend's fixed overhead.
The constants that turn graph facts into bytes are each backend's own (`backend.cost`, backends/), with
where they were measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import EdgediffError, EdgediffTypeError
from .families import SD1

GiB = 2 ** 30
MiB = 2 ** 20
DEFAULT_BUDGET = 7 * GiB  # fits an 8 GB card or Mac with room for the desktop
MIN_BUDGET = MiB  # a budget below a megabyte is a slip (a number of GB given as bytes), not a plan


TILE = 256  # pixels: the VAE tile of the tiled rungs (32 latents); a decode's peak scales with its area
TILE_OVERLAP = 64  # pixels blended between neighbouring tiles
# The split decoder's tiles (engine/tiling.shared_stats_decode): each runs with a margin of the tail's
# receptive field (48 px for SD) on every side, so a smaller core gives about the same area as TILE.
SPLIT_TILE = 192
SPLIT_DECODER = ("vae_decoder_head", "vae_decoder_tail")
UNET_NAME, SHALLOW_UNET = "unet", "unet_shallow"
# The tail's graph needs more than its live-tensor profile says, unlike the other graphs: measured with
# SD 1.5's tail at 48x48 hidden pixels, 516 MB against 216 MB predicted (its shared-statistics
# GroupNorms hold several full-size temporaries that ONNX Runtime does not reuse in place).
SPLIT_TAIL_FACTOR = 2.4


def parse_budget(text: str | int | float | None) -> int | None:
    """'7GB', '4.5 GiB', '512MB', 7e9 -> bytes. GB and GiB are both read as 2^30: users write GB and
    mean what their task manager shows."""
    if text is None:
        return None
    if isinstance(text, (int, float, np.integer, np.floating)) and not isinstance(text, bool):
        size = float(text)
    elif isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", text, re.IGNORECASE)
        if not m:
            raise EdgediffError(f"budget {text!r} is not a size; write it like 7GB, 4.5GB or 512MB")
        unit = (m.group(2) or "b").lower()[0]
        size = float(m.group(1)) * {"b": 1, "k": 2 ** 10, "m": MiB, "g": GiB, "t": 2 ** 40}[unit]
    else:
        raise EdgediffTypeError(f"budget must be a size like '7GB' or a number of bytes, not {type(text).__name__}")
    if not (MIN_BUDGET <= size < float("inf")):  # NaN fails this too
        raise EdgediffError(f"budget {text!r} is {'too small' if size < MIN_BUDGET else 'not a size'}: it takes at "
                            f"least {MIN_BUDGET // MiB} MB; write it like 7GB, 4.5GB or 512MB")
    return int(size)


@dataclass(frozen=True)
class Request:
    width: int
    height: int
    batch: int = 1  # images per call
    cfg: bool = True  # classifier-free guidance: the UNet sees 2 x batch
    img2img: bool = False  # the VAE encoder runs too
    # bytes of host memory the pipeline keeps beside its sessions: the LoRA- and embedding-changed weights
    # that replace exported ones (ONNX Runtime reads them from our buffers for the session's life, and
    # keeps its own prepacked copies too). They count on unified memory; a card gets the same bytes it
    # would without them.
    held: int = 0
    # feature caching (engine/deepcache.py): the full UNet every this many steps, the shallow one between;
    # 1 is exact. The shallow UNet's weights are held beside the full one's.
    cache_interval: int = 1
    # the arithmetic asked for: "f32" (exact), or "bf16" where the device is fast at it (the plan decides)
    precision: str = "f32"


@dataclass(frozen=True)
class Stage:
    name: str  # text_encoder, unet, vae_encoder, vae_decoder, safety_checker
    peak: int  # predicted bytes during this stage
    detail: str


@dataclass(frozen=True)
class Plan:
    backend: str
    device: str
    budget: int
    request: Request
    rung: str
    cfg_batched: bool  # cond and uncond in one UNet call (2B) or one after the other (B, twice)
    vae_tile: int | None  # pixels; None: whole
    vae_overlap: int  # pixels blended between tiles (whole-decoder tiles and the encoder's)
    resident: tuple[str, ...]  # loaded once, kept for the run
    streamed: tuple[str, ...]  # loaded, run and freed in turn
    dtype: str
    attention: str
    slices: int | None
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    # export options the plan needs that the model folder was not exported with ({"attention": "sliced",
    # "slices": 16}); the pipeline makes that export from the model's source, once, into the cache
    needs_export: dict | None = None
    on_host: tuple[str, ...] = ()  # components run by the CPU backend while the rest use the device
    vae_margin: int = 0  # pixels around the split decoder's tiles (shared statistics); 0 when not used
    # each component's predicted need (weights, activations, session), bytes: its share of the allocators
    needs: tuple[tuple[str, int], ...] = ()
    overhead: int = 0  # the backend's fixed cost (context, cuDNN/cuBLAS handles), outside its allocators
    # the sessions' arithmetic: bf16 when the request asks for it and the device is fast at it (OpenVINO
    # on AVX512_BF16 or AMX CPUs), else f32; backends that run the graph's own dtype ignore it
    precision: str = "f32"

    @property
    def session_memory_limit(self) -> int:
        """What the device sessions' allocators may take together (CUDA's gpu_mem_limit): the budget
        less the backend's fixed overhead."""
        return max(self.budget - self.overhead, 0)

    def session_limit(self, name: str) -> int | None:
        """The allocator cap of one component's session. Each session has an arena of its own, so a
        resident plan that gave every one the whole budget would bound none of them: the total is shared
        in proportion to the predicted needs of the sessions alive together (the resident ones, and this
        one), so they never add up to more than the budget. None for a component the plan does not size."""
        needs = dict(self.needs)
        if name not in needs:
            return None
        alive = set(self.resident) | {name}
        if self.vae_margin and alive & {"vae_decoder", *SPLIT_DECODER}:  # the split decoder's two sessions
            alive |= set(SPLIT_DECODER)
        together = sum(needs[n] for n in alive if n in needs)
        return int(self.session_memory_limit * needs[name] / max(together, 1))

    def keeps(self, name: str) -> bool:
        """Whether the component's session stays loaded for the run: the shallow UNet lives as the
        UNet does."""
        return (UNET_NAME if name == SHALLOW_UNET else name) in self.resident

    @property
    def predicted_peak(self) -> int:
        return max(s.peak for s in self.stages)

    def summary(self) -> str:
        r = self.request
        vae = "VAE whole" if not self.vae_tile else f"VAE in {self.vae_tile}px tiles" + \
            (" with image-wide GroupNorm statistics" if self.vae_margin else "")
        attention = f"sliced attention ({self.slices} slices)" if self.attention == "sliced" else \
            f"{self.attention} attention"
        cfg = "cfg batched" if self.cfg_batched else "cfg one after the other"
        if r.cache_interval > 1:
            cfg += f", full UNet every {r.cache_interval} steps (feature cache)"
        if self.precision != "f32":
            cfg += f", {self.precision} arithmetic"
        elif r.precision != "f32":
            cfg += f", f32 arithmetic ({r.precision} asked; {self.device} is not fast at it)"
        return (f"{self.rung} plan on {self.backend}: {r.width}x{r.height} x{r.batch}, {self.dtype}, "
                f"{attention}, {cfg}, {vae}; predicted peak {_gb(self.predicted_peak)} "
                f"of a {_gb(self.budget)} budget")

    def describe(self) -> str:
        lines = [self.summary(), f"  device: {self.device}",
                 f"  resident: {', '.join(self.resident) or 'nothing'}; "
                 f"loaded in turn: {', '.join(self.streamed) or 'nothing'}"
                 + (f"; on the host CPU: {', '.join(self.on_host)}" if self.on_host else "")]
        lines += [f"  {s.name:15s} {_gb(s.peak):>9s}  {s.detail}" for s in self.stages]
        if self.needs_export:
            lines.append("  needs an export with " + ", ".join(f"--{k} {v}" for k, v in self.needs_export.items())
                         + " (made from the model's source once, into the cache)")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GiB:.2f} GB"


RUNGS = (  # name, cfg batched, streamed (False, "text" or True: everything), tiled VAE, sliced attention
    ("resident", True, False, False, False),
    ("text-streamed", True, "text", False, False),
    ("sequential-cfg", False, False, False, False),
    ("text-streamed-tiled", True, "text", True, False),
    ("streamed", True, True, False, False),
    ("streamed-tiled", True, True, True, False),
    ("streamed-lean", False, True, True, False),
    ("lowest", False, True, True, True),
)
SLICES = 16  # the lowest rung's query slices at the UNet's top level (export/attention.py)


def make_plan(model, request: Request, device, budget: int | None = None, facts: dict | None = None) -> Plan:
    """The fastest plan whose predicted peak fits min(budget, what the device has free). `facts`
    (component -> ComponentFacts) defaults to what the model folder's files and manifest say."""
    facts = facts or component_facts(model)
    limit, why = _limit(device, budget)
    plans = [_plan(model, facts, request, device, limit, *rung) for rung in RUNGS]
    for plan in plans:
        if plan.predicted_peak <= limit:
            return plan
    raise EdgediffError(_nothing_fits(model, facts, request, device, limit, why, plans[-1]))


def _limit(device, budget: int | None) -> tuple[int, str]:
    budget = DEFAULT_BUDGET if budget is None else budget
    if budget <= 0:
        raise EdgediffError("the memory budget must be more than 0")
    free = getattr(device, "free_memory", None)
    if free is not None and free < budget:
        return free, f"the {_gb(budget)} budget is capped at the {_gb(free)} {device.backend} has free"
    return budget, f"the budget is {_gb(budget)}"


def _plan(model, parts: dict, request: Request, device, limit: int, rung: str, cfg_batched: bool,
          streamed: bool | str, tiled: bool, sliced: bool, split: bool = True) -> Plan:
    cost = backend_cost(device.backend)
    manifest = model.export_manifest
    attention, slices, needs_export = manifest.get("attention", "standard"), manifest.get("slices"), None
    # fused attention holds no score matrix either; Core ML packages cannot be re-made in another variant
    if sliced and attention not in ("sliced", "fused") and getattr(model, "format", "onnx") == "onnx":
        # Slicing the queries in k parts divides the score matrices, the quadratic term, by k at the top
        # level (deeper levels have 4x fewer queries per level and fewer slices: export/attention.py).
        unet = parts["unet"]
        parts = {**parts, "unet": ComponentFacts(unet.weights, (unet.fit[0], unet.fit[1], unet.fit[2] / SLICES))}
        attention, slices, needs_export = "sliced", SLICES, {"attention": "sliced", "slices": SLICES}
    f = model.vae_scale_factor
    h, w = request.height // f, request.width // f
    rows = request.batch * (2 if request.cfg else 1)
    unet_batch = rows if cfg_batched or not request.cfg else request.batch
    split = split and tiled and all(n in parts for n in SPLIT_DECODER) and "margin" in parts["vae_decoder_tail"].extra
    tile = (SPLIT_TILE if split else TILE) if tiled and max(request.width, request.height) > TILE else None
    th, tw = (min(h, tile // f), min(w, tile // f)) if tile else (h, w)
    decode = parts["vae_decoder"].activations(1, th, tw)
    decode_detail = f"{tile}px tiles, {TILE_OVERLAP}px overlap" if tile else f"1 image {request.width}x{request.height}"
    margin = 0
    if tile and split:
        decode, margin, decode_detail = _split_decode(parts, request, f, tile)
    decoder = SPLIT_DECODER if margin else ("vae_decoder",)
    unet_parts = (UNET_NAME, SHALLOW_UNET) if request.cache_interval > 1 and SHALLOW_UNET in parts else (UNET_NAME,)
    parts_of = {"vae_decoder": decoder, UNET_NAME: unet_parts}

    family = getattr(model, "family", SD1)  # a model described by hand (tools, tests) without one is SD 1.x
    texts = [t.spec.name for t in family.text_encoders]
    order = texts + (["vae_encoder"] if request.img2img else []) + ["unet", "vae_decoder"] \
        + (["safety_checker"] if "safety_checker" in parts else [])
    runs = {  # stage -> (activation bytes, detail)
        **{name: (parts[name].activations(rows, 1, 1), f"{rows} prompts") for name in texts},
        # the pipeline encodes in the plan's tiles when it decodes in tiles (engine/pipeline._encode_image)
        "vae_encoder": (parts.get("vae_encoder", _NONE).activations(1, th, tw),
                        f"{tile}px tiles" if tile else f"1 image {request.width}x{request.height}"),
        "unet": (parts["unet"].activations(unet_batch, h, w), f"batch {unet_batch} at {h}x{w} latents"),
        "vae_decoder": (decode, decode_detail),
        "safety_checker": (parts.get("safety_checker", _NONE).activations(1, 1, 1), "224px CLIP input"),
    }
    per_call = [c.name for c in family.components if not c.image_sized]  # small, run once per call
    loaded_in_turn = tuple(n for n in order if streamed is True or (streamed == "text" and n in per_call))
    resident = tuple(n for n in order if n not in loaded_in_turn)
    # On a card with memory of its own, the lean rungs run the text encoder and the safety checker on
    # the host: they are small and run once, so the CPU costs little time and spares the card their weights.
    host_ok = [c.name for c in family.components if c.host_ok]
    on_host = tuple(n for n in order if n in host_ok) if streamed is True and not device.unified_memory else ()
    adapters = request.held if device.unified_memory else 0
    stages, needs = [], {}
    for name in order:
        held = [n for n in resident if n != name] + [name]
        if name in on_host:  # its memory is the host's, not the device's: nothing of the budget
            stages.append(Stage(name, cost.fixed, f"{runs[name][1]}; on the host CPU"))
            continue
        held = [part for n in held for part in parts_of.get(n, (n,))]
        weights = sum(parts[n].weights for n in held if n in parts)
        act, detail = runs[name]
        for part in parts_of.get(name, (name,)):
            if part in parts:
                needs[part] = int(cost.weights * parts[part].weights) + int(cost.activations * act) + cost.session
        peak = cost.fixed + int(cost.weights * weights) + int(cost.activations * act) + cost.session * len(held) \
            + adapters
        extra = f" + LoRA/embedding weights {_gb(adapters)}" if adapters else ""
        stages.append(Stage(name, peak, f"{detail}; weights {_gb(weights)} held{extra}"))
    if margin:  # the split decoder only where it beats a whole decode; else blended tiles save the memory
        whole = _plan(model, parts, request, device, limit, rung, cfg_batched, streamed, False, sliced)
        if _stage(stages, "vae_decoder") >= _stage(whole.stages, "vae_decoder"):
            return _plan(model, parts, request, device, limit, rung, cfg_batched, streamed, tiled, sliced, False)
    return Plan(
        backend=device.backend, device=device.name, budget=limit, request=request, rung=rung,
        cfg_batched=cfg_batched or not request.cfg, vae_tile=tile, vae_overlap=TILE_OVERLAP if tile else 0,
        vae_margin=margin,
        resident=resident, streamed=loaded_in_turn,
        dtype=manifest.get("dtype", "fp32"), attention=attention, slices=slices, stages=tuple(stages),
        needs_export=needs_export, on_host=on_host, needs=tuple(needs.items()), overhead=cost.fixed,
        precision="bf16" if request.precision == "bf16" and getattr(device, "bf16", False) else "f32")


def backend_cost(name: str):
    """The backend's own cost figures (backends.base.BackendCost); the CPU's for a name the registry
    does not know (a device described by hand)."""
    from ..backends import REGISTRY, get_backend

    return get_backend(name if name in REGISTRY else "cpu").cost


def _stage(stages, name: str) -> int:
    return next(s.peak for s in stages if s.name == name)


def _split_decode(parts: dict, request: Request, f: int, tile: int) -> tuple[int, int, str]:
    """(activation bytes, margin in pixels, detail) of engine/tiling.shared_stats_decode: the head whole,
    then the tail over one tile and its margins while the head's output (and its half-size copy for
    the statistics) is held."""
    from .components import HIDDEN_SCALE

    tail = parts["vae_decoder_tail"]
    per_hidden = f // HIDDEN_SCALE  # pixels per hidden pixel
    margin = int(tail.extra["margin"]) * per_hidden
    hh, hw = request.height // per_hidden, request.width // per_hidden
    region = [min(side, tile // per_hidden + 2 * margin // per_hidden) / HIDDEN_SCALE for side in (hh, hw)]
    held = int(1.25 * 4 * tail.extra.get("channels", 0) * hh * hw) + 4 * 3 * request.height * request.width
    head = parts["vae_decoder_head"].activations(1, request.height // f, request.width // f)
    tiles = int(SPLIT_TAIL_FACTOR * tail.activations(1, round(region[0]), round(region[1])))
    detail = f"{tile}px tiles + {margin}px margins, GroupNorm statistics shared"
    return max(head, held + tiles), margin, detail


def _nothing_fits(model, facts: dict, request: Request, device, limit: int, why: str, lowest: Plan) -> str:
    """What would fit: a smaller size at the lowest rung, the budget the request needs, other exports."""
    need = lowest.predicted_peak
    smaller = None
    side = min(request.width, request.height)
    while side > 256:
        side -= 64
        scale = side / min(request.width, request.height)
        candidate = replace(request, width=int(request.width * scale) // 64 * 64,
                            height=int(request.height * scale) // 64 * 64)
        if _plan(model, facts, candidate, device, limit, *RUNGS[-1]).predicted_peak <= limit:
            smaller = candidate
            break
    hints = [f"a budget of {_gb(need)}"]
    if smaller:
        hints.insert(0, f"{smaller.width}x{smaller.height}")
    elif side <= 256:
        floor = _plan(model, facts, replace(request, width=256, height=256), device, limit, *RUNGS[-1])
        hints.append(f"no smaller size: even 256x256 needs {_gb(floor.predicted_peak)}")
    if model.export_manifest.get("dtype") != "fp16" and device.backend != "cpu":
        hints.append("an fp16 export")
    return (f"{request.width}x{request.height} needs at least {_gb(need)} on {device.backend} "
            f"({device.name}) even with the lowest-memory plan, and {why}; what would fit: "
            + ", or ".join(hints))


@dataclass(frozen=True)
class ComponentFacts:
    weights: int  # bytes on disk (graph + external data)
    fit: tuple[float, float, float]  # export/memory_profile.py's activation polynomial
    extra: dict = field(default_factory=dict)  # the manifest's component extras (the tail's margin)

    def activations(self, batch: int, h: int, w: int) -> int:
        c0, c1, c2 = self.fit
        area = h * w
        return int(max(0.0, c0 + batch * (c1 * area + c2 * area * area)))


_NONE = ComponentFacts(0, (0.0, 0.0, 0.0))

# Activation profiles of SD 1.5's components at fp32, for folders that carry no profile of their own
# (optimum's), and the graph bytes they were measured with: export/memory_profile.py on the full-size SD
# 1.5 architecture (bench/sd15.py) exported with standard attention, optimum's kind (`export_onnx(...,
# ExportOptions(attention="standard"))`, measured 2026-12-02). The safety checker's was not measured.
FALLBACK_FITS = {  # component -> (fit, graph bytes)
    "text_encoder": ((0.0, 3.547e6, 0.0), 495_092_979),
    "unet": ((0.0, 1.533e4, 83.07), 3_439_228_113),
    "vae_encoder": ((0.0, 1.312e5, 0.0), 136_717_885),
    "vae_decoder": ((0.0, 2.621e5, 0.02153), 198_014_423),
    "safety_checker": ((0.0, 5.0e7, 0.0), 0),
}


def fallback_fit(name: str, weights: int) -> tuple[float, float, float]:
    """SD 1.5's profile for a component of `weights` bytes. A network's weights grow with the square of
    its widths and its activations with the widths, so the profile is scaled by the square root of the
    weights' ratio (SD 2.x's components are SD 1.5's size: unchanged)."""
    fit, reference = FALLBACK_FITS.get(name, ((0.0, 0.0, 0.0), 0))
    scale = (weights / reference) ** 0.5 if reference and weights else 1.0
    return (fit[0] * scale, fit[1] * scale, fit[2] * scale)


def component_facts(model) -> dict[str, ComponentFacts]:
    """Weights and activation profile of each exported component, from the manifest and the files: an
    ONNX graph and its external data, or a Core ML package (a folder)."""
    manifest = model.export_manifest.get("components", {})  # checked and made a dict by read_model_folder
    facts = {}
    for folder in sorted(p for p in model.path.iterdir() if p.is_dir()):
        files = list(folder.glob("model.onnx*")) + [f for f in (folder / "model.mlpackage").rglob("*") if f.is_file()]
        if not files:
            continue
        weights = sum(p.stat().st_size for p in files)
        record = manifest.get(folder.name, {})
        fit = record.get("activations", {}).get("fit")
        if not fit and record.get("format") == "coreml":
            # The packages carry no profile of their own (the ONNX export measures its graphs): SD 1.5's,
            # for fp16 weights (twice the parameters per byte) and fp16 activations (half the bytes)
            fit = [c / 2 for c in fallback_fit(folder.name, 2 * weights)]
        facts[folder.name] = ComponentFacts(weights, tuple(fit) if fit else fallback_fit(folder.name, weights),
                                            record.get("extra", {}))
    return facts
