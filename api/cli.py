"""The `edgediff` command: demo, export, generate, plan, devices, loras, batch, bench, serve.

Bad input ends in one line, `edgediff: error: ...`, exit status 2, and no file written. Anything else
that goes wrong is one line naming the exception, exit status 1 (`--debug` shows the traceback).
Ctrl-C and SIGTERM stop a run the same way, deleting what it had half-written (engine/files.py); the
exit status is the shell's convention, 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .engine.errors import EdgediffError, first_line

log = logging.getLogger("edgediff")

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as a KeyboardInterrupt so that every cleanup written for Ctrl-C runs for it too."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="edgediff: %(message)s")
    logging.getLogger("edgediff").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    with _sigterm_raises():
        try:
            return args.run(args) or 0
        except EdgediffError as e:
            print(f"edgediff: error: {e}", file=sys.stderr)
            return 2
        except Terminated:
            print("edgediff: terminated", file=sys.stderr)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            print("edgediff: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # a bug, or a failure nobody turned into a sentence: named, never silenced
            if args.debug:
                raise
            kind = type(e).__qualname__ if type(e).__module__ == "builtins" else \
                f"{type(e).__module__}.{type(e).__qualname__}"
            what = f"{kind}: {first_line(e)}" if str(e).strip() else kind
            print(f"edgediff: unexpected error: {what} (run again with --debug for the traceback)",
                  file=sys.stderr)
            return 1


@contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM (what `kill`, systemd and container runtimes send) raises
    Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt; the previous handler comes back
    after. Signal handlers can only be set from the main thread: elsewhere SIGTERM keeps its meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line like every other error, not the usage
    block argparse prints above it (the usage is a `--help` away, and the line says so). Subcommand
    parsers are made by the same class (argparse uses the parent's class for them)."""

    def error(self, message: str):
        self.exit(2, f"edgediff: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    from .backends import REGISTRY, automatic
    from .backends.coreml.session import COMPUTE_UNITS
    from .engine.schedulers import SCHEDULERS
    from .engine.schedulers.base import TIMESTEP_SPACINGS

    backends = f"auto (the first of {', '.join(automatic())} that runs here) or one of {', '.join(REGISTRY)}"

    p = _OneLineParser(prog="edgediff", description="Stable Diffusion on the hardware you have.")
    p.add_argument("-v", "--verbose", action="store_true", help="say more about what happens")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the built-in model, export it, generate and time an image")
    demo.add_argument("--out", default="edgediff-demo", help="folder for the pictures (default: %(default)s)")
    demo.add_argument("--backend", default="auto", help=backends)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=42)
    demo.set_defaults(run=_demo)

    export = sub.add_parser("export", help="export a checkpoint (folder, .safetensors file, hub id) to ONNX or Core ML")
    export.add_argument("src", help="a diffusers folder, a .safetensors/.ckpt file, a hub id, or `builtin`")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--format", default="onnx", choices=("onnx", "coreml"))
    export.add_argument("--dtype", default=None, choices=("fp32", "fp16", "int8"),
                        help="fp16 keeps the numerically fragile parts in fp32; int8 quantizes the UNet for "
                             "CPUs, calibrated on its own generations (default: fp32 for ONNX, fp16 for Core ML)")
    export.add_argument("--attention", default=None, choices=("fused", "standard", "sliced", "split-einsum"),
                        help="fused (ONNX default): ONNX Runtime's fused attention kernel; standard (Core ML "
                             "default): the plain graph; sliced: less memory without fused kernels; "
                             "split-einsum: Apple's Neural Engine layout")
    export.add_argument("--slices", type=int, default=16, help="sliced attention: query slices (default: %(default)s)")
    export.add_argument("--config", default=None,
                        help="single files: a diffusers folder whose configs describe the checkpoint")
    export.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                        help="single files: override what the checkpoint's family implies")
    export.add_argument("--no-safety-checker", action="store_true", help="leave the safety checker out")
    export.add_argument("--tiny-vae", default=None, metavar="SOURCE",
                        help="also export a tiny autoencoder's decoder (TAESD: a folder, or a hub id such as "
                             "madebyollin/taesd) for drafts (generate --vae-decoder tiny) and previews")
    export.add_argument("--deep-cache", nargs="?", const="auto", default=None, metavar="DEPTH",
                        help="also export the UNet's shallow path for feature caching (generate "
                             "--cache-interval N); DEPTH 1-3 (1 is fastest) or auto: measured at export")
    export.add_argument("--sizes", default=None, metavar="WxH,...",
                        help="Core ML: the image sizes the packages take (default: 512x512, or --width x --height)")
    export.add_argument("--width", type=int, default=512, help="Core ML: the image width, when --sizes is not given")
    export.add_argument("--height", type=int, default=512, help="Core ML: the image height, when --sizes is not given")
    export.add_argument("--batch", type=int, default=1, help="Core ML: the most images per call")
    export.add_argument("--compute-units", default="ALL", choices=tuple(COMPUTE_UNITS),
                        help="Core ML: the compute units the packages are made for (default: %(default)s)")
    export.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="bake a LoRA (.safetensors) into the exported weights, at WEIGHT (default 1); "
                             "repeatable. What Core ML packages and int8 UNets need: they cannot take one when "
                             "loaded")
    export.add_argument("--lora-dir", default=None, metavar="DIR", help="where --lora names are found")
    export.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="replace --out if it already holds something")
    export.set_defaults(run=_export)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True,
                     help="an exported folder, or any export source (exported once into the cache): "
                          "`builtin`, a diffusers folder, a .safetensors file, a hub id")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--guidance-interval", default=None, metavar="LOW,HIGH",
                     help="guide only the steps whose noise level sigma is in (LOW, HIGH] (e.g. 0.28,5.42); "
                          "the others skip the unconditional pass")
    gen.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                     help="default: the one the model folder's scheduler_config.json names")
    gen.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
                     help="override the model's schedule spacing: trailing (AUTOMATIC1111's SGM Uniform) for "
                          "Turbo and Lightning models, whose single files carry no scheduler config")
    gen.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default: the prompt)")
    gen.add_argument("--negative-2", default=None,
                     help="SDXL: the second text encoder's negative prompt (default: --negative)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--seed", type=int, default=-1, help="-1 for a random seed (default)")
    gen.add_argument("--batch", type=int, default=1, help="images to make (seeds seed, seed+1, ...)")
    gen.add_argument("--init-image", default=None, help="img2img: the starting picture")
    gen.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change it (0-1)")
    gen.add_argument("--mask", default=None, help="inpainting: white where to paint, black to keep")
    gen.add_argument("--backend", default="auto", help=backends)
    gen.add_argument("--budget", default=None,
                     help="memory budget, e.g. 4GB (default: 7GB, capped by what the device has free)")
    gen.add_argument("--cache-interval", type=int, default=1, metavar="N",
                     help="feature caching (an export with --deep-cache): the full UNet every N steps, its "
                          "shallow path between (default 1: every step, exact)")
    gen.add_argument("--precision", default="f32", choices=("f32", "bf16"),
                     help="bf16: bf16 arithmetic where the device is fast at it (the openvino backend on "
                          "AVX512_BF16 or AMX CPUs); the plan says which it runs (default: f32, exact)")
    gen.add_argument("--vae-decoder", default="full", choices=("full", "tiny", "int8"),
                     help="tiny: the tiny autoencoder an export made with --tiny-vae has (drafts); int8: the "
                          "int8 decoder an export with --dtype int8 has")
    gen.add_argument("--no-safety-checker", action="store_true",
                     help="do not run the model's safety checker (which blacks out flagged images)")
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                     help="apply a LoRA at WEIGHT (default 1): a .safetensors file, or its name in --lora-dir; "
                          "repeatable")
    gen.add_argument("--lora-dir", default=None, metavar="DIR",
                     help="the LoRA folder: where --lora names and the prompt's <lora:name:weight> tags are found")
    gen.add_argument("--embedding-dir", default=None, metavar="DIR",
                     help="textual-inversion embeddings (.safetensors), each used where its file's name is in "
                          "the prompt")
    gen.add_argument("--out", default="out.png", help="PNG to write; a batch adds -1, -2, ...")
    gen.add_argument("--force", "--overwrite", dest="force", action="store_true",
                     help="replace --out (a batch: its numbered files) if it already exists")
    gen.set_defaults(run=_generate)

    plan = sub.add_parser("plan", help="print the memory plan a generation would follow, without generating")
    plan.add_argument("--model", required=True, help="an exported folder, or any export source")
    plan.add_argument("--width", type=int, default=None)
    plan.add_argument("--height", type=int, default=None)
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--guidance", type=float, default=7.5, help="1 or less: no unconditional pass")
    plan.add_argument("--img2img", action="store_true", help="plan for an init image (the VAE encoder runs)")
    plan.add_argument("--budget", default=None, help="e.g. 4GB (default: 7GB, capped by free memory)")
    plan.add_argument("--backend", default="auto", help=backends)
    plan.set_defaults(run=_plan)

    devices = sub.add_parser("devices", help="list the backends and what each would run on")
    devices.set_defaults(run=_devices)

    loras = sub.add_parser("loras", help="list the LoRAs of a folder: family, hash, rank, and whether each fits "
                                         "a model")
    loras.add_argument("--lora-dir", required=True, metavar="DIR", help="the LoRA folder")
    loras.add_argument("--model", default=None, help="an exported folder: say whether each LoRA fits it")
    loras.set_defaults(run=_loras)

    from . import batch as batch_run  # argparse and the standard library only, until it runs

    batch = sub.add_parser("batch", help="generate the images of a file of txt2img requests (JSON lines), "
                                         "resumably, here or on a Ray cluster")
    batch_run.add_arguments(batch, backends)
    batch.set_defaults(run=batch_run.run)

    from .bench import run as bench_run  # argparse and the standard library only, until it runs

    bench = sub.add_parser("bench", help="time a fixed protocol, against diffusers and optimum too; "
                                         "`bench compare A.json B.json` renders reports side by side")
    bench_run.add_arguments(bench)
    bench.set_defaults(run=bench_run.run)

    from . import serve as serve_run  # argparse and the standard library only, until it runs

    serve = sub.add_parser("serve", help="serve AUTOMATIC1111's /sdapi/v1 HTTP API (desktop apps, webuiapi) "
                                         "and a one-page UI")
    serve_run.add_arguments(serve, backends)
    serve.set_defaults(run=serve_run.run)

    # `--debug` after the command too, where one adds it to the command line that just failed;
    # SUPPRESS: a command that does not name it leaves the global one's value alone
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an unexpected error")
    return p


