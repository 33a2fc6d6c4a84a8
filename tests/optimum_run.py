"""Runs inside the optimum venv (tests/optimum_env.py), never under pytest: the optimum side of
tests/test_optimum_interop.py.

    python optimum_run.py load MODEL
        Load MODEL with optimum.onnxruntime.ORTStableDiffusionPipeline.from_pretrained and print what
        was loaded.
    python optimum_run.py generate MODEL --latents L.npy --out OUT.npz --prompt P [--negative N]
                          [--steps 8] [--guidance 7.5] [--scheduler pndm --scheduler euler ...]
        Generate one image per scheduler from the given initial latents, output_type="np" (float
        NHWC in [0, 1]), and save them to OUT.npz under the schedulers' names.

Each command prints one JSON line on stdout: the versions it ran with and what it did.
"""

from __future__ import annotations

import argparse
import json
import sys


def versions() -> dict:
    import importlib.metadata as m

    import torch

    out = {d: m.version(d) for d in ("optimum-onnx", "optimum", "transformers", "diffusers", "onnxruntime",
                                      "huggingface_hub", "numpy")}
    out["torch"] = f"{torch.__version__} ({torch.__file__})"
    return out


def load(model: str):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    # export=False: the folder must load as it is; optimum would otherwise re-export a folder it deems
    # incomplete, which would hide what is missing.
    pipe = ORTStableDiffusionPipeline.from_pretrained(model, export=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p_load = sub.add_parser("load")
    p_load.add_argument("model")
    p_gen = sub.add_parser("generate")
    p_gen.add_argument("model")
    p_gen.add_argument("--latents", required=True)
    p_gen.add_argument("--out", required=True)
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--negative", default=None)
    p_gen.add_argument("--steps", type=int, default=8)
    p_gen.add_argument("--guidance", type=float, default=7.5)
    p_gen.add_argument("--scheduler", action="append", choices=["pndm", "euler"])
    args = parser.parse_args(argv)

    import numpy as np

    pipe = load(args.model)
    report = {"versions": versions(), "pipeline": type(pipe).__name__,
              "scheduler": type(pipe.scheduler).__name__,
              "sessions": {name: {"inputs": [i.name for i in part.session.get_inputs()],
                                  "outputs": [o.name for o in part.session.get_outputs()]}
                           for name, part in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet),
                                              ("vae_encoder", pipe.vae_encoder),
                                              ("vae_decoder", pipe.vae_decoder)) if part is not None}}
    if args.command == "generate":
        import torch
        from diffusers import EulerDiscreteScheduler, PNDMScheduler

        classes = {"pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}
        config = pipe.scheduler.config  # the folder's, before any swap (as tests/test_parity.py does)
        latents = torch.from_numpy(np.load(args.latents))
        images = {}
        for name in args.scheduler or ["pndm"]:
            pipe.scheduler = classes[name].from_config(config)
            out = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, latents=latents, output_type="np")
            images[name] = np.asarray(out.images, dtype=np.float32)  # (1, H, W, 3) in [0, 1]
        np.savez(args.out, **images)
        report["images"] = {k: list(v.shape) for k, v in images.items()}
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
