"""A prepared check of the CUDA backend on an NVIDIA GPU: one command, one JSON file.

    python -m edgediff.bench.gpu_check [--out gpu_check.json] [--work DIR] [--steps 4] [--minutes 8]

Run it from the dev venv (./dev's: edgediff installed editable, torch, diffusers, the CPU onnxruntime).
Where there is no NVIDIA GPU it prints one line, `gpu_check: no NVIDIA GPU here: <why>; ...`, and exits
with status 3 (NO_GPU), having installed, exported and written nothing. The GPU is looked for with
`nvidia-smi -L`, or through NVML (nvidia-ml-py's pynvml) where nvidia-smi is not on PATH.

On a machine with one, it:
1. installs onnxruntime-gpu, with the CUDA and cuDNN libraries its wheel names as extras, and
   nvidia-ml-py into a venv of its own (WORK/venv), beside edgediff (editable, no dependencies) and
   edgediff's run-time dependencies: no torch, as in an app that ships edgediff. onnxruntime and
   onnxruntime-gpu both install the `onnxruntime` package, and in one environment each overwrites the
   other's files, so the GPU build cannot go into the dev venv beside the CPU one;
2. runs `edgediff devices`, and `edgediff plan` for SD 1.5 at 512x512, in that venv;
3. exports, in the dev venv (exporting needs torch; each once, into edgediff's cache), the built-in model
   and the full-size SD 1.5 architecture with random weights (bench/sd15.py), both in fp16, the built-in
   model's export and runs first;
4. generates with each at 512x512, in child processes of the GPU venv, on the cuda backend (a warm-up
   call, then the timed call, with NVML sampling the device's used memory every 10 ms) and on the cpu
   backend, from the same seed; the PSNR of CUDA's picture against the CPU's (engine/metrics.psnr), and
   the measured device peak against the plan's predicted peak;
5. times diffusers on the same SD 1.5 weights on CUDA in fp16 (the dev venv's torch must be a CUDA
   build: ./dev installs one where nvidia-smi works), the same steps, size and guidance;
6. writes one JSON file (schema edgediff-gpu-check/1; bench/README.md says what is in it).

A step that fails is recorded in the JSON's "errors" and the steps that do not need it still run; the exit
status is then 1. Every child gets what is left of the deadline (--minutes), so a hung step cannot hold a
borrowed GPU past it. The exports are the slow part the first time (SD 1.5's fp32 export took 775 s on
the 2-core development machine); they are cached, so a second run does not repeat them.

What has never run: anything on a GPU. This was written on machines without one: tests/test_gpu_check.py
runs the no-GPU exit; with the look-up bypassed by hand, the install (onnxruntime-gpu 1.31.1 and the
extras of its wheel), `edgediff devices` and `plan` in the GPU venv, the built-in model's export and
its cpu run, and the deadline stopping the SD 1.5 export were run once. The CUDA sessions, NVML's
sampling and the diffusers run on CUDA are untried.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

NO_GPU = 3  # the exit status when there is no NVIDIA GPU: nothing was checked
SCHEMA = "edgediff-gpu-check/1"
SIZE = 512
SEED = 1
GUIDANCE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"
# What the GPU venv gets besides edgediff's run-time dependencies: the GPU build with the CUDA runtime,
# cuBLAS/cuFFT/cuRAND and cuDNN wheels it was built against (onnxruntime.preload_dlls loads them), and
# NVML's bindings for the probe and the peak.
GPU_PACKAGES = ("onnxruntime-gpu[cuda,cudnn]", "nvidia-ml-py")


# -- Is there a GPU? ---------------------------------------------------------------------------------

def find_gpus() -> tuple[list[str], str | None]:
    """The GPUs nvidia-smi lists ("GPU 0: NVIDIA H200 (UUID: ...)"), or none and why."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            return [], f"nvidia-smi -L did not run ({e})"
        gpus = [line.strip() for line in done.stdout.splitlines() if line.startswith("GPU ")]
        if gpus:
            return gpus, None
        said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        return [], f"nvidia-smi -L lists none ({said[0] if said else f'exit status {done.returncode}'})"
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-smi is not on PATH and nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
        try:
            names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                     for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # pynvml.NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return [], f"nvidia-smi is not on PATH and NVML found no driver ({_first_line(e)})"
    if not names:
        return [], "nvidia-smi is not on PATH and NVML lists no GPU"
    return [f"GPU {i}: {n.decode() if isinstance(n, bytes) else n}" for i, n in enumerate(names)], None


