"""AUTOMATIC1111's `/sdapi/v1` request bodies, checked and turned into edgediff pipeline calls.

    job = txt2img_job({"prompt": "a red circle", "steps": 20, "sampler_name": "Euler a", "seed": -1})
    for kwargs in job.runs():              # n_iter calls, the seed advancing by batch_size each
        result = pipe(**kwargs)
        images = job.finish(result.images)   # img2img with a mask: the original pasted back outside it

The field names, their defaults and their meaning are A1111's (`modules/api/models.py`, built from
`StableDiffusionProcessingTxt2Img`/`Img2Img`), with three departures, each because A1111's choice is
worse for a model edgediff runs: an absent width or height is the model's native size (A1111 says 512,
wrong for SDXL), an absent sampler is the model's own scheduler (A1111 says Euler), and absent steps are
20, A1111's UI default (its API says 50).

Every bad field raises EdgediffError: one line naming the field and what to do. A field edgediff does
not act on (enable_hr, alwayson_scripts, restore_faces ...) is named in `Job.ignored` when its value
asks for something, never dropped silently; at its do-nothing value (enable_hr false) it is no news.

No FastAPI or pydantic here: `edgediff serve` (serve/) answers HTTP with this module, and `edgediff
batch` reads its JSONL lines with it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import PureWindowsPath
from typing import Any, Mapping

from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from .engine import adapters
from .engine import arguments as arg
from .engine import noise as rnd
from .engine.errors import EdgediffError, EdgediffTypeError, first_line
from .engine.images import open_image
from .engine.schedulers import SCHEDULERS


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The defaults are A1111's UI sliders' ends where it has one."""

    max_steps: int = 150  # A1111's steps slider stops at 150
    max_side: int = 2048  # pixels; A1111's width and height sliders stop at 2048
    # 2 megapixels: twice SDXL's 1024x1024. Attention grows with the square of the pixel count, and a
    # 2048x2048 request would hold a desktop's CPU for many minutes; a wide 2048x1024 still passes.
    max_pixels: int = 2048 * 1024
    max_batch_size: int = 8  # images per pipeline call; A1111's batch size slider stops at 8
    max_n_iter: int = 100  # calls per request, one after another; A1111's batch count slider stops at 100
    max_body_bytes: int = 20 * 2**20  # a 2048x2048 PNG init image and its mask, base64, fit in 20 MB
    max_prompt_chars: int = 20_000  # CLIP reads 77 tokens per chunk; 20,000 characters is a mistake
    max_mask_blur: int = 64  # pixels; A1111's mask blur slider stops at 64


@dataclass(frozen=True)
class Job:
    """One checked A1111 request: what to pass to `edgediff.Pipeline.__call__`, how many times, and
    what to tell the client."""

    kwargs: dict  # Pipeline.__call__'s keyword arguments for the first of the n_iter calls
    n_iter: int  # A1111's batch count: calls run one after another, the seed advancing by batch_size
    ignored: tuple[str, ...]  # fields given that edgediff does not act on, for info's warning
    mode: str = "txt2img"  # or "img2img"
    sampler_name: str | None = None  # A1111's name of the sampler asked for; None: the model's own
    schedule_type: str = "Automatic"  # A1111's scheduler label asked for
    # override_settings' sd_model_checkpoint: a name for the server to look up among its models, never
    # a path; None: the model loaded now
    model: str | None = None
    restore_model: bool = True  # override_settings_restore_afterwards: the loaded model comes back after
    send_images: bool = True  # false: the answer carries no images (A1111's send_images)
    parameters: dict = field(default_factory=dict)  # the request echoed back, images left out
    # img2img with a mask: the init image and the blurred mask, to paste the original back outside
    # the mask as A1111 does (its "overlay")
    overlay: tuple[Image.Image, Image.Image] | None = None

    def runs(self) -> list[dict]:
        """The keyword arguments of each of the n_iter calls: A1111 gives image k of the request the
        seed seed + k, so call i starts at seed + i * batch_size."""
        batch = self.kwargs["num_images_per_prompt"]
        return [{**self.kwargs, "seed": (self.kwargs["seed"] + i * batch) % (rnd.MAX_SEED + 1)}
                for i in range(self.n_iter)]

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """The pictures as A1111 returns them: with a mask, the original outside it, blended across the
        blurred edge; otherwise as generated."""
        if self.overlay is None:
            return list(images)
        original, mask = self.overlay
        out = []
        for image in images:
            size = image.size
            kept = original.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            out.append(Image.composite(image.convert("RGB"), kept, mask.resize(size, Image.Resampling.LANCZOS)))
        return out


