"""Time and peak memory of applying a LoRA on the CPU, on the full-size SD 1.5 architecture.

A rank-64 LoRA over every attention layer, applied at load time: how long applying it takes, and what it
adds to the process's peak memory (issue 13).

    python -m edgediff.bench.lora [--size 512] [--rank 64] [--budget 12GB] [--json]

The model is bench/export_memory.py's fp32 export of the random-weight SD 1.5 (bench/sd15.py), exported
the first time, and again when the cached export predates weight maps (a LoRA needs
unet/weight_map.json). The LoRA is written beside it in kohya's format: to_q, to_k, to_v and to_out.0 of
attn1 and attn2 in every transformer block (128 layers), random from a fixed seed, alpha = rank.

Each measurement runs in a process of its own (bench/measure.py), so each peak is that process's:
- apply: from_pretrained without the LoRA (its resident sessions open), the UNet's session opened again
  as it is (what any UNet open costs, for comparison), then set_loras (read the file, merge the 128
  weights with numpy) and the UNet's session opened with the merged weights, each timed;
- generate, without and then with the LoRA (from_pretrained(loras=...)): one step at SIZE, CFG 7.5, the
  same plan (a budget large enough for the resident one, printed). Three peaks: the load's (VmHWM just
  before the generation: it covers the merge), the generation's (GenerationResult.peak_memory: VmHWM
  reset when the generation starts) and the whole process's (VmHWM sampled from outside across that
  reset, bench/measure.py);
- the UNet's session alone at ONNX Runtime's level (ORT_ENABLE_ALL) and the one below it: where the
  re-opening's time goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .export_memory import built, exported
from .measure import run_measured

ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
SEED = 0
# Entries of down and up drawn with this deviation: each delta entry is then about 0.01^2 x sqrt(64),
# a few percent of the random UNet's weights (PyTorch's Linear init, about 1/sqrt(3 x in)): the
# picture changes and stays finite.
SCALE = 0.01
PROMPT = "a red circle"
VECTOR_FLAGS = re.compile(r"^(sse4_2|avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni|vnni)$")
# ONNX Runtime's level the backends use, and the one below it, without the layout transforms (NCHWc
# convolution weights), which are most of the time a UNet session takes to open
LEVELS = ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED")
RESULT = "RESULT "  # the child's last line: RESULT {json}


def ensure_export() -> Path:
    """The fp32 export of the random-weight SD 1.5, made (in a child process) by this edgediff when
    missing or when it has no UNet weight map."""
    from ..engine.adapters import WEIGHT_MAP

    folder = exported("sd15", "fp32")
    if not (folder / "unet" / WEIGHT_MAP).is_file():
        src = built("sd15")
        print(f"exporting {src} to {folder} (about 15 minutes and 10 GB on 2 cores)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "edgediff.cli", "export", str(src), "--out", str(folder),
                        "--dtype", "fp32", "--force"], check=True, stdout=sys.stderr)
    return folder


def attention_layers(folder: Path) -> dict[str, tuple[int, ...]]:
    """{module: PyTorch weight shape} of the UNet's attention projections, from its weight map (no model
    is built for this)."""
    from ..engine.adapters import WEIGHT_MAP

    weights = json.loads((folder / "unet" / WEIGHT_MAP).read_text())["weights"]
    return {param[:-len(".weight")]: tuple(row[3]) for param, row in weights.items()
            if param.endswith(".weight") and ATTENTION.search(param[:-len(".weight")])}


def write_lora(path: Path, layers: dict[str, tuple[int, ...]], rank: int) -> Path:
    """A kohya LoRA (lora_unet_*, lora_down/lora_up/alpha) over `layers`, written once, atomically."""
    from safetensors.numpy import save_file

    if path.is_file():
        return path
    rng = np.random.default_rng(SEED)
    tensors = {}
    for module, (out, inp) in sorted(layers.items()):
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, inp)) * SCALE).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((out, rank)) * SCALE).astype(np.float32)
        tensors[f"{key}.alpha"] = np.array(float(rank), dtype=np.float32)
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"ss_network_module": "networks.lora"})
    tmp.replace(path)
    return path


def _memory() -> dict[str, int]:
    """This process's resident memory and its peak (Linux's VmRSS and VmHWM), bytes."""
    import psutil

    from ..backends.host import peak_rss

    return {"VmRSS": psutil.Process().memory_info().rss, "VmHWM": peak_rss()}


# -- the child processes --------------------------------------------------------------------------------

def _child_apply(folder: Path, lora: Path, budget: str) -> dict:
    from .. import Pipeline

    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(folder, backend="cpu", memory_budget=budget)
    unet = pipe.model.family.unet
    out = {"rung": pipe.plan.rung, "load_s": time.perf_counter() - t, "loaded": _memory()}
    pipe._sessions.pop(unet.name, None)
    gc.collect()
    t = time.perf_counter()
    pipe._session(unet)
    out["reopen_plain_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe.set_loras([(lora, 1.0)])
    out["set_loras_s"] = time.perf_counter() - t
    out["after_set_loras"] = _memory()
    t = time.perf_counter()
    pipe._session(unet)
    out["reopen_lora_s"] = time.perf_counter() - t
    out["after_reopen"] = _memory()
    overrides = pipe._overrides.get(unet.name)
    out["override_bytes"] = sum(v.nbytes for v in overrides.values.values()) if overrides else 0
    out["override_count"] = len(overrides.values) if overrides else 0
    return out


def _child_generate(folder: Path, lora: Path | None, budget: str, size: int, image: Path) -> dict:
    from .. import Pipeline

    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(folder, backend="cpu", memory_budget=budget,
                                    loras=[(lora, 1.0)] if lora else None)
    out = {"load_s": time.perf_counter() - t, "loaded": _memory()}
    result = pipe(PROMPT, num_inference_steps=1, guidance_scale=7.5, width=size, height=size, seed=1)
    out.update(rung=result.plan.rung, plan=result.plan.summary(), generation_peak=result.peak_memory,
               end=_memory(), timings=result.timings, loras=result.loras)
    result.images[0].save(image)
    return out


def _child_level(folder: Path, level: str, size: int) -> dict:
    """The UNet's session opened at one of ONNX Runtime's optimisation levels, and two calls at the plan's
    shape (batch 2: CFG batched): what re-opening the session costs, and what the level buys per call.
    The options are the CPU backend's (backends/cpu) but the level."""
    import onnxruntime as ort

    from ..backends import host
    from ..backends.base import session_options
    from ..engine.tokenizer import CLIP_CONTEXT

    options = session_options()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads, options.inter_op_num_threads = host.cores(), 1
    t = time.perf_counter()
    session = ort.InferenceSession(str(folder / "unet" / "model.onnx"), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    opened = time.perf_counter() - t
    rng = np.random.default_rng(0)
    latent = size // 8
    feeds = {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
             "timestep": np.full((2,), 999.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, CLIP_CONTEXT, 768), dtype=np.float32)}
    calls = []
    for _ in range(2):  # the first call also reads the weights a lower level left mapped and untouched
        t = time.perf_counter()
        session.run(None, feeds)
        calls.append(time.perf_counter() - t)
    return {"level": level, "open_s": opened, "calls_s": calls, "end": _memory()}


