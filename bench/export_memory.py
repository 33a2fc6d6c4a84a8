"""Peak memory and time of exporting a full-size architecture, edgediff against optimum.

    python -m edgediff.bench.export_memory [--model sd15|sdxl] [--dtype fp16] [--optimum-python PATH]

Each export runs in a process of its own (bench/measure.py), on the same random-weight folder
(bench/sd15.py, bench/sdxl.py), built the first time in a process of its own too: the build's freed
gigabytes would otherwise stay in this process's heap beside the export. `--optimum-python` names a
Python that has optimum-onnx installed, which cannot share an environment with edgediff's export (it
pins an older transformers and diffusers); its `optimum-cli export onnx` is then measured the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from . import sd15, sdxl
from .measure import run_measured

# The random-weight architectures: the module that builds each, and its name in reports
MODELS = {"sd15": (sd15, "SD 1.5 architecture"), "sdxl": (sdxl, "SDXL base architecture")}


def built(model: str = "sd15") -> Path:
    """The random-weight diffusers folder, built in a child process the first time."""
    module = MODELS[model][0]
    folder = module.default_folder()
    if not (folder / "model_index.json").is_file():  # its printed path to stderr: --json owns stdout
        subprocess.run([sys.executable, "-m", module.__name__], check=True, stdout=sys.stderr)
    return folder


def exported(model: str = "sd15", dtype: str = "fp32") -> Path:
    """Where the benchmarks keep edgediff's export of a random-weight model (default options but dtype)."""
    from ..export.onnx_export import ExportOptions

    src = MODELS[model][0].default_folder()
    return src.parent / f"{src.name}-onnx-{ExportOptions(dtype=dtype).key()}"


def exported_sd15(dtype: str = "fp32") -> Path:
    return exported("sd15", dtype)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgediff.bench.export_memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", choices=tuple(MODELS))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "int8"))
    p.add_argument("--optimum-python", default=None, help="a Python with optimum-onnx installed")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)

    src = built(args.model)
    out = exported(args.model, args.dtype)  # kept: the planner's and the benchmark's measurements run it
    rows = []
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        ours = run_measured([sys.executable, "-m", "edgediff.cli", "export", str(src), "--out", str(out),
                             "--dtype", args.dtype, "--force"])
        rows.append(("edgediff export", ours))
        if ours.returncode:
            sys.exit(f"edgediff export failed:\n{ours.output[-2000:]}")
        sizes = json.loads((out / "edgediff.json").read_text())["components"]
        if args.optimum_python:
            theirs = run_measured([args.optimum_python, "-m", "optimum.commands.optimum_cli", "export", "onnx",
                                   "--model", str(src), "--task", "text-to-image", str(Path(tmp) / "optimum")])
            rows.append(("optimum-cli export onnx", theirs))
    if args.json:
        print(json.dumps({name: {"seconds": m.seconds, "peak_rss_bytes": m.peak_rss_bytes, "exit": m.returncode}
                          for name, m in rows}, indent=2))
        return
    print(f"{MODELS[args.model][1]} (random weights), {args.dtype}, exported on this machine:")
    for name, m in rows:
        status = "" if m.returncode == 0 else f"  (failed, exit {m.returncode})"
        print(f"  {name:26s} {m.seconds:7.1f} s   peak RSS {m.peak_gib:5.2f} GiB{status}")
    print("  components: " + ", ".join(f"{c['name']} {c['bytes'] / 2**30:.2f} GiB ({c['psnr']} dB)"
                                       for c in sizes.values()))


if __name__ == "__main__":
    main()