# -- samplers and schedules ---------------------------------------------------------------------------

# The aliases A1111's /samplers lists for each sampler edgediff has (k-diffusion's names, and the
# lower-case ones of its compvis samplers), which clients may send in place of the name.
SAMPLER_ALIASES: dict[str, tuple[str, ...]] = {
    "euler_a": ("k_euler_a", "k_euler_ancestral"),
    "euler": ("k_euler",),
    "dpmpp_2m": ("k_dpmpp_2m",),
    "dpmpp_2m_karras": ("k_dpmpp_2m_ka",),
    "ddim": ("ddim",),
    "pndm": ("plms",),
    "lcm": ("k_lcm",),
}

# A1111 1.9+'s `scheduler` field: (name, label) -> edgediff's timestep spacing (None: the model's own).
# Karras is a sampler of its own in edgediff (DPM++ 2M Karras): handled in _scheduler.
SCHEDULE_TYPES: dict[tuple[str, str], str | None] = {
    ("automatic", "Automatic"): None,
    ("uniform", "Uniform"): "linspace",
    ("karras", "Karras"): None,
    ("sgm_uniform", "SGM Uniform"): "trailing",
}


def samplers() -> list[dict]:
    """A1111's /sdapi/v1/samplers: the samplers edgediff has, by A1111's names."""
    order = [*SAMPLER_ALIASES, *(name for name in SCHEDULERS if name not in SAMPLER_ALIASES)]  # A1111's order
    return [{"name": SCHEDULERS[name].a1111_name, "aliases": list(SAMPLER_ALIASES.get(name, ())), "options": {}}
            for name in order if name in SCHEDULERS]


