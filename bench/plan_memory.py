"""The planner's predicted peak against the measured peak of real generations, on this machine.

    python -m edgediff.bench.plan_memory [--model sdxl] [--sizes 1024] [--rungs streamed streamed-lean]

Each generation runs in a process of its own (`edgediff generate`, one step: the peak does not grow
with steps), on the fp32 export of the full-size architecture that bench/export_memory.py keeps. A
rung is forced through the budget: a budget just above that rung's prediction and below every faster
rung's. The measured figure is the process's peak resident memory during the generation (VmHWM, reset
when the generation starts), which is what the plan budgets.
"""

from __future__ import annotations

import argparse
import re
import sys

from .export_memory import MODELS, exported
from .measure import run_measured

SIZES = {"sd15": [256, 512, 768], "sdxl": [1024]}  # default sizes: around each family's native one


def main(argv: list[str] | None = None) -> None:
    from ..backends import select
    from ..engine.model_folder import read_model_folder
    from ..engine.plan import RUNGS, Request, _plan, component_facts

    p = argparse.ArgumentParser(prog="python -m edgediff.bench.plan_memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", choices=tuple(MODELS))
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="default: " + "; ".join(
        f"{k} {' '.join(map(str, v))}" for k, v in SIZES.items()))
    p.add_argument("--rungs", nargs="+", default=["resident", "streamed-lean"])
    args = p.parse_args(argv)
    folder = exported(args.model, "fp32")
    if not (folder / "edgediff.json").is_file():
        sys.exit(f"{folder} is missing: run python -m edgediff.bench.export_memory first")
    model = read_model_folder(folder)
    facts = component_facts(model)
    _, device = select("cpu")
    names = [r[0] for r in RUNGS]
    print(f"{MODELS[args.model][1]}, fp32, CPU ({device.name}); one step, CFG 7.5, Euler")
    print(f"{'size':>6s} {'rung':16s} {'predicted':>10s} {'measured':>10s} {'error':>7s}")
    for size in args.sizes or SIZES[args.model]:
        request = Request(size, size)
        peaks = {r[0]: _plan(model, facts, request, device, 10 ** 13, *r).predicted_peak for r in RUNGS}
        for rung in args.rungs:
            faster = [peaks[n] for n in names[:names.index(rung)]]
            if faster and min(faster) <= peaks[rung]:
                print(f"{size:6d} {rung:16s} (a faster rung is predicted as lean; skipped)")
                continue
            budget = peaks[rung] + (min(faster) - peaks[rung]) // 4 if faster else peaks[rung] * 2
            run = run_measured([sys.executable, "-m", "edgediff.cli", "generate", "a red circle", "--model",
                                str(folder), "--width", str(size), "--height", str(size), "--steps", "1",
                                "--seed", "1", "--backend", "cpu", "--budget", str(budget),
                                "--out", str(folder.parent / f"plan-{size}-{rung}.png")])
            used = re.search(r"plan: (\S+) plan", run.output)
            m = re.search(r"predicted peak ([\d.]+) GB, measured ([\d.]+) GB", run.output)
            if run.returncode or not m:
                print(f"{size:6d} {rung:16s} failed: {run.output.strip().splitlines()[-1] if run.output else run.returncode}")
                continue
            predicted, measured = float(m.group(1)), float(m.group(2))
            note = "" if used and used.group(1) == rung else f"  (ran {used.group(1) if used else '?'})"
            print(f"{size:6d} {rung:16s} {predicted:8.2f} GB {measured:8.2f} GB {100 * (predicted - measured) / measured:+6.1f}%{note}")


if __name__ == "__main__":
    main()
