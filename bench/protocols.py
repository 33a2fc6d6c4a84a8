"""What a benchmark runs: named, fixed protocols, and the edgediff configurations compared in one table.

A protocol fixes everything that changes the work: the model, the size, the batch, the steps, the
guidance, the scheduler, the prompt and the seed (and so the initial latents, which every runner gets
as the same array). Overriding any of it (`--steps 2`) makes a custom run, and the report says which
fields were changed, so a figure is never quoted as "sd15-512" when it was not.

    python -m edgediff.bench.protocols prepare MODEL [--dtype fp16] [--variant default]
        Export MODEL for the benchmark if it is not yet (in a process of its own: exporting imports
        torch, the benchmark's parent process does not), and print {"onnx": ..., "diffusers": ...,
        "source_sha256": ...}: the folder edgediff runs, the diffusers folder the peers load (or null)
        and the hash of the source's content (the key of the optimum exports kept for it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..engine.errors import EdgediffError

PROMPT = "a photograph of an astronaut riding a horse"  # diffusers' example prompt


@dataclass(frozen=True)
class Protocol:
    name: str
    # "sd15", "sdxl": bench/sd15.py's and bench/sdxl.py's random-weight architectures; "builtin"; or any
    # source `edgediff export` takes
    model: str
    width: int
    height: int
    steps: int
    batch: int = 1  # images per prompt
    guidance: float = 7.5  # CFG scale: the UNet sees 2 x batch per step
    scheduler: str = "euler"  # Euler discrete: deterministic, the same in edgediff and every peer
    prompt: str = PROMPT
    negative: str = ""
    seed: int = 42  # the initial latents: edgediff.engine.noise's draw for this seed, saved and given to all
    # A first call of this many steps before the timed one, in the same process: the first run of an ONNX
    # Runtime session (or a torch module) pays for allocations and kernel choices the next ones do not.
    warmup_steps: int = 1
    overrides: tuple[str, ...] = ()  # fields changed from the named protocol


PROTOCOLS = {
    "sd15-512": Protocol("sd15-512", "sd15", 512, 512, 20),
    "sd15-256": Protocol("sd15-256", "sd15", 256, 256, 20),
    # SDXL base at its native size, and at 512x512 with few steps: short enough for a CPU (the UNet's
    # 2.6B parameters cost about three times SD 1.5's per latent pixel)
    "sdxl-1024": Protocol("sdxl-1024", "sdxl", 1024, 1024, 20),
    "sdxl-512": Protocol("sdxl-512", "sdxl", 512, 512, 4),
    # CI: the built-in model at its native 64x64, few steps; seconds per run
    "tiny": Protocol("tiny", "builtin", 64, 64, 8),
}

def _taesd() -> dict:
    from ..engine.files import cache_root
    from .random_weights import taesd

    return {"tiny_vae": str(taesd(cache_root() / "bench" / "taesd-random-seed0"))}


# Export variants an edgediff row may ask for, beyond --dtype: name -> a function giving ExportOptions
# fields (evaluated in the child process that exports). A row names one, or several joined by "+"
# ("deepcache+tinyvae"). tinyvae's autoencoder has TAESD's architecture and random weights.
VARIANTS: dict[str, object] = {
    "default": dict,
    "deepcache": lambda: {"deep_cache": "auto"},  # the shallow UNet for cache=N (depth measured at export)
    "deepcache1": lambda: {"deep_cache": "1"},  # the cheapest depth, forced: DeepCache's branch 0
    "tinyvae": _taesd,  # the tiny decoder for vae=tiny
}


def variant_options(variant: str) -> dict:
    """The ExportOptions fields of a variant name ("default", "deepcache", "deepcache+tinyvae")."""
    options = {}
    for name in variant.split("+"):
        options.update(VARIANTS[name]())
    return options
DTYPES = ("fp32", "fp16", "int8")
BENCH_MODELS = ("sd15", "sdxl")  # built locally with random weights (bench/export_memory.MODELS)
PEERS = ("diffusers", "optimum", "optimum-intel")  # bench/peers.py runs them


def protocol(name: str, model: str | None = None, steps: int | None = None, width: int | None = None,
             height: int | None = None, batch: int | None = None, warmup: int | None = None) -> Protocol:
    """The named protocol with any of its fields overridden (recorded in `overrides`)."""
    if name not in PROTOCOLS:
        raise EdgediffError(f"unknown protocol {name!r}; use one of: {', '.join(PROTOCOLS)} "
                            "(and --steps/--width/--height/--batch for custom runs)")
    base = PROTOCOLS[name]
    changed = {k: v for k, v in dict(model=model, steps=steps, width=width, height=height, batch=batch,
                                     warmup_steps=warmup).items() if v is not None and v != getattr(base, k)}
    for key in ("steps", "width", "height", "batch"):
        if key in changed and changed[key] < 1:
            raise EdgediffError(f"--{key} must be at least 1, not {changed[key]}")
    for key in ("width", "height"):
        if key in changed and changed[key] % 8:
            raise EdgediffError(f"--{key} {changed[key]} is not a multiple of 8")
    if changed.get("warmup_steps", 0) < 0:
        raise EdgediffError("--warmup must be 0 or more steps")
    return dataclasses.replace(base, **changed, overrides=tuple(sorted(changed)))


@dataclass(frozen=True)
class EdgediffOptions:
    """One edgediff row: how the model is exported and which plan runs it."""

    dtype: str = "fp32"
    plan: str | None = None  # force a planner rung (resident, sequential-cfg, ..., lowest); None: the planner's pick
    budget: str | None = None  # the memory budget given to the planner ("4GB")
    variant: str = "default"  # an export variant of VARIANTS
    backend: str = "cpu"  # cpu keeps rows comparable with the CPU peers; auto, cuda, rocm, coreml
    # the generation's speed levers (issue 15), each off by default: feature caching every `cache` steps
    # (variant deepcache), guidance only for sigmas in "LOW-HIGH", the tiny decoder (variant tinyvae)
    cache: int = 1
    guidance_interval: str | None = None
    vae: str = "full"  # or tiny (variant tinyvae), or int8 (dtype int8: its int8 decoder)
    precision: str = "f32"  # or bf16: the plan's arithmetic where the device is fast at it (openvino)

    def label(self) -> str:
        parts = ["edgediff", self.dtype]
        if self.variant != "default":
            parts.append(self.variant)
        if int(self.cache) > 1:
            parts.append(f"cache {self.cache}")
        if self.guidance_interval:
            parts.append(f"cfg in {self.guidance_interval}")
        if self.vae != "full":
            parts.append(f"{self.vae} vae")
        if self.precision != "f32":
            parts.append(self.precision)
        if self.plan:
            parts.append(self.plan)
        if self.budget:
            parts.append(f"budget {self.budget}")
        if self.backend != "cpu":
            parts.append(self.backend)
        return " ".join(parts)

    def check(self) -> "EdgediffOptions":
        from ..engine.plan import RUNGS, parse_budget

        if self.dtype not in DTYPES:
            raise EdgediffError(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")
        for name in str(self.variant).split("+"):
            if name not in VARIANTS:
                raise EdgediffError(f"unknown export variant {name!r}; this edgediff has: {', '.join(VARIANTS)} "
                                    "(join several with +)")
        try:
            cache = int(self.cache)
            interval = None if not self.guidance_interval else \
                tuple(float(v) for v in str(self.guidance_interval).split("-"))
        except ValueError:
            raise EdgediffError(f"--edgediff cache={self.cache} guidance_interval={self.guidance_interval}: "
                                "cache takes a whole number of steps, guidance_interval LOW-HIGH sigmas "
                                "(0.28-5.42)") from None
        if cache < 1 or (interval is not None and len(interval) != 2):
            raise EdgediffError("--edgediff: cache must be at least 1, guidance_interval two sigmas LOW-HIGH")
        if cache > 1 and not any(v.startswith("deepcache") for v in str(self.variant).split("+")):
            raise EdgediffError(f"--edgediff cache={cache} needs the deepcache export: add variant=deepcache")
        if self.vae not in ("full", "tiny", "int8") or (self.vae == "tiny" and "tinyvae" not in str(self.variant).split("+")) \
                or (self.vae == "int8" and self.dtype != "int8"):
            raise EdgediffError(f"--edgediff vae={self.vae}: full, tiny with variant=tinyvae, or int8 with dtype=int8")
        if self.precision not in ("f32", "bf16"):
            raise EdgediffError(f"--edgediff precision={self.precision}: f32 or bf16")
        rungs = [r[0] for r in RUNGS]
        if self.plan is not None and self.plan not in rungs:
            raise EdgediffError(f"unknown plan {self.plan!r}; use one of: {', '.join(rungs)}")
        if self.plan and self.budget:
            raise EdgediffError("give a row --plan or --budget, not both (--plan sets the budget that forces it)")
        parse_budget(self.budget)  # a typo is refused now, not after the other rows ran
        return self


def edgediff_rows(specs: list[str] | None, default: EdgediffOptions) -> list[EdgediffOptions]:
    """The rows `--edgediff dtype=fp16,plan=streamed` asks for (repeatable); `default` when none is."""
    if not specs:
        return [default.check()]
    fields = {f.name for f in dataclasses.fields(EdgediffOptions)}
    rows = []
    for spec in specs:
        values = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise EdgediffError(f"--edgediff {spec!r}: write it as key=value pairs separated by commas, "
                                    f"with keys {', '.join(sorted(fields))}")
            values[key] = value
        rows.append(dataclasses.replace(default, **values).check())
    labels = [r.label() for r in rows]
    if len(set(labels)) != len(labels):
        raise EdgediffError(f"two --edgediff rows are the same: {', '.join(labels)}")
    return rows


def peers(against: str | None) -> list[str]:
    names = [n.strip() for n in (against or "").split(",") if n.strip()]
    for name in names:
        if name not in PEERS:
            raise EdgediffError(f"unknown peer {name!r} in --against; use one of: {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


# Preparing a model (run in a child process: exporting imports torch)

def prepare(model: str, dtype: str = "fp32", variant: str = "default") -> dict:
    """The exported folder edgediff runs and the diffusers folder the peers load, exporting if needed."""
    from ..export.onnx_export import ExportOptions
    from ..export.sources import ensure_exported, export_model

    options = ExportOptions(dtype=dtype, **variant_options(variant))
    folder = Path(model).expanduser()
    if model in BENCH_MODELS:
        from .export_memory import built, exported

        source = built(model)
        if options == ExportOptions(dtype=dtype):  # the folder bench/export_memory.py keeps, shared
            onnx = exported(model, dtype)
            if not (onnx / "edgediff.json").is_file():
                export_model(source, onnx, options, force=True)
        else:
            onnx = ensure_exported(source, options)
        return {"onnx": str(onnx), "diffusers": str(source)}
    if folder.is_dir() and (folder / "edgediff.json").is_file():  # an edgediff export: its source, again
        manifest = json.loads((folder / "edgediff.json").read_text())
        source = manifest.get("source", {})
        diffusers = _diffusers_folder(source)
        if manifest.get("dtype", "fp32") == dtype and variant == "default":
            return {"onnx": str(folder), "diffusers": diffusers}
        ref = source.get("ref")
        if not ref:
            raise EdgediffError(f"{folder} is a {manifest.get('dtype')} export that does not name its source; "
                                f"give the source as --model to benchmark {dtype}")
        return {"onnx": str(ensure_exported(ref, options)), "diffusers": diffusers}
    if folder.is_dir() and (folder / "unet" / "model.onnx").is_file():  # optimum's layout, no manifest
        return {"onnx": str(folder), "diffusers": None}
    onnx = ensure_exported(model, options)
    from ..export.sources import identify

    return {"onnx": str(onnx), "diffusers": _diffusers_folder(identify(model).describe())}


def _diffusers_folder(source: dict) -> str | None:
    """The diffusers folder a source names, for diffusers' pipeline: a folder or the built-in model; None for
    single files and hub ids (their conversion is not kept)."""
    if source.get("kind") == "builtin":
        from ..builtin import MODEL_DIR

        return str(MODEL_DIR)
    if source.get("kind") == "diffusers-folder" and Path(source.get("ref", "")).is_dir():
        return source["ref"]
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgediff.bench.protocols")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="export a model for the benchmark; print its folders as JSON")
    prep.add_argument("model")
    prep.add_argument("--dtype", default="fp32", choices=DTYPES)
    prep.add_argument("--variant", default="default", help=f"{', '.join(VARIANTS)}, or several joined by +")
    args = p.parse_args(argv)
    try:
        folders = prepare(args.model, args.dtype, args.variant)
        if folders["diffusers"]:
            from ..export.sources import identify

            folders["source_sha256"] = identify(folders["diffusers"]).sha256
        print(json.dumps(folders))
    except EdgediffError as e:
        sys.exit(f"edgediff: error: {e}")


if __name__ == "__main__":
    main()