# -- The parent: the steps, in the dev venv ------------------------------------------------------------

class Check:
    """The report being written, the deadline, and the children run against it."""

    def __init__(self, out: Path, work: Path, steps: int, minutes: float):
        self.out, self.work, self.steps = out, work, steps
        self.start = time.monotonic()
        self.deadline = self.start + minutes * 60
        self.report: dict = {"schema": SCHEMA, "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                             "size": SIZE, "steps": steps, "seed": SEED, "guidance": GUIDANCE, "errors": []}

    def run(self, args: list, **kwargs) -> subprocess.CompletedProcess:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed before it started")
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=left, **kwargs)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            command = " ".join([Path(str(args[0])).name, *(str(a) for a in args[1:4])])
            raise RuntimeError(f"{command} ... exited {done.returncode}: {tail[0][:500]}")
        return done

    def step(self, name: str, fn, *args):
        """fn(*args), timed into report["seconds"]; a failure is recorded and None returned."""
        begin = time.monotonic()
        try:
            return fn(*args)
        except Exception as e:
            self.report["errors"].append(f"{name}: {type(e).__name__}: {_first_line(e)}")
            return None
        finally:
            self.report.setdefault("seconds", {})[name] = round(time.monotonic() - begin, 1)

    def write(self) -> None:
        self.report["total_s"] = round(time.monotonic() - self.start, 1)
        self.out.write_text(json.dumps(self.report, indent=1))


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install(check: Check) -> Path:
    """The GPU venv's Python, made the first time."""
    repo = Path(__file__).resolve().parent.parent  # bench/ is one of the checkout's top-level folders
    if not (repo / "pyproject.toml").is_file():
        raise RuntimeError(f"{repo} is not an edgediff checkout; run gpu_check from one (pip install -e)")
    venv = check.work / "venv"
    python = _venv_python(venv)
    if not python.exists():
        check.run([sys.executable, "-m", "venv", venv])
    pins = ["-c", repo / "constraints.txt"] if (repo / "constraints.txt").is_file() else []
    runtime = [r for r in runtime_requirements(repo) if not r.startswith("onnxruntime")]
    check.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", repo])
    check.run([python, "-m", "pip", "install", "-q", *pins, *runtime, *GPU_PACKAGES])
    listed = check.run([python, "-c", "import json, onnxruntime as o; from importlib.metadata import version as v;"
                        " print(json.dumps({'onnxruntime-gpu': v('onnxruntime-gpu'), 'nvidia-ml-py': "
                        "v('nvidia-ml-py'), 'providers': o.get_available_providers()}))"])
    check.report["install"] = {"venv": str(venv), **json.loads(listed.stdout)}
    return python