def schedulers() -> list[dict]:
    """A1111's /sdapi/v1/schedulers: the schedule types edgediff honours."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in SCHEDULE_TYPES]


def _sampler(value) -> str:
    """An A1111 sampler name or alias (or edgediff's own name), any case -> edgediff's scheduler."""
    if not isinstance(value, str):
        raise EdgediffTypeError(f"sampler_name must be a sampler's name such as \"Euler a\", not {_kind(value)}")
    wanted = value.strip().lower()
    for name, cls in SCHEDULERS.items():
        if wanted in (name, cls.a1111_name.lower(), *SAMPLER_ALIASES.get(name, ())):
            return name
    names = ", ".join(cls.a1111_name for cls in SCHEDULERS.values())
    raise EdgediffError(f"sampler_name {value!r} is not a sampler edgediff has; use one of: {names}")


def _scheduler(sampler: str | None, value) -> tuple[str | None, str | None, str]:
    """(edgediff scheduler, timestep spacing, A1111 label) for a sampler and A1111's `scheduler` field."""
    if value is None or value == "":
        return sampler, None, "Automatic"
    if not isinstance(value, str):
        raise EdgediffTypeError(f"scheduler must be a schedule type's name such as \"Karras\", not {_kind(value)}")
    for (name, label), spacing in SCHEDULE_TYPES.items():
        if value.strip().lower() in (name, label.lower()):
            break
    else:
        labels = ", ".join(label for _, label in SCHEDULE_TYPES)
        raise EdgediffError(f"scheduler {value!r} is not a schedule type edgediff has; use one of: {labels}")
    if name == "karras":
        if sampler not in ("dpmpp_2m", "dpmpp_2m_karras"):
            what = SCHEDULERS[sampler].a1111_name if sampler else "the model's own sampler"
            raise EdgediffError(f"scheduler Karras: edgediff has a Karras schedule for DPM++ 2M only, not for "
                                f"{what}; use sampler_name \"DPM++ 2M\" or scheduler \"Automatic\"")
        sampler = "dpmpp_2m_karras"
    return sampler, spacing, label


# -- the requests -------------------------------------------------------------------------------------

# Fields edgediff does not act on, with the values that ask for nothing. Any other value is named in
# Job.ignored. (hr_* and firstphase_* only count when enable_hr is on, which is itself named.)
_INERT: dict[str, tuple] = {
    "enable_hr": (False, None),
    "styles": ([], None),
    "subseed_strength": (0, None),
    "seed_resize_from_h": (-1, 0, None),
    "seed_resize_from_w": (-1, 0, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "s_churn": (0, None),
    "s_tmax": (0, None),
    "s_tmin": (0, None),
    "s_noise": (1, None),
    "s_min_uncond": (0, None),
    "save_images": (False, None),  # the server keeps nothing: the pictures are in the answer
    "alwayson_scripts": ({}, None),
    "refiner_checkpoint": (None, "", "None"),
    "disable_extra_networks": (False, None),
    "infotext": (None, ""),
    "initial_noise_multiplier": (1, None),
    "mask_round": (True, None),  # edgediff binarizes masks at 0.5: rounding is what it does
    "latent_mask": (None, ""),
}
# Fields that ask nothing of edgediff whatever their value: bookkeeping, or the knobs of a feature that
# is off (subseed without subseed_strength, a script's arguments without a script ...).
_INERT_ANY = {"subseed", "do_not_save_samples", "do_not_save_grid", "comments", "force_task_id", "script_args",
              "refiner_switch_at", "firstpass_image", "image_cfg_scale", "inpaint_full_res_padding", "user",
              "include_init_images", "override_settings_restore_afterwards", "sampler_index"}
_TXT2IMG = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "batch_size", "n_iter",
            "sampler_name", "scheduler", "send_images", "override_settings", "script_name", "eta",
            "denoising_strength"}  # txt2img's denoising_strength is the hires pass's: off with enable_hr
_IMG2IMG = (_TXT2IMG - {"denoising_strength"}) | {"init_images", "denoising_strength", "mask", "mask_blur",
                                                  "mask_blur_x", "mask_blur_y", "inpainting_fill",
                                                  "inpainting_mask_invert", "inpaint_full_res", "resize_mode"}



def txt2img_job(body: Mapping[str, Any], limits: Limits = Limits()) -> Job:
    """A checked /sdapi/v1/txt2img body (also one line of `edgediff batch`)."""
    body = _object(body)
    kwargs, ignored, extra = _common(body, limits, _TXT2IMG)
    return Job(kwargs, ignored=tuple(ignored), mode="txt2img", parameters=dict(body), **extra)


def img2img_job(body: Mapping[str, Any], limits: Limits = Limits()) -> Job:
    """A checked /sdapi/v1/img2img body: init_images (one), and with a mask, inpainting."""
    body = _object(body)
    kwargs, ignored, extra = _common(body, limits, _IMG2IMG)
    images = body.get("init_images")
    if not isinstance(images, (list, tuple)) or not images:
        raise EdgediffError("init_images must be a list holding one base64-encoded image")
    if len(images) > 1:
        raise EdgediffError(f"init_images holds {len(images)} images and edgediff takes one per request; send "
                            "one request per image")
    image = decode_image(images[0], "init_images[0]")
    mask = body.get("mask")
    mask = decode_image(mask, "mask") if mask not in (None, "") else None
    strength = arg.real("denoising_strength", body.get("denoising_strength", 0.75), 0.0, 1.0)
    kwargs["strength"] = strength

    resize_mode = _whole(body, "resize_mode", 0, 0, 3)
    if resize_mode == 1 and kwargs["width"] and kwargs["height"]:  # crop and resize: the centre, at the aspect
        size = (kwargs["width"], kwargs["height"])
        image = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
        mask = ImageOps.fit(mask, size, Image.Resampling.LANCZOS) if mask is not None else None
    elif resize_mode in (2, 3):  # resize and fill, latent upscale: resized as mode 0 is
        ignored.append("resize_mode")

    overlay = None
    original = image  # what A1111 pastes back outside the mask: the picture as sent, not as filled
    if mask is not None:
        mask = mask.convert("L")
        if _flag(body, "inpainting_mask_invert", 0):
            mask = ImageOps.invert(mask)
        blur = _whole(body, "mask_blur", 4, 0, limits.max_mask_blur)
        blur_x = _whole(body, "mask_blur_x", blur, 0, limits.max_mask_blur)
        blur_y = _whole(body, "mask_blur_y", blur, 0, limits.max_mask_blur)
        if blur_x or blur_y:  # A1111 blurs the mask before using it, and pastes the original back through it
            mask = mask.filter(ImageFilter.GaussianBlur((blur_x, blur_y)))
        fill = _whole(body, "inpainting_fill", 0, 0, 3)
        if fill == 0:  # "fill": the hole painted with its surroundings' colours before encoding
            image = _fill(image, mask)
        elif fill == 3 or (fill == 2 and strength < 1.0):
            # latent nothing, and latent noise below full strength: edgediff starts the masked area from
            # the noised original (fill 1); at strength 1, from pure noise, which is what fill 2 asks
            ignored.append("inpainting_fill")
        if body.get("inpaint_full_res") not in (None, False, 0):
            ignored.append("inpaint_full_res")  # "only masked": edgediff inpaints at the whole picture's size
        overlay = (original, mask)
    kwargs["image"] = image
    kwargs["mask_image"] = mask
    parameters = dict(body)
    if not body.get("include_init_images"):  # A1111 leaves the images out of the echo unless asked
        parameters["init_images"] = None
        parameters["mask"] = None
    return Job(kwargs, ignored=tuple(ignored), mode="img2img", parameters=parameters, overlay=overlay, **extra)


def _common(body: Mapping[str, Any], limits: Limits, honoured: set[str]) -> tuple[dict, list[str], dict]:
    """The fields txt2img and img2img share: (pipeline kwargs, ignored fields, Job's other fields)."""
    if body.get("script_name") not in (None, ""):
        raise EdgediffError(f"script_name {body['script_name']!r}: edgediff runs no A1111 scripts; leave it out")
    prompt = _text(body, "prompt", limits)
    negative = _text(body, "negative_prompt", limits)
    _check_lora_tags(prompt)
    steps = _whole(body, "steps", 20, 1, limits.max_steps)
    cfg = arg.real("cfg_scale", body.get("cfg_scale", 7.0), 0.0)
    width, height = (_whole(body, side, None, 8, limits.max_side) for side in ("width", "height"))
    for side, value in (("width", width), ("height", height)):
        if value is not None and value % 8:  # A1111's rule; the model may ask more (SD: 64), said when it runs
            raise EdgediffError(f"{side} {value} is not a multiple of 8; try {max(8, round(value / 8) * 8)}")
    if width and height and width * height > limits.max_pixels:
        raise EdgediffError(f"width x height {width}x{height} is {width * height / 1e6:.1f} megapixels, more than "
                            f"the {limits.max_pixels / 1e6:.1f} this server makes; ask for a smaller size")
    batch = _whole(body, "batch_size", 1, 1, limits.max_batch_size)
    n_iter = _whole(body, "n_iter", 1, 1, limits.max_n_iter)
    seed = body.get("seed", -1)
    seed = rnd.random_seed() if seed is None or (_is_int(seed) and seed == -1) else \
        arg.whole("seed", seed, 0, rnd.MAX_SEED, " (or -1 for a random seed)")

    asked = body.get("sampler_name") or body.get("sampler_index")  # sampler_index: A1111's older name
    sampler = _sampler(asked) if asked else None
    sampler, spacing, label = _scheduler(sampler, body.get("scheduler"))

    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, Mapping):
        raise EdgediffTypeError(f"override_settings must be an object of settings, not {_kind(overrides)}")
    model = overrides.get("sd_model_checkpoint")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise EdgediffTypeError(f"override_settings.sd_model_checkpoint must be a model's name from "
                                f"/sdapi/v1/sd-models, not {_kind(model)}")

    ignored = [k for k in body if k not in honoured and k not in _INERT_ANY and body[k] not in _INERT.get(k, ())
               and not (k.startswith(("hr_", "firstphase_")) and not body.get("enable_hr"))]
    ignored += [f"override_settings.{k}" for k in overrides if k != "sd_model_checkpoint"]
    eta = body.get("eta")
    # A1111's eta is the noise of the ancestral samplers (1 by default) and of DDIM (0); edgediff's run at
    # those values, and the other samplers have none
    if eta is not None and ((sampler in ("euler_a", "lcm") and eta != 1) or (sampler == "ddim" and eta != 0)):
        ignored.append("eta")

    kwargs = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                  width=width, height=height, seed=seed, scheduler=sampler, num_images_per_prompt=batch,
                  timestep_spacing=spacing)
    extra = dict(n_iter=n_iter, sampler_name=SCHEDULERS[sampler].a1111_name if sampler else None,
                 schedule_type=label, model=model.strip() if model else None,
                 restore_model=_flag(body, "override_settings_restore_afterwards", True),
                 send_images=_flag(body, "send_images", True))
    return kwargs, ignored, extra


