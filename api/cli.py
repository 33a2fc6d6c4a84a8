"""The `edgediff` command: demo, export, generate, devices.

Bad input ends in one line, `edgediff: error: ...`, exit status 2, and no file written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .engine.errors import EdgediffError

log = logging.getLogger("edgediff")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="edgediff: %(message)s")
    logging.getLogger("edgediff").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.run(args) or 0
    except EdgediffError as e:
        print(f"edgediff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgediff: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from .engine.schedulers import SCHEDULERS

    p = argparse.ArgumentParser(prog="edgediff", description="Stable Diffusion on the hardware you have.")
    p.add_argument("-v", "--verbose", action="store_true", help="say more about what happens")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the built-in model, export it, generate and time an image")
    demo.add_argument("--out", default="edgediff-demo", help="folder for the pictures (default: %(default)s)")
    demo.add_argument("--backend", default="auto", help="auto, cpu, cuda, rocm or coreml")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=42)
    demo.set_defaults(run=_demo)

    export = sub.add_parser("export", help="export a diffusers model folder to ONNX")
    export.add_argument("src", help="a diffusers-format model folder")
    export.add_argument("--out", required=True, help="the folder to write the ONNX model to")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(run=_export)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="an exported model folder, or `builtin`")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                     help="default: the one the model folder's scheduler_config.json names")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--seed", type=int, default=-1, help="-1 for a random seed (default)")
    gen.add_argument("--batch", type=int, default=1, help="images to make (seeds seed, seed+1, ...)")
    gen.add_argument("--init-image", default=None, help="img2img: the starting picture")
    gen.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change it (0-1)")
    gen.add_argument("--mask", default=None, help="inpainting: white where to paint, black to keep")
    gen.add_argument("--backend", default="auto", help="auto, cpu, cuda, rocm or coreml")
    gen.add_argument("--out", default="out.png", help="PNG to write; a batch adds -1, -2, ...")
    gen.set_defaults(run=_generate)

    devices = sub.add_parser("devices", help="list the backends and what each would run on")
    devices.set_defaults(run=_devices)
    return p


def _export(args) -> None:
    from .export.onnx_export import export_onnx

    start = time.perf_counter()
    reports = export_onnx(args.src, args.out, overwrite=args.overwrite)
    for r in reports:
        print(f"{r.name:13s} {r.bytes / 2**20:8.1f} MiB  parity vs PyTorch: relative error {r.relative_error:.1e}")
    print(f"exported to {args.out} in {time.perf_counter() - start:.1f} s")


def _generate(args) -> None:
    from .engine.images import save_png
    from .engine.pipeline import Pipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise EdgediffError(f"--out {out} should end in .png")
    pipe = Pipeline.from_pretrained(args.model, backend=args.backend)
    result = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, width=args.width, height=args.height, seed=args.seed,
                  scheduler=args.scheduler, num_images_per_prompt=args.batch, image=args.init_image,
                  strength=args.strength, mask_image=args.mask, progress=True)
    paths = [out] if len(result.images) == 1 else \
        [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(len(result.images))]
    for image, params, path in zip(result.images, result.parameters, paths):
        save_png(image, path, params.a1111())
        print(f"wrote {path} (seed {params.seed})")
    print(f"backend: {pipe.device.backend} ({pipe.device.name}); " + _format_timings(result.timings))


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


def _devices(args) -> None:
    from .backends import probe_all
    from .backends.base import Device

    for found in probe_all():
        if isinstance(found, Device):
            memory = f", {found.total_memory / 2**30:.1f} GiB" if found.total_memory else ""
            print(f"{found.backend:7s} available: {found.name}{memory}, providers {', '.join(found.providers)}")
        else:
            print(f"{found.backend:7s} unavailable: {found.reason}")


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