def runtime_requirements(repo: Path) -> list[str]:
    """edgediff's run-time dependencies as the checkout's pyproject.toml lists them now (the installed
    metadata is as old as the last `pip install -e`)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed metadata
        from importlib.metadata import requires

        return [r for r in requires("edgediff") or [] if "extra ==" not in r]
    return list(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"])


def export_builtin(check: Check) -> Path:
    done = check.run([sys.executable, "-c", "from edgediff.export.onnx_export import ExportOptions; "
                      "from edgediff.export.sources import ensure_exported; "
                      "print(ensure_exported('builtin', ExportOptions(dtype='fp16')))"])
    return Path(done.stdout.strip().splitlines()[-1])


def export_sd15(check: Check) -> tuple[Path, Path]:
    """(the random-weight diffusers folder, its fp16 export), each made the first time."""
    from . import export_memory, sd15

    src = sd15.default_folder()
    if not (src / "model_index.json").is_file():
        check.run([sys.executable, "-m", "edgediff.bench.sd15"])
    out = export_memory.exported("sd15", "fp16")
    if not (out / "edgediff.json").is_file():
        check.run([sys.executable, "-m", "edgediff.cli", "export", src, "--out", out, "--dtype", "fp16",
                   "--force"])
    return src, out


def cli(check: Check, python: Path, *args) -> str:
    return check.run([python, "-m", "edgediff.cli", *args]).stdout


def child(check: Check, python: Path, task: dict) -> dict:
    """One child's report: `python -m edgediff.bench.gpu_check --child TASK.json`."""
    folder = Path(task["out"])
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "task.json"
    spec.write_text(json.dumps(task))
    done = check.run([python, "-m", "edgediff.bench.gpu_check", "--child", spec])
    (folder / "log.txt").write_text(done.stdout + done.stderr)  # ONNX Runtime's and edgediff's warnings
    return json.loads((folder / "report.json").read_text())


