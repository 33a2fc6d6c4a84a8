"""The generation pipeline: text to image, image to image and inpainting on exported ONNX components.

    pipe = edgediff.Pipeline.from_pretrained("sd15-onnx", backend="cpu")
    result = pipe("a red circle on a blue background", seed=42)
    result.images[0].save("out.png")

The arguments and their meaning follow diffusers' StableDiffusion pipelines, and with the same initial
latents the images match diffusers' to over 40 dB PSNR (tests/test_parity.py). No torch is imported here.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import threading
import time
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import adapters
from . import arguments as arg
from . import noise as rnd
from .plan import Plan, Request, make_plan, parse_budget
from .tiling import shared_stats_decode, tiled
from .deepcache import HALVES, FeatureCache
from .components import (COMPONENTS, FP32_FALLBACK, INT8_GRAPH, HIDDEN_SCALE, SAFETY_CHECKER, VAE_DECODER, VAE_DECODER_HEAD,
                         VAE_DECODER_TAIL, VAE_DECODER_TINY, VAE_ENCODER, ComponentSpec)
from .errors import EdgediffError, EdgediffTypeError
from .images import Parameters, mask_to_tensor, open_image, to_pil, to_tensor
from .model_folder import LATENT_CHANNELS, ModelInfo, read_model_folder
from .schedulers import Schedule, Scheduler, SchedulerConfig, get_scheduler
from .schedulers.base import TIMESTEP_SPACINGS
from .tokenizer import ClipTokenizer

log = logging.getLogger("edgediff")

# The diffusers scheduler class a model folder names -> our scheduler, for the default choice.
DEFAULT_SCHEDULER_FOR_CLASS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
}
FALLBACK_SCHEDULER = "euler"


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]  # image k was made from seeds[k]
    parameters: list[Parameters]  # what made each image, for its PNG metadata
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    cancelled: bool = False  # the callback returned False; `images` is then empty
    # diffusers' name: image k was flagged by the model's safety checker and is black
    nsfw_content_detected: list[bool] = field(default_factory=list)
    plan: Plan | None = None  # the memory plan this generation followed
    peak_memory: int | None = None  # bytes: the process's peak resident memory during the call (Linux)
    # fp16 components whose output overflowed and that were re-run from their fp32 artifact
    fp32_reruns: list[str] = field(default_factory=list)
    loras: list[tuple[str, float]] = field(default_factory=list)  # (name, weight) of the LoRAs applied


def _one_call_at_a_time(method):
    """Calls on one Pipeline run one after another, each under the pipeline's lock.

    A call changes the pipeline as it goes: it plans (`self.plan`), opens and frees sessions for a
    streamed plan, and binds the text embeddings to the UNet's session (IO binding), and none of that
    may interleave with another call's. Two threads on one Pipeline, unserialised, got the wrong picture
    and then a segmentation fault (issue 11). The device has one memory budget to share anyway: two
    generations at once would need two plans' worth of it."""

    @functools.wraps(method)
    def serialised(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return serialised


class Pipeline:
    """A model on a backend, ready to generate. Thread-safe: calls from several threads run one at a time
    (each waits for the pipeline's lock) and each gets the pictures it would get alone."""

    def __init__(self, model: ModelInfo, backend, device, tokenizer: ClipTokenizer | tuple[ClipTokenizer, ...],
                 safety_checker: bool = True, memory_budget: str | int | None = None,
                 lora_dir: str | Path | None = None):
        self.model = model
        self.backend = backend
        self.device = device
        # one per text encoder of the family, in its order (SD's single one may be given alone)
        self.tokenizers = tuple(tokenizer) if isinstance(tokenizer, (tuple, list)) else (tokenizer,)
        self.tokenizer = self.tokenizers[0]
        # on when the model ships a safety checker, as in diffusers; off by the user's choice only
        self.safety_checker = safety_checker and model.has(SAFETY_CHECKER)
        self.memory_budget = parse_budget(memory_budget)  # None: the planner's default, capped by free memory
        self.plan: Plan | None = None  # the last plan made
        self.moved: dict[str, str] = {}  # component -> backend that took it when ours could not open it
        self._sessions: dict[str, object] = {}
        self._precision = "f32"  # the arithmetic the open sessions were opened for (the last plan's)
        self._lock = threading.RLock()  # see _one_call_at_a_time
        # LoRAs and embeddings (engine/adapters.py): the set given to set_loras, the one applied now (a
        # prompt's <lora:...> tags add to the first for one call), and the weights that replace the
        # export's, by component, passed to every session the component opens
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.loras: tuple[tuple[adapters.LoraFile, float], ...] = ()
        self.embeddings: tuple[adapters.Embedding, ...] = ()
        self._applied: tuple[tuple[adapters.LoraFile, float], ...] = ()
        self._overrides: dict[str, object] = {}  # backends.base.Overrides
        self._embedding_tables: dict[str, dict[str, np.ndarray]] = {}
        self._lora_files: dict[tuple, adapters.LoraFile] = {}
        self._targets: adapters.Targets | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "auto", safety_checker: bool = True,
                        memory_budget: str | int | None = None, loras=None, embeddings=None,
                        lora_dir: str | Path | None = None, embedding_dir: str | Path | None = None) -> "Pipeline":
        """Open a model on a backend ("auto" picks the best one available). `path` is an exported folder,
        or any source `edgediff export` takes (`builtin`, a diffusers folder, a .safetensors file, a hub
        id), exported once into the cache (this needs the export extra). `memory_budget` ("4GB") bounds
        every generation's predicted peak (default 7 GB, never more than the device has free).

        `loras`: [(file or name in `lora_dir`, weight), ...] applied at load time (see `set_loras`);
        `embeddings`: textual-inversion files, each triggered by its file's name in a prompt, and every
        .safetensors file in `embedding_dir`. `lora_dir` is where a prompt's <lora:name:weight> looks."""
        from ..backends import REGISTRY

        if not isinstance(backend, str):
            raise EdgediffTypeError(f"backend must be a backend's name (auto, {', '.join(REGISTRY)}), not "
                                    f"{type(backend).__name__}")
        if not isinstance(path, (str, os.PathLike)):
            raise EdgediffTypeError(f"from_pretrained needs a model: an exported folder, a diffusers folder, a "
                                    f".safetensors file, a hub id or 'builtin', not {type(path).__name__}")
        folder = Path(path)
        if not ((folder / "edgediff.json").is_file() or any((folder / c.onnx_path).is_file() for c in COMPONENTS)):
            from ..export.sources import ensure_exported  # imports torch only if it has to export

            path = ensure_exported(path)
        model = read_model_folder(path)
        chosen, device = backend_for(model, backend)
        _check_int8_kernels(model, chosen)
        tokenizers = tuple(ClipTokenizer.from_folder(model.path / t) for t in model.family.tokenizers)
        pipe = cls(model, chosen, device, tokenizers, safety_checker, memory_budget, lora_dir)
        files = list(embeddings or [])
        if embedding_dir is not None:
            files += adapters.embedding_files(embedding_dir)
        if files:
            pipe.set_embeddings(files)
        if loras:
            pipe.set_loras(loras)
        # Plan the native size now: a model that cannot fit is refused before anything is loaded, and
        # the resident components are loaded here, so a broken file fails now, not mid-run.
        try:
            pipe.plan = pipe.make_plan(Request(model.native_size, model.native_size))
        except EdgediffError:
            return pipe  # the native size does not fit this budget; a smaller request may: plan per call
        for spec in model.family.required:  # the text encoders, the UNet and the VAE decoder
            if spec.name in pipe.plan.resident:
                pipe._session(spec, pipe.plan)
        return pipe

    def make_plan(self, request: Request) -> Plan:
        """The plan a request would follow on this pipeline's device and budget; nothing is loaded. The
        weights LoRAs and embeddings replace are held beside the sessions: they count too."""
        held = sum(v.nbytes for o in self._overrides.values() for v in o.values.values()) + sum(
            t.nbytes for lora in self._lora_files.values() for layer in lora.layers.values()
            for t in (layer.down, layer.up))
        return make_plan(self.model, dataclasses.replace(request, held=request.held + held), self.device,
                         self.memory_budget)

    # -- LoRAs and embeddings -------------------------------------------------------------------------

    @_one_call_at_a_time
    def set_loras(self, loras) -> None:
        """Apply these LoRAs, [(file or name, weight), ...] (a bare file or name weighs 1), in place of
        the ones applied before; [] removes them all. Each weight becomes W + sum(weight * up @ down *
        alpha / rank) in fp32, cast to the export's dtype; only components whose weights change get new
        sessions. A file that cannot be applied raises one line, and the previous set stays."""
        asked = adapters.lora_list(loras)
        if asked:
            self._adapter_targets("LoRAs")  # the model can take them at all, before any file is read
        chosen = tuple((self._lora(ref), weight) for ref, weight in asked)
        self._apply(chosen)
        self.loras = chosen

    @_one_call_at_a_time
    def set_embeddings(self, files) -> None:
        """Textual-inversion embeddings (.safetensors), each read wherever its file's name appears in a
        prompt (and in a negative prompt); [] removes them. Replaces the set loaded before."""
        targets = self._adapter_targets("embeddings")
        widths = tuple(targets.weights[(c, adapters.TOKEN_TABLE)].shape[1] if (c, adapters.TOKEN_TABLE)
                       in targets.weights else 0 for c in targets.text_encoders)
        found = [adapters.read_embedding(f, widths, targets.family) for f in (files or [])]
        names = [e.name for e in found]
        if len(set(n.lower() for n in names)) != len(names):
            raise EdgediffError(f"two embeddings share a name ({', '.join(sorted(names))}): each is triggered by "
                                "its file's name; rename one")
        tables, words = adapters.embedding_tables(targets, found) if found else ({}, [{}] * len(self.tokenizers))
        base = tuple(t.without_words() for t in self.tokenizers)
        tokenizers = tuple(t.with_words(w) if w else t for t, w in zip(base, words))
        self._embedding_tables = tables
        self.tokenizers, self.embeddings = tokenizers, tuple(found)
        self.tokenizer = tokenizers[0]
        self._apply(self._applied, force=True)

    def _adapter_targets(self, what: str) -> adapters.Targets:
        if self._targets is None:
            targets = adapters.Targets.of_folder(self.model.path, self.model.family)
            self._targets = targets
        if self.model.format == "coreml":
            raise EdgediffError(f"{self.model.path} holds Core ML packages, which cannot change their weights when "
                                f"loaded; bake {what} in with `edgediff export SRC --format coreml --lora FILE:WEIGHT`")
        if not self._targets.weights:
            raise EdgediffError(f"{self.model.path} records no weight map, which {what} need (optimum's folders, "
                                "and edgediff's exports made before LoRA support, have none); export the model "
                                "again with `edgediff export`")
        return self._targets

    def _lora(self, ref) -> adapters.LoraFile:
        """A LoRA by path, or by name in the LoRA folder; read once per file version."""
        path = adapters.find_lora(ref, self.lora_dir)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._lora_files:
            self._lora_files[key] = adapters.read_lora(path)
        return self._lora_files[key]

    def _apply(self, loras: tuple, force: bool = False) -> None:
        """Make `loras` (and the embeddings) the weights of the next sessions. Everything is computed
        before anything changes: an error leaves the previous weights in place."""
        if loras == self._applied and not force:
            return
        from ..backends.base import Overrides

        values, touching = adapters.merged(self._adapter_targets("LoRAs"), list(loras)) if loras else ({}, {})
        overrides = {}
        for component in set(values) | set(self._embedding_tables):
            merged = {**values.get(component, {}), **self._embedding_tables.get(component, {})}
            # named by what this component's weights depend on: another LoRA elsewhere leaves its session
            embeddings = self.embeddings if component in self._embedding_tables else ()
            key = adapters.overrides_key(component, touching.get(component, ()), embeddings)
            overrides[component] = Overrides(key, merged)
        for component in set(overrides) | set(self._overrides):
            old, new = self._overrides.get(component), overrides.get(component)
            if (old.key if old else None) != (new.key if new else None):
                self._sessions.pop(component, None)  # re-created, with its new weights, when next used
        self._overrides, self._applied = overrides, tuple(loras)
        # Read files are kept while applied or set, not for every LoRA a prompt ever named (a server)
        used = {id(lora) for lora, _ in (*self._applied, *self.loras)}
        self._lora_files = {k: v for k, v in self._lora_files.items() if id(v) in used}
        gc.collect()

    def _prompt_loras(self, prompts: list[str]) -> tuple[list[str], tuple]:
        """The prompts without their <lora:...> tags, and the LoRAs of this call: the pipeline's, then
        the tags' (a tag naming a LoRA the pipeline has changes its weight for this call)."""
        texts, asked = [], None
        for text in prompts:
            text, tags = adapters.lora_tags(text)
            if asked is not None and tags != asked:
                raise EdgediffError("the prompts of one call name different <lora:...> tags; a batch shares one "
                                    "set of weights: give every prompt the same tags, or generate them separately")
            texts.append(text)
            asked = tags
        if not asked:
            return texts, self.loras
        if self.lora_dir is None:
            raise EdgediffError(f"the prompt names <lora:{asked[0][0]}:...>, and no LoRA folder was given: pass "
                                "lora_dir= (or --lora-dir DIR)")
        chosen = dict((lora.path, (lora, w)) for lora, w in self.loras)
        for name, weight in asked:
            lora = self._lora(name)
            chosen[lora.path] = (lora, weight)
        return texts, tuple(chosen.values())

    def _given_plan(self, plan, request: Request) -> Plan:
        """A caller's plan, if it was made for this request on this pipeline's device."""
        if not isinstance(plan, Plan):
            raise EdgediffTypeError(f"plan must be a Plan (from pipe.make_plan), not {type(plan).__name__}")
        made_for = dataclasses.replace(plan.request, held=0)
        if made_for != request or plan.backend != self.device.backend:
            raise EdgediffError(f"the plan was made for {made_for.width}x{made_for.height} x{made_for.batch} "
                                f"(cfg {made_for.cfg}, img2img {made_for.img2img}) on {plan.backend}; this call is "
                                f"{request.width}x{request.height} x{request.batch} (cfg {request.cfg}, img2img "
                                f"{request.img2img}) on {self.device.backend}: make it with pipe.make_plan(request)")
        return plan

    def _session(self, spec: ComponentSpec, plan: Plan | None = None):
        """The component's session, kept for later stages (the plan frees what it streams)."""
        if spec.name not in self._sessions:
            if not self.model.has(spec):
                raise EdgediffError(f"{self.model.path} has no {spec.name}, which img2img and inpainting "
                                    "need; export the model again with `edgediff export`")
            self._sessions[spec.name] = self._open(spec, plan)
        return self._sessions[spec.name]

    def _open(self, spec: ComponentSpec, plan: Plan | None, graph: str | None = None):
        """The one way a session is opened: the component's graph (or `graph`, a file beside it: the fp32
        fallback of an fp16 decoder), or the variant the plan needs, with the dtype it was exported in;
        on the plan's backend (the host's for what the plan runs there) with its share of the memory
        budget, the next backend taking over if that one cannot open it; with the weights LoRAs and
        embeddings replace."""
        from ..backends import REGISTRY, get_backend, open_with_fallback, select

        path, dtype = self.model.component(spec), self.model.dtype(spec.name)
        if graph is not None:
            path, dtype = path.with_name(graph), "int8" if graph == INT8_GRAPH else "fp32"
        elif spec is self.model.family.unet and plan is not None and plan.needs_export:
            path = self._variant(plan.needs_export) / spec.onnx_path
        backend, device = self.backend, self.device
        on_host = plan is not None and spec.name in plan.on_host
        if on_host:
            backend, device = select(next(name for name in REGISTRY if get_backend(name).host))
        limit = plan.session_limit(spec.name) if plan else None
        # Core ML packages have no other backend to fall back to; ONNX graphs move to the next one
        fallbacks = [] if self.model.format == "coreml" else None
        session, backend, _ = open_with_fallback(path, spec, backend, device, limit, fallbacks=fallbacks,
                                                 overrides=self._overrides.get(spec.name), dtype=dtype,
                                                 precision=plan.precision if plan is not None else "f32")
        if backend is not self.backend and not on_host:
            self.moved[spec.name] = backend.name
        return session

    def _variant(self, options: dict) -> Path:
        """The model exported with other options (the lowest plan's sliced attention), made once from
        the source the manifest names."""
        source = self.model.export_manifest.get("source", {})
        ref = source.get("ref") or source.get("path")
        flags = " ".join(f"--{k} {v}" for k, v in options.items())
        if not ref:
            raise EdgediffError(f"this request needs an export with {flags}, and {self.model.path} does not say "
                                f"what it was exported from; export it with `edgediff export SRC {flags}` "
                                "or give a larger --budget")
        try:
            from ..export.onnx_export import ExportOptions
            from ..export.sources import ensure_exported
        except ImportError:
            raise EdgediffError(f"this request needs an export with {flags}: run `edgediff export {ref} {flags}` "
                                "where the export extra is installed, or give a larger --budget") from None
        dtype = self.model.export_manifest.get("dtype", "fp32")
        return ensure_exported(ref, ExportOptions(dtype=dtype, **options))

    @contextmanager
    def _using(self, spec: ComponentSpec, plan: Plan):
        """A component's session for one stage; a streamed component is freed when the stage ends, even
        though the caller's `as` name outlives the `with` (it holds a lease, emptied here). Measured
        before the lease: SD 1.5's fp32 UNet stayed resident through the VAE stage of a streamed plan,
        4.53 GB where 3.92 GB was planned."""
        lease = _Lease(self._session(spec, plan))
        try:
            yield lease
        finally:
            if not plan.keeps(spec.name):
                self._sessions.pop(spec.name, None)
                lease.session = None
                gc.collect()

    def describe(self) -> str:
        """How this pipeline runs: what a user (or a bug report) needs to know."""
        moved = "".join(f"; {name} moved to {b}" for name, b in self.moved.items())
        loras = "; LoRAs " + ", ".join(f"{lora.name} at {w:g}" for lora, w in self.loras) if self.loras else ""
        return (self.plan.describe() if self.plan else "no plan yet") + moved + loras

    def default_scheduler(self) -> str:
        name = DEFAULT_SCHEDULER_FOR_CLASS.get(self.model.scheduler_class, FALLBACK_SCHEDULER)
        if name == "dpmpp_2m" and dict(self.model.scheduler_config.extras).get("use_karras_sigmas"):
            name = "dpmpp_2m_karras"
        return name

    @_one_call_at_a_time
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        num_images_per_prompt: int = 1,
        image=None,
        strength: float = 0.8,
        mask_image=None,
        latents: np.ndarray | None = None,
        callback: Callable[[int, int, np.ndarray], bool | None] | None = None,
        progress: bool = False,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        timestep_spacing: str | None = None,
        plan: Plan | None = None,
        unet_inputs: Callable[[dict[str, np.ndarray]], None] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        vae_decoder: str = "full",
        preview_every: int | None = None,
        cache_interval: int = 1,
        precision: str = "f32",
    ) -> GenerationResult:
        """Generate. The arguments are diffusers' StableDiffusion(XL)Pipeline's. Models with two text
        encoders (SDXL) also take `prompt_2` and `negative_prompt_2` (for the second encoder; default: the
        first's) and the micro-conditioning sizes, (height, width) in pixels, as diffusers: original and
        target size default to the output size, the crop corner to (0, 0); the negative sizes count when
        both are given, as in diffusers. `timestep_spacing` ("leading", "linspace" or "trailing")
        overrides the model's scheduler config: single files carry none, and few-step models (Turbo,
        Lightning) need "trailing", which AUTOMATIC1111 calls the SGM Uniform schedule.

        `plan` (from `make_plan`) is followed as given; by default the pipeline makes one for the request.
        `unet_inputs` is called with every UNet call's inputs (int8 calibration records them).

        AUTOMATIC1111's `<lora:name:weight>` in a prompt applies the LoRA `name` of the pipeline's LoRA
        folder for this call, on top of `set_loras`' set; the tag is taken out of the prompt text.

        `guidance_interval` (low, high): guidance only for the steps whose noise level sigma lies in
        (low, high] (Kynkaanniemi et al. 2024, arXiv 2404.07724: for SDXL (0.28, 5.42]); the other steps
        run the conditional pass alone, one UNet call of B rows instead of 2B. Off by default.

        `vae_decoder="tiny"` decodes with the tiny autoencoder exported beside the VAE (`export
        --tiny-vae madebyollin/taesd`): drafts at a fraction of the VAE's cost; "int8" with the int8
        decoder an int8 export keeps beside the fp32 one. `preview_every=N` passes
        the callback a fourth argument, every N steps and at the last one a preview of each image (PIL;
        else None): the tiny autoencoder's decode when the export has one, else the family's cheap
        latent-to-RGB projection at latent resolution.

        `cache_interval=N` (an export with --deep-cache) runs the full UNet every N steps and its shallow
        path, on the deep feature the last full step left, in between (engine/deepcache.py: DeepCache):
        fewer UNet FLOPs for a picture close to, not equal to, the exact one. 1, the default, is exact.

        `precision="bf16"` lets the plan run the sessions in bf16 where the device is fast at it (the
        openvino backend on AVX512_BF16 or AMX CPUs); elsewhere the plan stays f32 and says so. The
        default, "f32", is exact."""
        timings: dict[str, float] = {}
        model = self.model
        family = model.family

        # 1. Check inputs and settle sizes, seeds, the schedule and the LoRAs (the pipeline's, and those a
        # prompt's <lora:name:weight> tags add for this call, the tags taken out of the prompt).
        prompts = arg.texts("prompt", prompt)
        prompts, loras = self._prompt_loras(prompts)
        negatives = _negatives(negative_prompt, len(prompts))
        _refuse_unused(model, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
                       crops_coords_top_left=None if _is_origin(crops_coords_top_left) else crops_coords_top_left,
                       target_size=target_size, negative_original_size=negative_original_size,
                       negative_crops_coords_top_left=negative_crops_coords_top_left,
                       negative_target_size=negative_target_size)
        prompts_2 = prompts if prompt_2 is None else _per_prompt("prompt_2", prompt_2, len(prompts))
        negatives_2 = negatives if negative_prompt_2 is None else \
            _per_prompt("negative_prompt_2", negative_prompt_2, len(prompts))
        # diffusers: no negative prompt at all means zero conditioning for the families that say so
        zero_negative = negative_prompt is None and model.zeros_for_empty_negative
        if scheduler is not None and not isinstance(scheduler, str):
            raise EdgediffTypeError(f"scheduler must be a scheduler's name, not {type(scheduler).__name__}")
        scheduler_name = scheduler or self.default_scheduler()
        sched: Scheduler = get_scheduler(scheduler_name, _spacing(model.scheduler_config, timestep_spacing))
        if callback is not None and not callable(callback):
            raise EdgediffTypeError(f"callback must be a function (step, total, latents), not "
                                    f"{type(callback).__name__}")
        if vae_decoder not in ("full", "tiny", "int8"):
            raise EdgediffError(f"vae_decoder must be 'full', 'tiny' or 'int8', not {vae_decoder!r}")
        if vae_decoder == "int8" and not model.component(VAE_DECODER).with_name(INT8_GRAPH).is_file():
            raise EdgediffError(f"{model.name} has no int8 VAE decoder: export it with --dtype int8 (which "
                                "quantizes the decoder beside the UNet), or decode with the full VAE")
        if vae_decoder == "tiny" and not model.has(VAE_DECODER_TINY):
            raise EdgediffError(f"{model.name} has no tiny autoencoder: export it with --tiny-vae madebyollin/taesd "
                                "(madebyollin/taesdxl for SDXL), or decode with the full VAE")
        if preview_every is not None:
            preview_every = arg.whole("preview_every", preview_every, 1, None, " steps")
            if callback is None:
                raise EdgediffError("preview_every passes previews to the callback: give a callback too")
        if mask_image is not None and image is None:
            raise EdgediffError("a mask needs an init image to inpaint (pass image= / --init-image)")
        init_image = open_image(image, "init image") if image is not None else None
        mask = open_image(mask_image, "mask") if mask_image is not None else None
        width, height = image_size(width, height, init_image, model)
        if mask is not None and mask.size != init_image.size:
            log.warning("the mask is %dx%d but the image is %dx%d: resized the mask to the image",
                        *mask.size, *init_image.size)
            mask = mask.resize(init_image.size, Image.Resampling.LANCZOS)
        num_inference_steps = arg.whole("num_inference_steps", num_inference_steps, 1, sched.num_train_timesteps,
                                        f" (the model was trained with {sched.num_train_timesteps} timesteps)")
        strength = arg.real("strength", strength, 0.0, 1.0)
        num_images_per_prompt = arg.whole("num_images_per_prompt", num_images_per_prompt, 1)
        guidance_scale = arg.real("guidance_scale", guidance_scale, 0.0)
        if init_image is not None and int(num_inference_steps * strength) < 1:  # diffusers' rule
            raise EdgediffError(f"strength {strength:g} with {num_inference_steps} steps leaves no step to run; "
                                "raise --strength or --steps")
        if model.is_inpainting and mask is None:
            raise EdgediffError(f"{model.name} is an inpainting model: give it an image and a mask")
        batch = len(prompts) * num_images_per_prompt
        model.check_request(width, height, batch)
        seeds = _seeds(seed, batch)
        latent_shape = (LATENT_CHANNELS, height // model.vae_scale_factor, width // model.vae_scale_factor)
        if latents is not None:
            latents = _latents(latents, (batch, *latent_shape))
        schedule, start = _schedule(sched, num_inference_steps, strength if init_image is not None else None)
        cfg = guidance_scale > 1.0  # diffusers: guidance 1 or less means the conditional pass alone
        interval = _interval(guidance_interval)  # checked even where guidance is off (and then unused)
        interval = interval if cfg else None
        cache_interval = arg.whole("cache_interval", cache_interval, 1, None, " steps")
        if precision not in ("f32", "bf16"):
            raise EdgediffError(f"precision must be 'f32' or 'bf16', not {precision!r}")
        if cache_interval > 1 and not model.has(family.unet_shallow):
            raise EdgediffError(f"cache_interval {cache_interval} needs an export with feature caching: export "
                                f"{model.name} again with --deep-cache, or use cache_interval 1")
        if cache_interval > 1 and loras:
            raise EdgediffError("feature caching with LoRAs is not supported yet (the shallow UNet would run "
                                "without them): use cache_interval 1, or bake the LoRAs in with export --lora")

        self._apply(loras)

        # 2. The memory plan for this request, before anything is loaded; a leaner plan than the last
        # frees what it does not keep first.
        request = Request(width, height, batch, cfg, img2img=init_image is not None, cache_interval=cache_interval,
                          precision=precision)
        plan = self.make_plan(request) if plan is None else self._given_plan(plan, request)
        self.plan = plan  # the last plan made, for describe(); the stages below read `plan` alone
        if plan.precision != self._precision:  # sessions compiled for another arithmetic: open them again
            self._sessions.clear()
            self._precision = plan.precision
        for name in [n for n in self._sessions if not plan.keeps(n)]:
            del self._sessions[name]
        gc.collect()
        _reset_peak_memory()

        # 3. Text: tokens -> the UNet's conditioning, unconditional first as diffusers batches them:
        # encoder_hidden_states (2B or B, 77, D), and for SDXL text_embeds (2B or B, P), time_ids (2B or B, 6).
        with _timed(timings, "text_encoder"):
            conditioning = self._encode_text((prompts, prompts_2), (negatives, negatives_2) if cfg else None,
                                             zero_negative, num_images_per_prompt, plan)
            if family.micro_conditioning:
                conditioning["time_ids"] = _time_id_rows(
                    (height, width), batch, cfg, original_size, crops_coords_top_left, target_size,
                    negative_original_size, negative_crops_coords_top_left, negative_target_size)  # (2B or B, 6)

        # 4. Initial latents: noise for txt2img; the encoded image noised to the first step otherwise.
        noise = latents if latents is not None else rnd.batch_noise(seeds, rnd.INITIAL, latent_shape)
        mask_latents = masked_latents = image_latents = None
        if init_image is not None:
            with _timed(timings, "vae_encoder"):
                pixels = to_tensor(init_image, width, height)  # (1, 3, H, W) in [-1, 1]
                if mask is not None:
                    pixel_mask = mask_to_tensor(mask, width, height)  # (1, 1, H, W), 1 = repaint
                    f = model.vae_scale_factor
                    # nearest-neighbour downsampling, as torch's interpolate does in diffusers
                    mask_latents = np.repeat(pixel_mask[:, :, ::f, ::f], batch, axis=0)  # (B, 1, h, w)
                    masked_pixels = pixels * (pixel_mask < 0.5)
                if mask is None or model.unet_in_channels == 4 or strength < 1.0:
                    image_latents = self._encode_image(pixels, seeds, rnd.POSTERIOR, plan)  # (B, 4, h, w)
                if mask is not None and model.is_inpainting:
                    masked_latents = self._encode_image(masked_pixels, seeds, rnd.MASKED_POSTERIOR, plan)  # (B, 4, h, w)
        if image_latents is None or (mask is not None and strength >= 1.0):
            x = noise * np.float32(schedule.init_noise_sigma)
        else:
            x = sched.add_noise(schedule, start, image_latents, noise).astype(np.float32)
        extra = None
        if model.is_inpainting:
            extra = np.concatenate([mask_latents, masked_latents], axis=1)  # (B, 5, h, w)

        # 5. Denoise: UNet on (uncond, cond), guidance, scheduler step. With a guidance interval, the steps
        # outside it run the conditional half alone; with a cache interval, the UNet's shallow path runs on
        # the last full step's deep feature between full steps.
        state = None
        steps = range(start, len(schedule))
        bar = _progress(len(steps), progress)
        with ExitStack() as stack, closing(bar):  # the bar ends its line even when a step raises
            shallow = stack.enter_context(self._using(family.unet_shallow, plan)) if cache_interval > 1 else None
            unet = FeatureCache(stack.enter_context(self._using(family.unet, plan)), shallow, cache_interval)
            if plan.cfg_batched:  # the same conditioning every step: on a GPU, sent to it once (IO binding)
                for name, value in conditioning.items():
                    unet.keep(name, value)
            halves = [dict(zip(conditioning, parts)) for parts in zip(*(np.split(v, 2) for v in conditioning.values()))] \
                if cfg else [conditioning]
            for n, i in enumerate(steps):
                guided = cfg and (interval is None or interval[0] < sched.sigma(schedule, i) <= interval[1])
                model_input = np.concatenate([x, x]) if guided else x  # (2B or B, 4, h, w)
                model_input = sched.scale_model_input(schedule, i, model_input)
                if extra is not None:  # (2B or B, 9, h, w)
                    model_input = np.concatenate([model_input, np.concatenate([extra] * (2 if guided else 1))], axis=1)
                t = np.full((model_input.shape[0],), schedule.timesteps[i], dtype=np.float32)
                with _timed(timings, "unet"):
                    # (the conditioning is passed whenever an interval may change it between steps: a kept
                    # input given another array is sent again and kept)
                    calls = [(model_input, conditioning if interval else {}, HALVES)] if guided and plan.cfg_batched \
                        else list(zip(np.split(model_input, 2), halves, ((h,) for h in HALVES))) if guided \
                        else [(model_input, halves[-1], HALVES[-1:])]
                    out = []
                    for sample, c, rows in calls:  # both halves at once; or uncond, then cond; or cond alone
                        if unet_inputs is not None:
                            unet_inputs({**conditioning, **c, "sample": sample, "timestep": t[:len(sample)]})
                        out.append(unet.run(n, rows, sample=sample, timestep=t[:len(sample)], **c))
                    out = np.concatenate(out)
                if guided:
                    uncond, cond = np.split(out, 2)
                    with np.errstate(over="ignore", invalid="ignore"):  # inf is caught after the loop
                        out = uncond + np.float32(guidance_scale) * (cond - uncond)
                step_noise = rnd.batch_noise(seeds, rnd.STEP, latent_shape, step=i) if sched.stochastic else None
                x, state = sched.step(schedule, i, x, out, state, step_noise)
                x = x.astype(np.float32, copy=False)
                if mask is not None and not model.is_inpainting:
                    # A plain model inpaints by pasting the original, noised to the next level, outside the mask.
                    known = image_latents
                    if i + 1 < len(schedule):
                        known = sched.add_noise(schedule, i + 1, image_latents, noise)
                    x = (1 - mask_latents) * known + mask_latents * x
                bar.update(1)
                preview = () if preview_every is None else \
                    (self._preview(x, plan) if (n + 1) % preview_every == 0 or n + 1 == len(steps) else None,)
                if callback is not None and callback(n, len(steps), x, *preview) is False:
                    log.info("generation cancelled by the callback after step %d of %d", n + 1, len(steps))
                    return GenerationResult([], seeds, [], timings, cancelled=True)
        if not np.isfinite(x).all():  # before the decoder, which would be blamed for it
            dtype = model.export_manifest.get("dtype", "fp32")
            raise EdgediffError(f"the denoised latents hold inf/NaN (guidance_scale {guidance_scale:g}; usual values "
                                "are 1 to 20): lower the guidance" + ("" if dtype == "fp32" else
                                f"; if that does not help, the UNet's {dtype} weights overflow: export with --dtype fp32"))

        # 6. Decode, one image at a time (the VAE decoder's activations are the largest of the run),
        # whole or in the plan's tiles; an fp16 decoder that overflows is re-run from its fp32 artifact.
        reruns: list[str] = []
        decoder = (VAE_DECODER_HEAD, VAE_DECODER_TAIL) if plan.vae_margin else (VAE_DECODER,)
        with _timed(timings, "vae_decoder"), ExitStack() as stack:
            if vae_decoder == "tiny":  # small: whole, whatever the plan's tiles
                tiny = stack.enter_context(self._using(VAE_DECODER_TINY, plan))
                decoded = [self._decode_tiny(tiny, x[k:k + 1]) for k in range(batch)]
            elif vae_decoder == "int8":  # the whole decoder's int8 graph, in the plan's tiles (blended)
                session, whole = self._open(VAE_DECODER, plan, INT8_GRAPH), dataclasses.replace(plan, vae_margin=0)
                decoded = [self._run_decoder([session], x[k:k + 1] / np.float32(model.scaling_factor), whole)
                           for k in range(batch)]
                del session
            else:
                sessions = [stack.enter_context(self._using(spec, plan)) for spec in decoder]
                decoded = [self._decode(decoder, sessions, x[k:k + 1] / np.float32(model.scaling_factor), plan,
                                        reruns) for k in range(batch)]  # each (1, 3, H, W)
        images = to_pil(np.concatenate(decoded))

        # 7. The safety checker, when the model has one and it is on: flagged images become black.
        flagged = [False] * batch
        if self.safety_checker:
            with _timed(timings, "safety_checker"):
                images, flagged = self._check_safety(images, plan)

        # 8. What made each image, for the PNG metadata.
        sampler = sched.a1111_name
        strength_note = strength if init_image is not None else None
        schedule_type = SCHEDULE_TYPES.get(timestep_spacing)
        hashes = tuple((lora.name, lora.hash) for lora, _ in loras)
        params = [Parameters(prompts[k // num_images_per_prompt], negatives[k // num_images_per_prompt],
                             num_inference_steps, sampler, guidance_scale, seeds[k], width, height, model.name,
                             strength_note, schedule_type, hashes, interval,
                             {"tiny": "TAESD", "int8": "int8"}.get(vae_decoder), cache_interval) for k in range(batch)]
        return GenerationResult(images, seeds, params, timings, nsfw_content_detected=flagged, plan=plan,
                                peak_memory=_peak_memory(), fp32_reruns=reruns,
                                loras=[(lora.name, w) for lora, w in loras])

    def _decode_tiny(self, session, x: np.ndarray) -> np.ndarray:
        """The tiny autoencoder's decode of the UNet's latents, divided by its own scaling factor (1 for
        TAESD, as in diffusers' pipelines with an AutoencoderTiny)."""
        return session.run(latent_sample=x / np.float32(self.model.tiny_scaling_factor))["sample"]

    def _preview(self, x: np.ndarray, plan: Plan) -> list[Image.Image]:
        """Each image of the batch as it stands: the tiny autoencoder's decode (kept open for the call's
        later previews), or the family's latent-to-RGB projection at latent resolution."""
        if self.model.has(VAE_DECODER_TINY):
            return to_pil(self._decode_tiny(self._session(VAE_DECODER_TINY, plan), x))
        rgb = np.einsum("bchw,cr->brhw", x, np.asarray(self.model.family.latent_rgb, np.float32))
        return to_pil(rgb)

    def _decode(self, specs, sessions, z: np.ndarray, plan: Plan, reruns: list[str]) -> np.ndarray:
        image = self._run_decoder(sessions, z, plan)
        if np.isfinite(image).all():
            return image
        # The black-image bug: fp16 overflow. An fp16 export keeps its decoder's fp32 graphs beside it.
        fp32 = [self.model.path / spec.name / FP32_FALLBACK for spec in specs]
        if self.model.export_manifest.get("components", {}).get(specs[0].name, {}).get("dtype") == "fp32":
            # Not an fp16 overflow: an fp32 decoder gives inf/NaN only when its weights hold them (the
            # latents were checked). Optimum's folders record no dtype: for them an overflow is likely.
            raise EdgediffError("the VAE decoder returned inf/NaN although it runs in fp32: the latents or "
                                f"the weights of {self.model.path} hold non-finite values; check the latents "
                                "you pass, or export the model again from an intact checkpoint")
        if not all(p.is_file() for p in fp32):
            raise EdgediffError(f"the VAE decoder returned inf/NaN (an fp16 overflow: the picture would be "
                                f"black) and {self.model.path} has no fp32 decoder to re-run it with; "
                                "export the model again (fp16 exports now keep one) or with --dtype fp32")
        log.warning("the fp16 VAE decoder overflowed (inf/NaN); decoding again with its fp32 graph")
        if "vae_decoder" not in reruns:
            reruns.append("vae_decoder")
        return self._run_decoder([self._open(spec, plan, FP32_FALLBACK) for spec in specs], z, plan)

    def _run_decoder(self, sessions, z: np.ndarray, plan: Plan) -> np.ndarray:
        f = self.model.vae_scale_factor
        if plan.vae_margin:  # the split decoder, tiles with image-wide GroupNorm statistics
            head, tail = sessions
            facts = self.model.export_manifest["components"][VAE_DECODER_TAIL.name]["extra"]
            per_hidden = f // HIDDEN_SCALE

            def run_tail(hidden, stats, mask, mix):
                out = tail.run(hidden=hidden, norm_stats=stats, stats_mask=mask, stats_mix=mix)
                return out["sample"], out["tile_stats"]
            return shared_stats_decode(lambda t: head.run(latent_sample=t)["hidden"], run_tail, z,
                                       plan.vae_tile // per_hidden, plan.vae_margin // per_hidden,
                                       facts["norms"], facts["groups"])
        (vae,) = sessions
        if not plan.vae_tile:
            return vae.run(latent_sample=z)["sample"]
        return tiled(lambda t: vae.run(latent_sample=t)["sample"], z, plan.vae_tile // f, plan.vae_overlap // f, f)

    def _check_safety(self, images: list[Image.Image], plan: Plan) -> tuple[list[Image.Image], list[bool]]:
        from .safety import ClipPreprocess

        clip = ClipPreprocess.from_folder(self.model.path / "feature_extractor")(images)  # (B, 3, 224, 224)
        pixels = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # (B, H, W, 3)
        with self._using(SAFETY_CHECKER, plan) as checker:
            out = checker.run(clip_input=clip, images=pixels)
        flagged = [bool(f) for f in np.asarray(out["has_nsfw_concepts"]).reshape(-1)]
        for k, f in enumerate(flagged):
            if f:
                log.warning("image %d was flagged by the model's safety checker and blacked out "
                            "(turn the checker off with --no-safety-checker / safety_checker=False)", k + 1)
        return [Image.new("RGB", im.size) if f else im for im, f in zip(images, flagged)], flagged

    def _encode_text(self, prompts: tuple[list[str], ...], negatives: tuple[list[str], ...] | None,
                     zero_negative: bool, per_prompt: int, plan: Plan) -> dict[str, np.ndarray]:
        """The UNet's text conditioning, as the family's record says (engine/families.py): each text
        encoder's context output, concatenated; the pooled output of the one that has it. `prompts` and
        `negatives` give each encoder's texts (SDXL's second encoder reads prompt_2); a zero negative is
        zeros in place of the encoded negatives (diffusers' force_zeros_for_empty_prompt)."""
        contexts, pooled = [], None
        for use, tokenizer, texts, negative in zip(self.model.family.text_encoders, self.tokenizers, prompts,
                                                   negatives or [None] * len(prompts)):
            texts = texts if negative is None or zero_negative else negative + texts
            encoded = tokenizer.encode(texts)
            for text, dropped in zip(texts, encoded.dropped):
                if dropped:
                    log.warning("prompt truncated: CLIP reads %d tokens, the last %d of %r were dropped",
                                tokenizer.max_length - 2, dropped, text[:60])
            with self._using(use.spec, plan) as encoder:
                out = encoder.run(input_ids=encoded.ids)
            contexts.append(out[use.context].astype(np.float32, copy=False))
            if use.pooled:
                pooled = out[use.pooled].astype(np.float32, copy=False)
        cond = {"encoder_hidden_states": np.concatenate(contexts, axis=-1)}  # (rows, 77, D)
        if pooled is not None:
            cond["text_embeds"] = pooled  # (rows, P)
        if negatives is not None and zero_negative:
            cond = {k: np.concatenate([np.zeros_like(v), v]) for k, v in cond.items()}
        # Each prompt's conditioning repeated for its images, consecutively (diffusers' order).
        return {k: np.repeat(v, per_prompt, axis=0) for k, v in cond.items()}

    def _encode_image(self, pixels: np.ndarray, seeds: list[int], purpose: int, plan: Plan) -> np.ndarray:
        """Posterior sample of the VAE encoder, scaled, one per image: mean + std * noise(seed)."""
        with self._using(VAE_ENCODER, plan) as encoder:
            if plan.vae_tile:
                f = self.model.vae_scale_factor
                name = encoder.output_names[0] if hasattr(encoder, "output_names") else "latent_parameters"
                outputs = {name: tiled(lambda t: next(iter(encoder.run(sample=t).values())), pixels,
                                       plan.vae_tile, plan.vae_overlap, 1 / f)}
            else:
                outputs = encoder.run(sample=pixels)
        if "latent_parameters" in outputs:
            mean, logvar = np.split(outputs["latent_parameters"], 2, axis=1)
            std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
            eps = rnd.batch_noise(seeds, purpose, mean.shape[1:])
            sample = mean + std * eps
        else:  # optimum's older exports sample inside the graph
            sample = np.repeat(next(iter(outputs.values())), len(seeds), axis=0)
        return (sample * np.float32(self.model.scaling_factor)).astype(np.float32)


def _check_int8_kernels(model: ModelInfo, backend) -> None:
    """Warn when an int8 UNet runs on a CPU whose int8 kernels differ from those of the machine that
    calibrated and gated it: its export figure does not hold there."""
    from ..backends.host import int8_kernels

    if model.dtype(model.family.unet.name) != "int8" or not getattr(backend, "host", False):
        return
    record = model.export_manifest.get("components", {}).get(model.family.unet.name, {})
    made, here = record.get("extra", {}).get("int8_kernels"), int8_kernels()
    if made and here and made != here:
        psnr = record.get("psnr")
        log.warning("this int8 UNet was calibrated and gated (%s) on a CPU with %s int8 kernels; this one runs %s "
                    "kernels, where the picture can lose several dB (ONNX Runtime's AVX2 kernels saturate): export "
                    "it again on this machine, or use an fp32 export", f"{psnr:.1f} dB" if psnr else "its gate",
                    made.upper(), here.upper())


def backend_for(model: ModelInfo, name: str):
    """The backend and device a model runs on: the one asked for, or the best available. Core ML packages
    run on the coreml backend alone: asked for another, or where coreml is unavailable, one line says so."""
    from ..backends import get_backend, select
    from ..backends.base import Device, Unavailable

    if model.format != "coreml":
        return select(name)
    if name in ("auto", "coreml"):
        backend = get_backend("coreml")
        found = backend.probe()
        if isinstance(found, Device) and found.compute_units:
            return backend, found
        why = found.reason if isinstance(found, Unavailable) else "coremltools cannot load packages here"
    else:
        why = f"backend {name} was asked for"
    raise EdgediffError(f"{model.path} holds Core ML packages, which run on Apple Silicon with coremltools "
                        f"(backend coreml), and {why}; export the model with --format onnx to run it here")


class _Lease:
    """A session lent for one stage (Pipeline._using): attribute access goes to the session."""

    def __init__(self, session):
        self.session = session

    def __getattr__(self, name):
        if self.session is None:
            raise RuntimeError("this component's session was freed when its stage ended")
        return getattr(self.session, name)


# AUTOMATIC1111's names of the schedules a timestep spacing gives, for the PNG parameters
SCHEDULE_TYPES = {"trailing": "SGM Uniform", "linspace": "Uniform", "leading": "Uniform"}


def _spacing(config: SchedulerConfig, spacing) -> SchedulerConfig:
    """The model's scheduler config with the caller's timestep spacing, if any."""
    if spacing is None:
        return config
    if not isinstance(spacing, str) or spacing not in TIMESTEP_SPACINGS:
        raise EdgediffError(f"timestep_spacing {spacing!r} is not one of {', '.join(TIMESTEP_SPACINGS)} "
                            "(trailing is AUTOMATIC1111's SGM Uniform, for Turbo and Lightning models)")
    return dataclasses.replace(config, timestep_spacing=spacing)


def _refuse_unused(model: ModelInfo, **given) -> None:
    """Arguments for a second text encoder or for micro-conditioning, given to a model that has neither,
    are a mistake (an SDXL recipe on an SD 1.5 model): one line, rather than silently ignored."""
    family = model.family
    named = [k for k, v in given.items() if v is not None
             and not (k.endswith("prompt_2") and len(family.text_encoders) > 1)
             and not (not k.endswith("prompt_2") and family.micro_conditioning)]
    if named:
        it = "it" if len(named) == 1 else "them"
        raise EdgediffError(f"{', '.join(named)} {'is' if len(named) == 1 else 'are'} for SDXL models, and "
                            f"{model.name} is a {family.title} model; leave {it} out, or use an SDXL model")


def _interval(value) -> tuple[float, float] | None:
    """A guidance interval: (low, high) sigmas, 0 <= low < high (high may be inf), or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise EdgediffTypeError(f"guidance_interval must be two sigmas (low, high), not {value!r}")
    low = arg.real("guidance_interval's low sigma", value[0], 0.0)
    high = value[1]
    if not (isinstance(high, (int, float, np.integer, np.floating)) and not isinstance(high, bool)
            and (high == float("inf") or np.isfinite(high)) and high > low):
        raise EdgediffError(f"guidance_interval's high sigma must be a number above the low one ({low:g}), "
                            f"not {high!r}; for SDXL the paper's interval is (0.28, 5.42)")
    return (float(low), float(high))


def _is_origin(corner) -> bool:
    return isinstance(corner, (tuple, list)) and len(corner) == 2 and all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c == 0 for c in corner)


def _per_prompt(name: str, value, n: int) -> list[str]:
    """A text given once for all prompts, or one per prompt."""
    texts = arg.texts(name, value)
    if isinstance(value, str):
        return texts * n
    if len(texts) != n:
        raise EdgediffError(f"{len(texts)} {name} texts for {n} prompts; give one per prompt")
    return texts


def _time_id_rows(size, batch: int, cfg: bool, original, crop, target, negative_original, negative_crop,
                  negative_target) -> np.ndarray:
    """SDXL's time_ids for the UNet's batch, negative rows first: diffusers' defaults (original and target
    size: the output size) and its rule for the negative ones: they count when both sizes are given
    (their crop then defaulting to (0, 0)); otherwise the negative rows repeat the positive ones."""
    ids = negative_ids = _time_ids("", original or size, crop, target or size)
    if negative_original is not None and negative_target is not None:
        negative_ids = _time_ids("negative_", negative_original, negative_crop or (0, 0), negative_target)
    elif negative_original is not None or negative_target is not None:
        log.warning("negative_original_size and negative_target_size are used together; with one of them "
                    "alone the negative conditioning repeats the positive sizes")
    return np.array([negative_ids] * batch * cfg + [ids] * batch, dtype=np.float32)


def _time_ids(prefix: str, original, crop, target) -> list[float]:
    """SDXL's micro-conditioning: original size, crop corner and target size, each (height, width) or
    (top, left) in pixels, as six numbers."""
    values = []
    for name, pair in ((f"{prefix}original_size", original), (f"{prefix}crops_coords_top_left", crop),
                       (f"{prefix}target_size", target)):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise EdgediffTypeError(f"{name} must be two whole numbers (height, width) in pixels, not {pair!r}")
        values += [arg.whole(name, v, 0, MAX_SIDE, " pixels") for v in pair]
    return [float(v) for v in values]


def _negatives(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    negatives = arg.texts("negative_prompt", negative_prompt)
    if isinstance(negative_prompt, str):
        return negatives * n
    if len(negatives) != n:
        raise EdgediffError(f"{len(negatives)} negative prompts for {n} prompts; give one per prompt")
    return negatives


def image_size(width, height, init_image, model: ModelInfo) -> tuple[int, int]:
    """As diffusers: an unset side is the init image's or the model's native size. Sides are multiples of
    the model's size_multiple (64 for SD, where diffusers asks 8: see ModelInfo), an init image's
    rounded down to one."""
    f = model.size_multiple
    sizes = []
    for name, value, k in (("width", width, 0), ("height", height, 1)):
        if value is None:  # 0 is a mistake, not "unset": it is refused below
            value = max(f, init_image.size[k] // f * f) if init_image is not None else model.native_size
        value = arg.whole(name, value, f, MAX_SIDE, f" pixels (a multiple of {f})")
        if value % f:
            raise EdgediffError(f"{name} {value} is not a multiple of {f}, which this model's UNet needs; "
                                f"try {max(f, round(value / f) * f)}")
        sizes.append(value)
    return sizes[0], sizes[1]


MAX_SIDE = 16384  # pixels: far beyond any model's training size; a larger side is a typo, not a plan


def _schedule(sched: Scheduler, steps: int, strength: float | None) -> tuple[Schedule, int]:
    """The run's schedule and the index it starts at (img2img starts part-way), or one line saying why
    the scheduler cannot take that many steps."""
    def make(n: int):
        return sched.partial_schedule(n, strength) if strength is not None else (sched.schedule(n), 0)

    try:
        schedule, start = make(steps)
    except ValueError as e:  # e.g. more LCM steps than its distillation schedule has
        raise EdgediffError(str(e)) from None
    if schedule.timesteps.max() >= sched.num_train_timesteps:
        # "leading" spacing with SD's steps_offset 1 reaches t = 1000 at 1000 steps, past the training
        # schedule's last index (diffusers fails there with an IndexError).
        fits = next((n for n in range(steps - 1, 0, -1) if make(n)[0].timesteps.max() < sched.num_train_timesteps), 1)
        raise EdgediffError(f"num_inference_steps {steps} is more than {sched.name} can take with this model's "
                            f"{sched.num_train_timesteps} training timesteps; use at most {fits}")
    return schedule, start


def _latents(latents, shape: tuple[int, ...]) -> np.ndarray:
    """The caller's initial latents as float32 of `shape`: real and finite, or one line saying why not."""
    try:
        array = np.asarray(latents)
    except (TypeError, ValueError) as e:
        raise EdgediffTypeError(f"latents must be an array of shape {shape}, not {type(latents).__name__} "
                                f"({e})") from None
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise EdgediffTypeError(f"latents must be real numbers (float32), not {array.dtype}")
    if array.shape != shape:
        raise EdgediffError(f"latents have shape {array.shape}; this request needs {shape} "
                            f"(batch, {LATENT_CHANNELS}, height/8, width/8)")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused just below
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise EdgediffError("latents hold NaN or infinite values; pass finite noise (or none, for the seed's)")
    return array


def _seeds(seed: int | None, batch: int) -> list[int]:
    if seed is None or (isinstance(seed, (int, np.integer)) and seed == -1):  # AUTOMATIC1111's "random"
        seed = rnd.random_seed()
    seed = arg.whole("seed", seed, 0, rnd.MAX_SEED, " (or -1 for a random seed)")
    return [(seed + k) % (rnd.MAX_SEED + 1) for k in range(batch)]


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="denoising", unit="step", leave=False, disable=not show)


def _reset_peak_memory() -> None:
    """Start the process's peak-RSS counter afresh (Linux: writing 5 to clear_refs resets VmHWM), so a
    generation reports its own peak, not the process's lifetime one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory() -> int | None:
    """The process's peak resident memory since the last reset, in bytes (Linux), else None."""
    from ..backends.host import peak_rss

    return peak_rss()
