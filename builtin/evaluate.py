"""The built-in model's semantic check: generate the fixed evaluation captions and judge each picture.

    python -m edgediff.builtin.evaluate MODEL [--scheduler NAME] [--steps 20]

MODEL is an exported folder (or `builtin`). The 50 captions come from `scenes(EVAL_SEED, 50)`, a seed
the training data never uses. Runs on the engine alone: no torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .scenes import Scene, judge, scenes

EVAL_SEED = 1234  # training draws from seed 0
EVAL_COUNT = 50


@dataclass(frozen=True)
class Evaluation:
    passed: int
    total: int
    failures: tuple[tuple[str, tuple[str, ...]], ...]  # (caption, reasons)

    @property
    def rate(self) -> float:
        return self.passed / self.total


def evaluation_scenes(count: int = EVAL_COUNT) -> list[Scene]:
    return scenes(EVAL_SEED, count)


def evaluate(pipe, scheduler: str | None = None, steps: int = 20, count: int = EVAL_COUNT, seed: int = 0,
             guidance_scale: float = 7.5, **options) -> Evaluation:
    """Each caption k is generated with seed + k and judged against its scene. `options` go to every
    generation (the fast plan's cache_interval, guidance_interval, vae_decoder)."""
    failures = []
    chosen = evaluation_scenes(count)
    for k, scene in enumerate(chosen):
        image = pipe(scene.caption(), num_inference_steps=steps, seed=seed + k, scheduler=scheduler,
                     guidance_scale=guidance_scale, **options).images[0]
        verdict = judge(image, scene)
        if not verdict.passed:
            failures.append((scene.caption(), verdict.reasons))
    return Evaluation(len(chosen) - len(failures), len(chosen), tuple(failures))


def main(argv: list[str] | None = None) -> int:
    from ..engine.pipeline import Pipeline

    p = argparse.ArgumentParser(prog="python -m edgediff.builtin.evaluate")
    p.add_argument("model")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    args = p.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model, backend="cpu")  # "builtin" is a model name there too
    result = evaluate(pipe, args.scheduler, args.steps, guidance_scale=args.guidance)
    for caption, reasons in result.failures:
        print(f"FAIL {caption!r}: {'; '.join(reasons)}")
    print(f"{result.passed}/{result.total} captions pass ({result.rate:.0%}), "
          f"scheduler {args.scheduler or pipe.default_scheduler()}, {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