# -- the report -----------------------------------------------------------------------------------------

def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _child(args: list[str]) -> tuple[dict, float, int]:
    """Run this module as a child with `args`; (its result, its wall time, its sampled peak RSS)."""
    run = run_measured([sys.executable, "-m", "edgediff.bench.lora", *args])
    last = [line for line in run.output.splitlines() if line.startswith(RESULT)]
    if run.returncode or not last:
        sys.exit(f"python -m edgediff.bench.lora {' '.join(args)} failed (exit {run.returncode}):\n"
                 f"{run.output[-3000:]}")
    return json.loads(last[-1][len(RESULT):]), run.seconds, run.peak_rss_bytes


def machine() -> dict:
    from ..backends import host
    from .machine import cpu_name

    cpuinfo = host.read_text("/proc/cpuinfo") or ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    total, available = host.memory()
    return {"cpu": cpu_name(cpuinfo), "vector_flags": [f for f in flags if VECTOR_FLAGS.match(f)],
            "cores": host.cores(), "ram_bytes": total, "ram_available_bytes": available,
            "load_average_1m": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgediff.bench.lora", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--budget", default="12GB", help="large enough that both generations plan alike")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # the child side: apply|plain|lora FOLDER LORA [IMAGE], or level FOLDER LEVEL
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        what, folder, lora, *image = args.child
        load = os.getloadavg()[0]  # other work on the machine as it starts: on 2 cores it slows the times
        if what == "apply":
            result = _child_apply(Path(folder), Path(lora), args.budget)
        elif what == "level":
            result = _child_level(Path(folder), lora, args.size)
        else:
            result = _child_generate(Path(folder), Path(lora) if what == "lora" else None, args.budget,
                                     args.size, Path(image[0]))
        print(RESULT + json.dumps({**result, "load_average_1m": load}), flush=True)
        return

    from PIL import Image

    from ..engine.metrics import psnr

    folder = ensure_export()
    layers = attention_layers(folder)
    lora = write_lora(folder.parent / f"{folder.name}-lora-attention-r{args.rank}.safetensors", layers, args.rank)
    facts = machine()
    common = ["--budget", args.budget, "--size", str(args.size)]
    images = {k: folder.parent / f"lora-bench-{k}-{args.size}.png" for k in ("plain", "lora")}
    apply, apply_s, apply_peak = _child([*common, "--child", "apply", str(folder), str(lora)])
    plain, plain_s, plain_peak = _child([*common, "--child", "plain", str(folder), str(lora), str(images["plain"])])
    with_lora, lora_s, lora_peak = _child([*common, "--child", "lora", str(folder), str(lora), str(images["lora"])])
    levels = [_child([*common, "--child", "level", str(folder), level])[0] for level in LEVELS]
    changed = psnr(Image.open(images["plain"]).convert("RGB"), Image.open(images["lora"]).convert("RGB"))
    report = {"machine": facts, "model": str(folder), "lora": str(lora), "layers": len(layers), "rank": args.rank,
              "lora_bytes": lora.stat().st_size, "size": args.size, "budget": args.budget,
              "apply": {**apply, "process_peak": apply_peak, "process_s": apply_s},
              "plain": {**plain, "process_peak": plain_peak, "process_s": plain_s},
              "lora": {**with_lora, "process_peak": lora_peak, "process_s": lora_s},
              "ort_levels": levels, "psnr_plain_vs_lora_db": changed}
    if args.json:
        print(json.dumps(report, indent=2))
        return

    applied = apply["set_loras_s"] + apply["reopen_lora_s"]
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, {_gib(facts['ram_bytes'])} RAM, load average "
          f"{facts['load_average_1m']:.2f}; vector flags: {' '.join(facts['vector_flags'])}")
    print(f"model: {folder.name} (fp32); LoRA: rank {args.rank}, alpha {args.rank}, {len(layers)} attention "
          f"layers, {lora.stat().st_size / 2**20:.0f} MiB ({lora.name})")
    print(f"merged weights handed to ONNX Runtime: {apply['override_count']}, {_gib(apply['override_bytes'])}")
    print()
    print(f"applied on a loaded pipeline (from_pretrained, then set_loras, then the UNet's session; load average "
          f"{apply['load_average_1m']:.2f} as it started):")
    print(f"  set_loras (read + merge)       {apply['set_loras_s']:7.2f} s")
    print(f"  UNet session re-opened         {apply['reopen_lora_s']:7.2f} s   (without the LoRA: "
          f"{apply['reopen_plain_s']:.2f} s)")
    print(f"  applied in                     {applied:7.2f} s   target <= 10 s: {'met' if applied <= 10 else 'missed'}")
    print(f"  RSS loaded {_gib(apply['loaded']['VmRSS'])}, after set_loras {_gib(apply['after_set_loras']['VmRSS'])}, "
          f"after the re-open {_gib(apply['after_reopen']['VmRSS'])}; process peak {_gib(apply_peak)}")
    print()
    print(f"one generation, {args.size}x{args.size}, 1 step, CFG 7.5, budget {args.budget}:")
    print(f"  plan without: {plain['plan']}")
    print(f"  plan with:    {with_lora['plan']}")
    print(f"  {'':14s} {'load s':>7s} {'RSS loaded':>11s} {'load peak':>10s} {'gen peak':>10s} {'process peak':>13s}")
    for name, r, peak in (("without LoRA", plain, plain_peak), ("with LoRA", with_lora, lora_peak)):
        print(f"  {name:14s} {r['load_s']:7.2f} {_gib(r['loaded']['VmRSS']):>11s} {_gib(r['loaded']['VmHWM']):>10s} "
              f"{_gib(r['generation_peak']):>10s} {_gib(peak):>13s}")
    gen = with_lora["generation_peak"] / plain["generation_peak"] - 1
    whole = lora_peak / plain_peak - 1
    print(f"  with / without: generation peak {gen:+.1%}, process peak {whole:+.1%}; target <= +10%: "
          f"{'met' if max(gen, whole) <= 0.10 else 'missed'}")
    print(f"  the picture with the LoRA against without: {changed:.1f} dB PSNR"
          + ("" if np.isfinite(changed) else ": identical, the LoRA was not applied"))
    print()
    print(f"the UNet's session alone (no LoRA), at ONNX Runtime's optimisation levels; two calls, batch 2, "
          f"{args.size}x{args.size}:")
    for r in levels:
        print(f"  {r['level']:20s} open {r['open_s']:6.2f} s   calls {r['calls_s'][0]:6.2f} s, {r['calls_s'][1]:6.2f} s"
              f"   peak {_gib(r['end']['VmHWM'])}")


if __name__ == "__main__":
    main()
