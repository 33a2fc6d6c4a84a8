"""`edgediff bench`: one protocol, run by edgediff and its peers, each in a process of its own.

    edgediff bench --protocol sd15-512                               # the full-size SD 1.5 architecture
    edgediff bench --protocol sd15-256 --steps 2 --against diffusers,optimum,optimum-intel --json sd15.json
    edgediff bench --protocol tiny --against diffusers --edgediff dtype=fp32 --edgediff dtype=fp16
    edgediff bench compare A.json B.json --png chart.png

1. The protocol (bench/protocols.py) fixes the model, size, batch, steps, CFG, Euler, prompt and seed.
   Without --model the `sd15` and `sdxl` protocols build their architecture with random weights
   (bench/sd15.py, bench/sdxl.py) and export it.
2. Each model edgediff runs is exported first, in a child process (exports import torch; this process
   never does), and the initial latents are drawn once (edgediff.engine.noise) into latents.npy.
3. Every runner, each edgediff row and each peer, runs in its own process (bench/peers.py), measured by
   bench/measure.py (wall time, peak RSS). With --repeat N the order alternates: forward, then reversed.
4. The report: machine, protocol, per-row cold start, stage times, end-to-end time, steps/s, memory, the
   UNet's FLOPs counted from the graph (bench/flops.py) against the CPU's estimated peak
   (bench/machine.py), the PSNR of every image against the fp32 reference (diffusers' image when diffusers
   ran, else edgediff fp32's), and speed and memory ratios against each peer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..engine.errors import EdgediffError
from . import compare, protocols
from .measure import run_measured

STAGES = ("text_encoder", "unet", "vae_decoder", "safety_checker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="sd15-512",
                   help=f"a named protocol: {', '.join(protocols.PROTOCOLS)} (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="another model: an export source or exported folder (default: the protocol's)")
    p.add_argument("--steps", type=int, default=None, help="override the protocol's steps (a custom run)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None,
                   help="steps of the untimed first call (default: the protocol's, 1); 0: none")
    p.add_argument("--against", default="",
                   help=f"peers to run too, comma-separated: {','.join(protocols.PEERS)}")
    p.add_argument("--repeat", type=int, default=1, help="rounds, alternating the order (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=protocols.DTYPES, help="edgediff's export (one row)")
    p.add_argument("--plan", default=None, help="force edgediff's plan rung (resident, ..., lowest)")
    p.add_argument("--budget", default=None, help="edgediff's memory budget, e.g. 4GB")
    p.add_argument("--variant", default="default", help="export variant (a hook for a future int8 export)")
    p.add_argument("--backend", default="cpu", help="edgediff's backend: cpu (default), auto, cuda, rocm, coreml")
    p.add_argument("--edgediff", action="append", metavar="KEY=VALUE,...",
                   help="an edgediff row (repeatable), e.g. dtype=fp16,plan=streamed; replaces the one "
                        "--dtype/--plan/--budget/--variant describe")
    p.add_argument("--optimum-model", default=None,
                   help="the folder optimum's pipeline loads (default: optimum-cli's export of the model, made once)")
    p.add_argument("--optimum-intel-model", default=None,
                   help="the OpenVINO folder optimum-intel's pipeline loads (default: optimum-cli's export, "
                        "made once)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--out-dir", default=None,
                   help="where the runners write images and reports (default: a new temporary folder)")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run the protocol on every node of a Ray cluster and print one table of the nodes "
                        "(auto: the cluster this machine is in, or a local one)")
    sub = p.add_subparsers(dest="bench_command", metavar="compare")
    cmp = sub.add_parser("compare", help="render several JSON reports side by side (table and PNG)")
    compare.add_arguments(cmp)
    cmp.set_defaults(run=compare.run)


def run(args) -> None:
    if args.ray is not None:  # the same protocol on every node of a cluster (bench/fleet.py)
        from .fleet import run_fleet

        return run_fleet(args)
    report = measure(args)
    print(render(report))
    write_json(report, args.json)


def checked(args) -> tuple[protocols.Protocol, list[protocols.EdgediffOptions], list[str]]:
    """The protocol, edgediff rows and peers the arguments ask for: everything the user typed, checked
    before anything slow starts."""
    protocol = protocols.protocol(args.protocol, args.model, args.steps, args.width, args.height, args.batch,
                                  args.warmup)
    rows = protocols.edgediff_rows(args.edgediff, protocols.EdgediffOptions(
        dtype=args.dtype, plan=args.plan, budget=args.budget, variant=args.variant, backend=args.backend))
    peers = protocols.peers(args.against)
    if args.repeat < 1:
        raise EdgediffError("--repeat must be at least 1")
    return protocol, rows, peers


def measure(args) -> dict:
    """The benchmark on this machine: the report `render` prints."""
    # 1. Everything the user typed is checked before anything slow starts.
    protocol, rows, peers = checked(args)
    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="edgediff-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    from .machine import machine_facts

    machine = machine_facts()
    print(_protocol_line(protocol))
    print(_machine_line(machine))
    if (machine.get("load_average_1m") or 0) > 0.5 * machine["cores"]:
        print(f"warning: the machine is busy (load average {machine['load_average_1m']:.2f} on {machine['cores']} "
              "cores): the times will be slower than this machine's own, torch's the most")

    # 2. Models and latents.
    folders = {row: _prepare(protocol.model, row) for row in rows}
    first = folders[rows[0]]
    latents = _latents(protocol, first["onnx"])
    np_path = out / "latents.npy"
    import numpy as np

    np.save(np_path, latents)
    base = dict(prompt=protocol.prompt, negative=protocol.negative, steps=protocol.steps,
                guidance=protocol.guidance, width=protocol.width, height=protocol.height, batch=protocol.batch,
                seed=protocol.seed, scheduler=protocol.scheduler, warmup_steps=protocol.warmup_steps,
                latents=str(np_path),
                # the edgediff export's copy of the source's config: what edgediff's Euler reads
                scheduler_config=str(Path(first["onnx"]) / "scheduler" / "scheduler_config.json"))

    runners, skipped = [], []
    for k, row in enumerate(rows):
        runners.append((row.label(), "edgediff", dict(base, model=folders[row]["onnx"], options=asdict(row),
                                                      out=str(out / f"edgediff-{k + 1}")), None, None))
    given = {"optimum": args.optimum_model, "optimum-intel": args.optimum_intel_model}  # exported by the user
    for peer in peers:
        try:
            runners.append(_peer(peer, base, first, out, given.get(peer)))
        except _Skip as e:
            skipped.append({"name": peer, "reason": str(e)})
            print(f"{peer}: skipped ({e})")

    # 3. Each runner in its own process, alternating the order between rounds.
    results: dict[str, list] = {r[0]: [] for r in runners}
    for round_ in range(args.repeat):
        for name, kind, spec, python, env in (runners if round_ % 2 == 0 else runners[::-1]):
            spec_path = Path(spec["out"]) / "spec.json"
            Path(spec["out"]).mkdir(parents=True, exist_ok=True)
            spec_path.write_text(json.dumps(spec, indent=1))
            from . import peers as peer_runners

            print(f"running {name} (round {round_ + 1} of {args.repeat}) ...", flush=True)
            measured = run_measured(peer_runners.command(kind, spec_path, python), env=env)
            results[name].append((measured, _read_report(Path(spec["out"]), measured)))

    # 4. The report.
    flops = _unet_flops(protocol, first["onnx"])
    report = {
        "schema": compare.SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "against": peers,
        "repeat": args.repeat,
        "protocol": {**asdict(protocol), "overrides": list(protocol.overrides)},
        "machine": machine,
        "model": {"onnx": first["onnx"], "diffusers": first.get("diffusers")},
        "unet_flops_per_step": flops,
        "rows": [_row(name, kind, spec, results[name], protocol, flops, machine)
                 for name, kind, spec, _, _ in runners],
        "skipped": skipped,
    }
    report["reference"] = _add_psnr(report["rows"])
    report["ratios"] = _ratios(report["rows"])
    return report


def write_json(report: dict, path: str | None) -> None:
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, allow_nan=False))
        print(f"wrote {path}")


class _Skip(Exception):
    pass


def _prepare(model: str, row: protocols.EdgediffOptions) -> dict:
    """The export edgediff runs for `row` (made in a child process when it is not cached)."""
    cmd = [sys.executable, "-m", "edgediff.bench.protocols", "prepare", model, "--dtype", row.dtype,
           "--variant", row.variant]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit {done.returncode}"
        raise EdgediffError(f"could not prepare {model} ({row.dtype}): "
                            + last.removeprefix("edgediff: error: "))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _latents(protocol: protocols.Protocol, onnx: str):
    """The initial latents of the protocol's seed, as edgediff draws them: image k from seed + k."""
    from ..engine import noise
    from ..engine.model_folder import LATENT_CHANNELS, read_model_folder

    f = read_model_folder(onnx).vae_scale_factor
    seeds = [protocol.seed + k for k in range(protocol.batch)]
    return noise.batch_noise(seeds, noise.INITIAL, (LATENT_CHANNELS, protocol.height // f, protocol.width // f))


def _peer(peer: str, base: dict, first: dict, out: Path, given_model: str | None):
    from . import peers as peer_runners

    try:
        if peer == "diffusers":
            peer_runners.check_diffusers(first.get("diffusers"))
            return ("diffusers", "diffusers", dict(base, model=first["diffusers"], out=str(out / "diffusers")),
                    None, None)
        from . import optimum_env  # optimum, optimum-intel: a venv of their own each

        try:
            python = optimum_env.VENVS[peer].python()
        except (optimum_env.OptimumEnvUnavailable, RuntimeError) as e:
            raise _Skip(f"its venv could not be built: {str(e).splitlines()[0][:300]}") from None
        model = peer_runners.peer_model(peer, first.get("diffusers"), first.get("source_sha256"), given_model,
                                        python)
        return (peer, peer, dict(base, model=str(model), out=str(out / peer)), str(python),
                optimum_env.subprocess_env())
    except peer_runners.PeerUnavailable as e:
        raise _Skip(str(e)) from None


def _read_report(folder: Path, measured) -> dict | None:
    path = folder / "report.json"
    if measured.returncode or not path.is_file():
        return None
    report = json.loads(path.read_text())
    path.rename(folder / f"report-{time.time_ns()}.json")  # the next round writes its own
    return report


def _row(name: str, kind: str, spec: dict, runs: list, protocol, flops: int | None, machine: dict) -> dict:
    row = {"name": name, "runner": kind, "status": "ok", "note": None, "options": spec.get("options"),
           "image": str(Path(spec["out"]) / "image.png"), "images": str(Path(spec["out"]) / "images.npy")}
    failed = [m for m, r in runs if r is None]
    if failed:
        lines = [ln for ln in failed[0].output.strip().splitlines() if ln.strip()]
        row.update(status="failed", note=(lines[-1] if lines else f"exit {failed[0].returncode}")[:300])
        return row
    # the median run by end-to-end time speaks for the row; memory is the worst of all runs
    measured, report = sorted(runs, key=lambda r: r[1]["total_s"])[(len(runs) - 1) // 2]
    timings = report.get("timings") or {}
    stages = {s: timings.get(s) for s in STAGES}
    unet = stages["unet"]
    stages["unet_per_step"] = unet / protocol.steps if unet else None
    achieved = flops / stages["unet_per_step"] if flops and stages["unet_per_step"] else None
    peak = machine["cpu_peak"]["flops_per_s"]
    on_cpu = report.get("backend") == "cpu"
    row.update(
        backend=report.get("backend"), device=report.get("device"), plan=report.get("plan"),
        rung=report.get("rung"), versions=report.get("versions"), note=report.get("note"),
        load_s=report["load_s"], first_run_s=report.get("first_run_s"), total_s=report["total_s"],
        steps_per_s=protocol.steps / report["total_s"],  # steps over the whole generation's time
        process_s=measured.seconds, stages=stages,
        # the process's own peak (bench/peers.py says why not wait4's where the child could read it)
        peak_rss_bytes=max(r.get("process_peak_bytes") or m.peak_rss_bytes for m, r in runs),
        generation_peak_bytes=max(r.get("generation_peak_bytes") or 0 for _, r in runs) or None,
        predicted_peak_bytes=report.get("predicted_peak_bytes"), peak_device_bytes=report.get("peak_device_bytes"),
        unet_flops_per_s=achieved,
        unet_peak_fraction=achieved / peak if achieved and peak and on_cpu else None,
        torch_imported=report.get("torch_imported"),
        runs=[{"total_s": r["total_s"], "load_s": r["load_s"], "first_run_s": r.get("first_run_s"),
               "peak_rss_bytes": r.get("process_peak_bytes") or m.peak_rss_bytes,
               "sampled_peak_rss_bytes": m.peak_rss_bytes, "process_s": m.seconds} for m, r in runs],
    )
    return row


def _unet_flops(protocol, onnx: str) -> int | None:
    from .flops import unet_flops

    try:
        return unet_flops(Path(onnx) / "unet" / "model.onnx", protocol.width, protocol.height, protocol.batch,
                          cfg=protocol.guidance > 1)
    except Exception as e:  # a figure we cannot count is left out, not a failed benchmark
        print(f"note: UNet FLOPs not counted ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None


def _add_psnr(rows: list[dict]) -> dict:
    """Every row's PSNR against the fp32 reference image: diffusers' when it ran, else edgediff fp32's."""
    import numpy as np

    from ..engine.metrics import psnr

    ok = [r for r in rows if r["status"] == "ok"]
    reference = next((r for r in ok if r["runner"] == "diffusers"), None) or \
        next((r for r in ok if r["runner"] == "edgediff" and r["options"]["dtype"] == "fp32"
              and r["options"]["variant"] == "default"), None)
    for row in rows:
        row["psnr_db"], row["psnr_note"] = None, None
    if reference is None:
        return {"row": None, "why": "neither diffusers nor an edgediff fp32 row ran"}
    want = np.load(reference["images"])
    for row in ok:
        if row is reference:
            row["psnr_note"] = "reference"
            continue
        got = np.load(row["images"])
        score = psnr(got, want) if got.shape == want.shape else None
        if score is None:
            row["psnr_note"] = f"image shape {got.shape} differs from the reference's {want.shape}"
        elif score == float("inf"):
            row["psnr_note"] = "identical"  # JSON has no infinity: identical 8-bit images say so
        else:
            row["psnr_db"] = score
    why = "diffusers fp32 (torch, CPU)" if reference["runner"] == "diffusers" else "edgediff fp32 (diffusers did not run)"
    return {"row": reference["name"], "why": why, "measure": "PSNR of the 8-bit images, peak 255"}


def _ratios(rows: list[dict]) -> list[dict]:
    """Each edgediff row against each peer: speedup = peer's end-to-end time / the row's (above 1: edgediff
    is faster); memory = the row's peak RSS / the peer's (below 1: edgediff needs less)."""
    ok = [r for r in rows if r["status"] == "ok"]
    return [{"row": r["name"], "peer": p["name"], "speedup": p["total_s"] / r["total_s"],
             "memory": r["peak_rss_bytes"] / p["peak_rss_bytes"]}
            for r in ok if r["runner"] == "edgediff" for p in ok if p["runner"] != "edgediff"]


def render(report: dict) -> str:
    """The report as the terminal shows it."""
    lines = []
    flops = report["unet_flops_per_step"]
    if flops:
        peak = report["machine"]["cpu_peak"]
        lines.append(f"UNet: {flops / 1e9:.1f} GFLOP per step (Conv/MatMul/Gemm/attention MACs x 2, counted from the graph; int8 rows: fraction of the fp32 peak); "
                     + _peak_line(peak))
    for row in report["rows"]:
        if row.get("plan"):
            lines.append(f"{row['name']}: {row['plan']}")
    lines.append(compare.render_table([report]))
    for r in report["ratios"]:
        lines.append(f"{r['row']}: {r['speedup']:.2f}x the speed of {r['peer']} (end to end), "
                     f"{r['memory']:.2f}x its peak memory")
    ref = report["reference"]
    lines.append(f"PSNR against {ref['why']}" if ref["row"] else f"PSNR: no reference ({ref['why']})")
    for row in report["rows"]:
        if row["status"] == "ok" and row.get("note"):
            lines.append(f"note: {row['name']}: {row['note']}")
    for s in report["skipped"]:
        lines.append(f"{s['name']}: skipped ({s['reason']})")
    return "\n".join(lines)


def _protocol_line(p: protocols.Protocol) -> str:
    custom = f"; custom: {', '.join(p.overrides)} changed" if p.overrides else ""
    return (f"protocol {p.name}: {p.model}, {p.width}x{p.height}, batch {p.batch}, {p.steps} steps, CFG {p.guidance:g}, "
            f"{p.scheduler}, seed {p.seed}, warm-up {p.warmup_steps} step(s){custom}")


def _machine_line(m: dict) -> str:
    gpus = "; ".join(g["describe"] for g in m["gpus"]) or "none"
    v = m["versions"]
    load = "" if m.get("load_average_1m") is None else f"; load average {m['load_average_1m']:.2f} at the start"
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, {m['os']}; GPUs: {gpus}; "
            f"onnxruntime {v.get('onnxruntime')}, torch {v.get('torch') or 'not installed'}{load}")


def _peak_line(peak: dict) -> str:
    if not peak["flops_per_s"]:
        return "CPU peak unknown"
    return (f"CPU peak estimate {peak['flops_per_s'] / 1e9:.0f} GFLOP/s = {peak['cores']} cores x "
            f"{peak['clock_hz'] / 1e9:.2f} GHz ({peak['clock_source']}) x {peak['flops_per_cycle_per_core']} "
            f"FLOPs/cycle ({peak['isa']}; assumed, not measured)")


def main(argv: list[str] | None = None) -> int:
    """`python -m edgediff.bench.run ...` is `edgediff bench ...` (its errors, logging and exit codes)."""
    from ..cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