def _export(args) -> None:
    from .export.onnx_export import ExportOptions
    from .export.sources import export_model

    start = time.perf_counter()
    coreml = args.format == "coreml"
    if args.sizes is not None and not coreml:
        raise EdgediffError("--sizes is for Core ML packages (--format coreml): ONNX exports take any size")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise EdgediffError(f"--lora-dir {args.lora_dir} is not a folder")
    loras = _lora_args(args.lora, args.lora_dir)
    options = ExportOptions(dtype=args.dtype or ("fp16" if coreml else "fp32"),
                            attention=args.attention or ("standard" if coreml else "fused"),
                            slices=args.slices, safety_checker=not args.no_safety_checker, loras=loras,
                            tiny_vae=args.tiny_vae, deep_cache=args.deep_cache)
    manifest = export_model(args.src, args.out, options, force=args.force, config=args.config,
                            prediction_type=args.prediction_type,
                            coreml=dict(sizes=_sizes(args), batch=args.batch,
                                        compute_units=args.compute_units) if coreml else None)
    print(f"{'component':15s} {'format':7s} {'dtype':5s} {'attention':12s} {'size':>10s}  parity vs PyTorch fp32")
    for c in manifest["components"].values():
        psnr = "identical" if c["psnr"] is None else f"{c['psnr']:.1f} dB PSNR"
        print(f"{c['name']:15s} {c['format']:7s} {c['dtype']:5s} {c['attention']:12s} "
              f"{c['bytes'] / 2**20:6.1f} MiB  {psnr}, max abs diff {c['max_abs_diff']:.1e}")
    print(f"exported to {args.out} in {time.perf_counter() - start:.1f} s (manifest: {Path(args.out) / 'edgediff.json'})")