def _check_lora_tags(prompt: str) -> None:
    """A prompt's <lora:name:weight> names a LoRA of the server's LoRA folder, never a file elsewhere."""
    _, tags = adapters.lora_tags(prompt)
    for name, _ in tags:
        if "/" in name or "\\" in name or name in (".", "..") or PureWindowsPath(name).drive:
            raise EdgediffError(f"prompt: <lora:{name}> must name a LoRA of the server's LoRA folder (see "
                                "/sdapi/v1/loras), not a path")


# -- images in and out --------------------------------------------------------------------------------

_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def decode_image(value, what: str) -> Image.Image:
    """A base64 image as A1111's clients send it, with or without a `data:image/png;base64,` prefix."""
    if not isinstance(value, str):
        raise EdgediffTypeError(f"{what} must be a base64-encoded image (a string), not {_kind(value)}")
    text = _DATA_URL.sub("", value.strip())
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EdgediffError(f"{what} is not base64; send the image file's bytes base64-encoded") from None
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        open_image(image, what)  # refuses a decompression bomb before any pixel is decoded
        image.load()
    except EdgediffError:
        raise
    except Image.UnidentifiedImageError:
        raise EdgediffError(f"{what} is not an image: its bytes are in no format Pillow reads; send a PNG or "
                            "JPEG") from None
    except Exception as e:  # PIL's many ways of saying "not an image I can read"
        raise EdgediffError(f"{what} is not an image Pillow can read ({first_line(e)}); send a PNG or "
                            "JPEG") from None
    return image


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """A PNG, base64, carrying A1111's `parameters` text chunk (engine/images.py's Parameters.a1111())."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def read_parameters(text: str) -> dict[str, str]:
    """A1111's `parameters` text -> its fields, as A1111's /png-info parses them: "Prompt", "Negative
    prompt", then each "Key: value" of the last line (quotes taken off), Size also as Size-1 and Size-2."""
    lines = text.strip().split("\n")
    last = lines.pop() if lines and re.match(r"^\s*[\w ()+-]+:\s*\S", lines[-1]) and "Steps:" in lines[-1] else ""
    prompt, negative, into_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*([\w ()+-]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)', last):
        out[key.strip()] = value[1:-1] if value.startswith('"') and value.endswith('"') else value.strip()
    if re.fullmatch(r"\d+x\d+", out.get("Size", "")):
        out["Size-1"], out["Size-2"] = out["Size"].split("x")
    return out