def generate(check: Check, python: Path, name: str, model: Path) -> dict:
    """The model on cuda and on cpu; the PSNR between the two pictures and the peak against the plan."""
    from PIL import Image

    from ..engine.metrics import psnr

    runs = {}
    for backend in ("cuda", "cpu"):
        task = {"kind": "edgediff", "model": str(model), "backend": backend, "steps": check.steps,
                "warmup": backend == "cuda", "out": str(check.work / name / backend)}
        runs[backend] = check.step(f"{name} on {backend}", child, check, python, task)
    result: dict = {"model": str(model), **runs}
    cuda, cpu = runs["cuda"], runs["cpu"]
    if cuda and cuda.get("moved"):
        check.report["errors"].append(f"{name}: the cuda backend could not open {', '.join(cuda['moved'])}: they "
                                      f"ran on the CPU ({check.work / name / 'cuda' / 'log.txt'} says why)")
    if cuda and cpu:
        images = [Image.open(Path(r["image"])).convert("RGB") for r in (cuda, cpu)]
        db = psnr(*images)
        result["psnr_cuda_vs_cpu_db"] = None if math.isinf(db) else round(db, 2)  # None: identical pictures
    if cuda and cuda.get("peak_device_bytes") and cuda.get("predicted_peak_bytes"):
        result["peak_over_prediction"] = round(cuda["peak_device_bytes"] / cuda["predicted_peak_bytes"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgediff.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                   help="the JSON report (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None,
                   help="the GPU venv and the pictures (default: bench/gpu-check in edgediff's cache)")
    p.add_argument("--steps", type=int, default=4,
                   help="denoising steps of each timed call (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=8,
                   help="the deadline of the whole check (default: %(default)s)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # a child process's task
    args = p.parse_args(argv)
    if args.child:
        return run_child(json.loads(args.child.read_text()))

    gpus, why = find_gpus()
    if not gpus:
        print(f"gpu_check: no NVIDIA GPU here: {why}; nothing was installed, exported or run")
        return NO_GPU
    from ..engine.files import cache_root

    work = (args.work or cache_root() / "bench" / "gpu-check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, work, args.steps, args.minutes)
    check.report["gpus"] = gpus
    python = check.step("install", install, check)
    if python:
        check.report["devices"] = check.step("edgediff devices", cli, check, python, "devices")
    check.report["models"] = {}
    # the built-in model first, end to end: SD 1.5's first export can take most of the deadline
    builtin = check.step("export built-in fp16", export_builtin, check)
    if python and builtin:
        check.report["models"]["builtin"] = generate(check, python, "builtin", builtin)
    sd15 = check.step("export SD 1.5 fp16", export_sd15, check)
    if python and sd15:
        check.report["plan"] = check.step("edgediff plan", cli, check, python, "plan", "--model", sd15[1],
                                          "--width", SIZE, "--height", SIZE)
        check.report["models"]["sd15"] = generate(check, python, "sd15", sd15[1])
    if sd15:
        task = {"kind": "diffusers", "model": str(sd15[0]), "steps": args.steps, "out": str(work / "diffusers")}
        check.report["diffusers"] = check.step("diffusers on cuda", child, check, Path(sys.executable), task)
    check.write()
    print(f"gpu_check: wrote {args.out} ({len(check.report['errors'])} error(s))")
    return 1 if check.report["errors"] else 0


# -- The children ----------------------------------------------------------------------------------

class DevicePeak:
    """The GPU's used memory, sampled by NVML every 10 ms in a thread while the block runs: its peak, and
    what was used before this process touched the GPU. NVML counts the whole device, so other processes on
    it count too (the baseline says how much), and a peak shorter than 10 ms can be missed."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        self.baseline = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def used(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.used())

    def __enter__(self) -> "DevicePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def run_child(task: dict) -> int:
    out = Path(task["out"])
    report = (child_edgediff if task["kind"] == "edgediff" else child_diffusers)(task)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


def child_edgediff(task: dict) -> dict:
    import onnxruntime as ort

    cuda = task["backend"] == "cuda"
    if cuda and hasattr(ort, "preload_dlls"):
        # The GPU build's libraries have no search path to the nvidia-* wheels' CUDA and cuDNN: load them.
        ort.preload_dlls()
    from edgediff import Pipeline

    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    peak = DevicePeak() if cuda else None  # its baseline before the first session touches the GPU
    call = dict(width=SIZE, height=SIZE, num_inference_steps=task["steps"], guidance_scale=GUIDANCE, seed=SEED)
    with peak or contextlib.nullcontext():
        begin = time.perf_counter()
        pipe = Pipeline.from_pretrained(task["model"], backend=task["backend"], safety_checker=False)
        report["load_s"] = time.perf_counter() - begin
        if task["warmup"]:  # cuDNN's exhaustive search runs in the first call of each shape
            begin = time.perf_counter()
            pipe(PROMPT, **call)
            report["first_call_s"] = time.perf_counter() - begin
        begin = time.perf_counter()
        result = pipe(PROMPT, **call)
        report["call_s"] = time.perf_counter() - begin
    image = Path(task["out"]) / "image.png"
    result.images[0].save(image)
    plan = result.plan
    report.update(image=str(image), device=pipe.device.name, moved=pipe.moved, timings=result.timings,
                  plan=plan.describe(), rung=plan.rung, predicted_peak_bytes=plan.predicted_peak,
                  peak_rss_bytes=result.peak_memory)
    if peak:
        report.update(device_used_before_bytes=peak.baseline, peak_device_bytes=peak.peak - peak.baseline)
    return report


def child_diffusers(task: dict) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} cannot use the GPU (built for CUDA "
                           f"{torch.version.cuda}); ./dev installs a CUDA build where nvidia-smi works"}
    import diffusers

    begin = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(task["model"], torch_dtype=torch.float16,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    report: dict = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                    "device": torch.cuda.get_device_name(0), "load_s": time.perf_counter() - begin}
    call = dict(width=SIZE, height=SIZE, num_inference_steps=task["steps"], guidance_scale=GUIDANCE)
    with torch.inference_mode():
        for key in ("first_call_s", "call_s"):
            torch.cuda.synchronize()
            begin = time.perf_counter()
            pipe(PROMPT, generator=torch.Generator("cuda").manual_seed(SEED), **call)
            torch.cuda.synchronize()
            report[key] = time.perf_counter() - begin
    report["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return report


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