def _interval_arg(text: str | None) -> tuple[float, float] | None:
    """'0.28,5.42' -> (0.28, 5.42); the pipeline checks the values."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise EdgediffError(f"--guidance-interval {text!r} is not LOW,HIGH; write it like 0.28,5.42") from None


def _sizes(args) -> list[tuple[int, int]]:
    from .export.coreml_export import parse_sizes

    return parse_sizes(args.sizes) if args.sizes is not None else [(args.width, args.height)]


# A command's images are written as out-1.png ... out-N.png, each checked before the model loads: a
# batch beyond this is a typo, and checking a million paths alone took 35 s.
MAX_BATCH = 1000


def _generate(args) -> None:
    from .engine import arguments as arg
    from .engine.files import check_out
    from .engine.images import save_png
    from .engine.pipeline import Pipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise EdgediffError(f"--out {out} should end in .png")
    arg.whole("--batch", args.batch, 1, MAX_BATCH, " images; run the command again for more")
    # a batch of one is `out` itself; a batch of k, out-1.png ... out-k.png
    paths = [out] if args.batch == 1 else \
        [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(args.batch)]
    for path in paths:  # before the model is loaded: a wrong --out costs nothing
        check_out(path, args.force)
    for flag, folder in (("--lora-dir", args.lora_dir), ("--embedding-dir", args.embedding_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise EdgediffError(f"{flag} {folder} is not a folder")
    loras = _lora_args(args.lora, args.lora_dir)
    interval = _interval_arg(args.guidance_interval)
    pipe = Pipeline.from_pretrained(args.model, backend=args.backend, safety_checker=not args.no_safety_checker,
                                    memory_budget=args.budget, loras=loras, lora_dir=args.lora_dir,
                                    embedding_dir=args.embedding_dir)
    result = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, width=args.width, height=args.height, seed=args.seed,
                  scheduler=args.scheduler, num_images_per_prompt=args.batch, image=args.init_image,
                  strength=args.strength, mask_image=args.mask, progress=True, prompt_2=args.prompt_2,
                  negative_prompt_2=args.negative_2, timestep_spacing=args.timestep_spacing,
                  guidance_interval=interval, vae_decoder=args.vae_decoder, cache_interval=args.cache_interval,
                  precision=args.precision)
    flagged = result.nsfw_content_detected or [False] * len(paths)
    for image, params, path, nsfw in zip(result.images, result.parameters, paths, flagged):
        save_png(image, path, params.a1111())
        print(f"wrote {path} (seed {params.seed})" + (": flagged by the safety checker, blacked out" if nsfw else ""))
    print(f"backend: {pipe.device.backend} ({pipe.device.name}); " + _format_timings(result.timings))
    if result.loras:
        print("LoRAs: " + ", ".join(f"{name} at {weight:g}" for name, weight in result.loras))
    print(f"plan: {result.plan.summary()}")
    if result.peak_memory:
        print(f"memory: predicted peak {result.plan.predicted_peak / 2**30:.2f} GB, measured "
              f"{result.peak_memory / 2**30:.2f} GB (process resident peak)")
    for name in result.fp32_reruns:
        print(f"note: the fp16 {name} overflowed and was re-run in fp32")


DEMO_CAPTIONS = (
    "a red circle on a blue background",
    "a small yellow square in the top left corner on a green background",
    "a large white star on a purple background",
    "a blue triangle in the bottom right corner on a yellow background",
    "a orange diamond at the top on a black background",
    "a pink circle on the right on a cyan background",
)


def _demo(args) -> None:
    from .builtin import ensure_builtin
    from .engine.images import contact_sheet, save_png
    from .engine.pipeline import Pipeline

    start = time.perf_counter()
    model = ensure_builtin()
    prepared = time.perf_counter() - start
    pipe = Pipeline.from_pretrained(model, backend=args.backend)
    opened = time.perf_counter() - start - prepared
    print(f"model: built-in (a {pipe.model.native_size}x{pipe.model.native_size} Stable Diffusion trained on "
          "captioned shapes; see edgediff/builtin/model/README.md)")
    print(f"backend: {pipe.device.backend} ({pipe.device.name}); others: "
          + "; ".join(f"{u.backend}: {u.reason}" for u in _unavailable()))
    print(f"plan: {pipe.describe()}")
    out = Path(args.out)
    images, captions, totals = [], [], {}
    for k, caption in enumerate(DEMO_CAPTIONS):
        result = pipe(caption, num_inference_steps=args.steps, seed=args.seed + k)
        image, params = result.images[0], result.parameters[0]
        save_png(image, out / f"demo-{k + 1}.png", params.a1111())
        images.append(image)
        captions.append(caption)
        for stage, seconds in result.timings.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
        print(f"  {k + 1}. {caption!r} seed {params.seed}: {_format_timings(result.timings)}")
    sheet = save_png(contact_sheet(images, captions), out / "contact-sheet.png")
    n = len(DEMO_CAPTIONS)
    print(f"{n} images, {args.steps} steps, {result.parameters[0].sampler}: "
          f"{sum(totals.values()) / n * 1000:.0f} ms per image on average; "
          f"export {prepared:.2f} s (cached after the first run), sessions {opened:.2f} s")
    print(f"wrote {n} PNGs and {sheet.resolve()}")


def _plan(args) -> None:
    from .engine import arguments as arg
    from .engine.model_folder import read_model_folder
    from .engine.pipeline import backend_for, image_size
    from .engine.plan import Request, make_plan, parse_budget

    budget = parse_budget(args.budget)  # before anything slow: a bad budget is a typo
    # the checks generate makes, so that plan never plans what generate would refuse
    batch = arg.whole("--batch", args.batch, 1, MAX_BATCH)
    guidance = arg.real("--guidance", args.guidance, 0.0)
    folder = Path(args.model)
    if not ((folder / "edgediff.json").is_file() or (folder / "unet" / "model.onnx").is_file()):
        from .export.sources import ensure_exported

        folder = ensure_exported(args.model)
    model = read_model_folder(folder)
    _, device = backend_for(model, args.backend)
    width, height = image_size(args.width, args.height, None, model)
    model.check_request(width, height, batch)
    plan = make_plan(model, Request(width, height, batch, cfg=guidance > 1, img2img=args.img2img),
                     device, budget)
    print(plan.describe())


def _devices(args) -> None:
    from .backends import probe_all
    from .backends.base import Device

    # one line per backend, in priority order: what it found, or why it cannot run here
    for found in probe_all():
        if isinstance(found, Device):
            print(f"{found.backend:8s} available: {found.describe()}")
        else:
            print(f"{found.backend:8s} unavailable: {found.reason}")


def _lora_args(values: list[str], folder) -> list[tuple[Path, float]]:
    """[(file, weight)] from --lora's PATH[:WEIGHT] values, each file found (in `folder` for a bare name)
    before any model is loaded. A colon ends the path only when the whole value is not a file: a file
    may have one in its name, and a weight never holds a path separator (C:\\loras\\x on Windows)."""
    from .engine import adapters

    out = []
    for value in values:
        ref, weight = value, 1.0
        head, colon, tail = value.rpartition(":")
        if colon and head and tail and not Path(value).is_file() and not any(c in tail for c in "/\\"):
            weight = adapters.parse_weight(tail, f"--lora {value}", f"--lora {head}:0.8")
            ref = head
        out.append((adapters.find_lora(ref, Path(folder) if folder is not None else None), weight))
    return out


def _loras(args) -> None:
    from .engine import adapters

    folder = Path(args.lora_dir)
    if not folder.is_dir():
        raise EdgediffError(f"--lora-dir {folder} is not a folder")
    targets = None
    if args.model is not None:
        from .engine.model_folder import read_model_folder

        model = read_model_folder(args.model)
        targets = adapters.Targets.of_folder(model.path, model.family)
        if not targets.weights:
            raise EdgediffError(f"{model.path} records no weight map, which LoRAs need; export the model again "
                                "with `edgediff export`")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    # previews, notes and civitai's .json beside the LoRAs are not LoRAs: counted, not listed
    candidates = [p for p in files if p.suffix.lower() in (".safetensors", *adapters.PICKLE_SUFFIXES)]
    if not candidates:
        print(f"no LoRA files (.safetensors) in {folder}")
        return
    width = max(24, *(len(p.stem) for p in candidates))
    print(f"{'name':{width}s} {'family':8s} {'hash':12s} {'layers':>6s} {'rank':>5s}"
          + (f"  fits {model.name}" if targets is not None else ""))
    # one line per file, whatever is wrong with it: a bad file is named, and the listing goes on
    for path in candidates:
        try:
            lora = adapters.read_lora(path)
        except EdgediffError as e:
            label = "refused" if path.suffix.lower() in adapters.PICKLE_SUFFIXES else "cannot be used"
            print(f"{path.stem:{width}s} {label}: {e}")
            continue
        except Exception as e:  # a file nobody foresaw: named on its line, as main() names a bug
            print(f"{path.stem:{width}s} cannot be read: {type(e).__name__}: {first_line(e)}")
            continue
        ranks = {layer.down.shape[0] for layer in lora.layers.values()}
        rank = str(ranks.pop()) if len(ranks) == 1 else "mixed"
        line = (f"{lora.name:{width}s} {adapters.family_title(lora.family_hint):8s} {lora.hash:12s} "
                f"{len(lora.layers):6d} {rank:>5s}")
        if targets is not None:
            line += f"  {_fits(lora, targets)}"
        if lora.unsupported:
            kinds = ", ".join(sorted(set(lora.unsupported.values())))
            line += f" ({len(lora.unsupported)} module(s) of {kinds} not applied)"
        print(line)
    if len(files) > len(candidates):
        print(f"({len(files) - len(candidates)} other file(s) in {folder}: not LoRAs)")


def _fits(lora, targets) -> str:
    """Whether a LoRA applies to a model at load time, in a few words, or the one line why not."""
    from .engine import adapters

    # match() warns about keys it skips; here the count says it, on the LoRA's own line
    quiet = logging.getLogger("edgediff")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        matched = adapters.match(lora, targets)
    except EdgediffError as e:
        return f"no: {e}"
    finally:
        quiet.setLevel(level)
    quantized = sorted({c for c, p in matched if targets.weights[(c, p)].dtype == "int8"})
    if quantized:
        return (f"no: this export's {', '.join(quantized)} is int8; bake the LoRA in with "
                "`edgediff export SRC --lora FILE:WEIGHT`")
    return "yes" if len(matched) == len(lora.layers) else f"yes, {len(matched)} of its {len(lora.layers)} layers"


def _unavailable():
    from .backends import probe_all
    from .backends.base import Unavailable

    return [f for f in probe_all() if isinstance(f, Unavailable)]


def _format_timings(timings: dict[str, float]) -> str:
    def fmt(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"

    return ", ".join(f"{k} {fmt(v)}" for k, v in timings.items()) + f", total {fmt(sum(timings.values()))}"


if __name__ == "__main__":
    sys.exit(main())