def info(job: Job, parameters: list, model_name: str, model_hash: str | None, interrupted: bool = False,
         skipped: int = 0) -> str:
    """A1111's `info`: a JSON string describing the images made (Processed.js()'s main fields), with
    edgediff's warnings about ignored fields, and whether the run was interrupted or a batch skipped."""
    kw = job.kwargs
    first = parameters[0] if parameters else None
    warnings = [f"edgediff ignored: {', '.join(job.ignored)}"] if job.ignored else []
    return json.dumps({
        "prompt": first.prompt if first else kw["prompt"],
        "all_prompts": [p.prompt for p in parameters],
        "negative_prompt": kw["negative_prompt"],
        "all_negative_prompts": [p.negative_prompt for p in parameters],
        "seed": first.seed if first else kw["seed"],
        "all_seeds": [p.seed for p in parameters],
        "subseed": -1, "all_subseeds": [-1] * len(parameters), "subseed_strength": 0,
        "width": first.width if first else kw["width"],
        "height": first.height if first else kw["height"],
        "sampler_name": first.sampler if first else job.sampler_name,
        "scheduler": job.schedule_type,
        "cfg_scale": kw["guidance_scale"],
        "steps": kw["num_inference_steps"],
        "batch_size": kw["num_images_per_prompt"],
        "n_iter": job.n_iter,
        "restore_faces": False,
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "denoising_strength": kw.get("strength") if job.mode == "img2img" else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [p.a1111() for p in parameters],
        "styles": [],
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": "edgediff",
        "interrupted": interrupted,
        "skipped_batches": skipped,
        "warnings": warnings,
    })


# -- small checks -------------------------------------------------------------------------------------


def _object(body) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise EdgediffTypeError(f"the request body must be a JSON object of A1111's fields, not {_kind(body)}")
    return body


def _text(body: Mapping, name: str, limits: Limits) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EdgediffTypeError(f"{name} must be a string, not {_kind(value)}")
    if len(value) > limits.max_prompt_chars:
        raise EdgediffError(f"{name} is {len(value)} characters, more than the {limits.max_prompt_chars} this "
                            "server reads; shorten it")
    return arg.texts(name, value)[0]  # valid UTF-8


def _whole(body: Mapping, name: str, default, minimum: int, maximum: int):
    value = body.get(name)
    return default if value is None else arg.whole(name, value, minimum, maximum)


def _flag(body: Mapping, name: str, default: bool) -> bool:
    """A1111's booleans, and its 0/1 integers (inpainting_mask_invert)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or (_is_int(value) and value in (0, 1)):
        return bool(value)
    raise EdgediffTypeError(f"{name} must be true or false (or 1 or 0), not {_kind(value)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    """A JSON value's type by JSON's names, for messages read by clients in any language."""
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"),
                        (Mapping, "an object"), ((list, tuple), "a list")):
        if isinstance(value, types):
            return f"{name} ({json.dumps(value)[:40]})" if isinstance(value, (bool, int, float)) else name
    return type(value).__name__


def _fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0: the masked area painted with the colours around it, by layering ever
    sharper blurs of the kept pixels (premultiplied by their alpha, so the hole adds no black), then the
    kept pixels on top."""
    size = image.size
    keep = ImageOps.invert(mask.resize(size, Image.Resampling.LANCZOS))
    kept = Image.new("RGBa", size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA") if radius else kept.convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(layer)
    return filled.convert("RGB")
