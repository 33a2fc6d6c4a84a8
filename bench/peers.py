"""The runners a benchmark compares, each measured in a process of its own.

    python peers.py RUNNER --spec SPEC.json      # RUNNER: edgediff, diffusers, optimum or optimum-intel

A runner loads its pipeline (timed: the cold start), runs a warm-up call of the protocol's warm-up steps,
then the timed call, all from the initial latents in SPEC's .npy file, with the Euler scheduler built from
the same scheduler_config.json, the same prompt and the safety checker off (the benchmark's weights are
random). It writes, into SPEC's "out" folder, images.npy (uint8, (B, H, W, 3)), image.png (the first
image) and report.json: its times per stage, the timed generation's own peak resident memory (VmHWM,
reset before the call, as edgediff's GenerationResult.peak_memory is), the process's peak over its whole
life, and the versions it ran with. The parent (bench/run.py) measures the wall time with
bench/measure.py.

Why the process peak is measured here and not taken from os.wait4: on Linux a child's ru_maxrss starts at
its parent's high-water mark (exec keeps the larger of the old and new address spaces' peaks), so every
child would report at least its parent's own peak. VmHWM in /proc/self/status is the
child's own address space's peak. Since a generation resets it (to measure itself), the runner reads it
before every reset and keeps the largest reading.

This file runs by its path in three environments: the dev venv (edgediff; diffusers, which imports
torch), and the optimum and optimum-intel venvs (bench/optimum_env.py), where edgediff is not importable.
So its top level imports the standard library only, and each runner imports what it needs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RUNNERS = ("edgediff", "diffusers", "optimum", "optimum-intel")
# What each peer's report lists as "versions".
PEER_PACKAGES = {
    "diffusers": ("diffusers", "transformers", "torch", "numpy"),
    "optimum": ("optimum-onnx", "optimum", "diffusers", "transformers", "onnxruntime", "torch", "numpy"),
    "optimum-intel": ("optimum-intel", "optimum", "openvino", "openvino-tokenizers", "diffusers", "transformers",
                      "torch", "numpy"),
}


# The parent's side: which peers can run here, and the command that runs each.

class PeerUnavailable(Exception):
    """A peer cannot run here; the message is the one-line note the report prints."""


def command(runner: str, spec: Path, python: str | None = None) -> list[str]:
    return [python or sys.executable, str(Path(__file__).resolve()), runner, "--spec", str(spec)]


def check_diffusers(diffusers_folder: str | None) -> None:
    import importlib.util

    missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise PeerUnavailable(f"{', '.join(missing)} not installed (pip install 'edgediff[export]')")
    if not diffusers_folder:
        raise PeerUnavailable("the model has no diffusers folder to load (give --model a diffusers folder)")


@dataclass(frozen=True)
class ExportedPeer:
    """How a peer's own exporter turns the diffusers folder into the folder its pipeline loads."""
    cli: tuple[str, ...]  # optimum-cli's arguments between the command and `--model SRC OUT`
    marker: str  # a file of a finished export (its parts are moved in together at the end)


EXPORTS = {
    "optimum": ExportedPeer(("export", "onnx", "--task", "text-to-image"), "unet/model.onnx"),
    # fp32 weights: without --weight-format, optimum-cli compresses the weights of parts over 1B parameters
    # (SDXL's UNet) to int8
    "optimum-intel": ExportedPeer(("export", "openvino", "--task", "text-to-image", "--weight-format", "fp32"),
                                  "unet/openvino_model.xml"),
}


def peer_model(peer: str, diffusers_folder: str | None, source_sha256: str | None, given: str | None,
               python: Path) -> Path:
    """The folder the peer's pipeline loads: `given`, or optimum-cli's export of the same weights, made once
    into edgediff's cache (bench/<peer>/<source hash>)."""
    flag = f"--{peer}-model"
    if given:
        if not (Path(given) / "model_index.json").is_file():
            raise PeerUnavailable(f"{flag} {given} is not a model folder (no model_index.json)")
        return Path(given)
    if not diffusers_folder or not source_sha256:
        raise PeerUnavailable(f"the model has no diffusers folder for optimum-cli to export (give {flag})")
    from ..engine.files import atomic_folder
    from ..engine.files import cache_root
    from .optimum_env import subprocess_env

    export = EXPORTS[peer]
    out = cache_root() / "bench" / peer / source_sha256[:16]
    if (out / export.marker).is_file():
        return out
    import shutil
    import subprocess

    print(f"{peer}: exporting {diffusers_folder} with optimum-cli into {out} (once)", file=sys.stderr)
    with atomic_folder(out) as tmp:
        src = hub_layout(Path(diffusers_folder), tmp / "source")
        cli = [str(python.parent / "optimum-cli"), *export.cli, "--model", str(src), str(tmp / "exported")]
        done = subprocess.run(cli, capture_output=True, text=True, env=subprocess_env())
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise PeerUnavailable(f"optimum-cli {' '.join(export.cli[:2])} failed: {tail[0][:300]}")
        for part in (tmp / "exported").iterdir():
            part.rename(tmp / part.name)
        (tmp / "exported").rmdir()
        shutil.rmtree(src)
    return out


def hub_layout(src: Path, dst: Path) -> Path:
    """The source with its tokenizer and text encoder as transformers 4 (optimum's venv) reads them:
    vocab.json and merges.txt beside tokenizer.json, and the text encoder's weights under `text_model.`
    (transformers 5 writes neither; tests/test_optimum_interop.py explains). transformers 5.5 (optimum-intel's
    venv) needs the prefix too: without it, it loads CLIPTextModel with random weights and a load report,
    and the export's picture has nothing to do with diffusers' (4 dB). The other parts are linked."""
    dst.mkdir(parents=True)
    for part in src.iterdir():
        if part.name in ("tokenizer", "text_encoder"):
            import shutil

            shutil.copytree(part, dst / part.name)
        else:
            (dst / part.name).symlink_to(part.resolve(), target_is_directory=part.is_dir())
    tok = dst / "tokenizer"
    if (tok / "tokenizer.json").is_file() and not (tok / "vocab.json").is_file():
        bpe = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        (tok / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    weights_file = dst / "text_encoder" / "model.safetensors"
    if weights_file.is_file():
        from safetensors.numpy import load_file, save_file

        weights = load_file(weights_file)
        if not any(k.startswith("text_model.") for k in weights):
            save_file({f"text_model.{k}": v for k, v in weights.items()}, weights_file, metadata={"format": "pt"})
    return dst


# The runners' side: each runs in its own process.

def run_edgediff(spec: dict) -> dict:
    import numpy as np

    from edgediff import Pipeline

    options = spec["options"]
    report: dict = {"versions": versions(("edgediff", "onnxruntime", "numpy"))}
    peak = _ProcessPeak()
    budget = options.get("budget")
    if options.get("plan"):
        budget = _rung_budget(spec, options["plan"], options["backend"])
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(spec["model"], backend=options["backend"], safety_checker=False,
                                    memory_budget=budget)
    report["load_s"] = time.perf_counter() - start
    latents = np.load(spec["latents"])
    # no negative prompt is None for every runner: SDXL then uses zero conditioning, as diffusers does
    call = dict(negative_prompt=spec["negative"] or None, guidance_scale=spec["guidance"], width=spec["width"],
                height=spec["height"], scheduler=spec["scheduler"], num_images_per_prompt=spec["batch"],
                seed=spec["seed"], latents=latents)
    # the speed levers a row asks for (bench/protocols.EdgediffOptions), each off by default
    interval = options.get("guidance_interval")
    call.update(cache_interval=int(options.get("cache", 1)), vae_decoder=options.get("vae", "full"),
                precision=options.get("precision", "f32"),
                guidance_interval=tuple(float(v) for v in interval.split("-")) if interval else None)
    if spec["warmup_steps"]:
        peak.read()  # each call resets VmHWM when it starts
        start = time.perf_counter()
        pipe(spec["prompt"], num_inference_steps=spec["warmup_steps"], **call)
        report["first_run_s"] = time.perf_counter() - start
    peak.read()
    start = time.perf_counter()
    result = pipe(spec["prompt"], num_inference_steps=spec["steps"], **call)
    report["total_s"] = time.perf_counter() - start
    report["process_peak_bytes"] = peak.read()
    _save(spec, np.stack([np.asarray(im.convert("RGB")) for im in result.images]))
    plan = result.plan
    report.update(
        timings=result.timings, generation_peak_bytes=result.peak_memory,
        backend=pipe.device.backend, device=pipe.device.name, moved=pipe.moved,
        plan=plan.summary() if plan else None, rung=plan.rung if plan else None,
        predicted_peak_bytes=plan.predicted_peak if plan else None,
        # where the backend can tell its device's own peak; ONNX Runtime's CPU provider cannot (the host's
        # peak above is the CPU's device memory)
        peak_device_bytes=None,
        torch_imported="torch" in sys.modules,  # the run time must not import it
    )
    if options.get("plan") and plan and plan.rung != options["plan"]:
        report["note"] = f"asked for the {options['plan']} plan, the planner ran {plan.rung}"
    return report


def _rung_budget(spec: dict, rung: str, backend: str) -> int:
    """A budget that makes the planner pick `rung`: above its prediction, below every faster rung's
    (as bench/plan_memory.py forces them)."""
    from edgediff.backends import select
    from edgediff.engine.errors import EdgediffError
    from edgediff.engine.model_folder import read_model_folder
    from edgediff.engine.plan import RUNGS, Request, _plan, component_facts

    model = read_model_folder(spec["model"])
    facts = component_facts(model)
    _, device = select(backend)
    request = Request(spec["width"], spec["height"], spec["batch"], cfg=spec["guidance"] > 1,
                      cache_interval=int(spec["options"].get("cache", 1)),
                      precision=spec["options"].get("precision", "f32"))
    peaks = {r[0]: _plan(model, facts, request, device, 10**13, *r).predicted_peak for r in RUNGS}
    names = [r[0] for r in RUNGS]
    faster = [peaks[n] for n in names[:names.index(rung)]]
    if faster and min(faster) <= peaks[rung]:
        raise EdgediffError(f"the {rung} plan is predicted to need no less memory than a faster one at this "
                            "size; the planner never picks it here")
    return peaks[rung] + (min(faster) - peaks[rung]) // 4 if faster else 2 * peaks[rung]


def pipeline_class(folder: str) -> str:
    """The diffusers pipeline class the folder's model_index.json names (StableDiffusionPipeline,
    StableDiffusionXLPipeline, ...): this file runs in optimum's venv too, without edgediff's family
    records, and the folder says it itself."""
    return json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "StableDiffusionPipeline")


def run_diffusers(spec: dict) -> dict:
    import diffusers
    import torch

    start = time.perf_counter()
    cls = pipeline_class(spec["model"])
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls == "StableDiffusionPipeline" else {}
    pipe = getattr(diffusers, cls).from_pretrained(spec["model"], torch_dtype=torch.float32, **extra)
    with torch.inference_mode():
        return _run_peer(pipe, spec, {}, start, "diffusers", f"torch {torch.__version__}, CPU, fp32")


def run_optimum(spec: dict) -> dict:
    import optimum.onnxruntime

    start = time.perf_counter()
    # optimum's classes are diffusers' with ORT in front (ORTStableDiffusionXLPipeline for SDXL); its
    # export writes the source's model_index.json. export=False: the folder must load as it is (optimum
    # would otherwise re-export one it deems incomplete)
    cls = getattr(optimum.onnxruntime, "ORT" + pipeline_class(spec["model"]))
    pipe = cls.from_pretrained(spec["model"], export=False)
    providers = pipe.unet.session.get_providers()
    return _run_peer(pipe, spec, {}, start, "optimum", ", ".join(providers))


def run_optimum_intel(spec: dict) -> dict:
    import openvino
    import optimum.intel

    start = time.perf_counter()
    # OVStableDiffusionPipeline (OVStableDiffusionXLPipeline for SDXL) compiles every part for the CPU in
    # from_pretrained, so load_s includes the compilation. No ov_config: OpenVINO's defaults are what a
    # user gets, and on a CPU with AVX512_BF16 or AMX they include bf16 inference (the note says which ran).
    cls = getattr(optimum.intel, "OV" + pipeline_class(spec["model"]))
    pipe = cls.from_pretrained(spec["model"], export=False)
    precision = _ov_precision(pipe)
    runtime = f"OpenVINO {openvino.get_version().split('-')[0]}, CPU, " + "/".join(sorted(set(precision.values())))
    report = {"note": "inference precision (INFERENCE_PRECISION_HINT, OpenVINO's default): "
                      + ", ".join(f"{part} {p}" for part, p in precision.items())}
    return _run_peer(pipe, spec, report, start, "optimum-intel", runtime)


def _ov_precision(pipe) -> dict[str, str]:
    """The precision each compiled part runs in: OpenVINO's CPU plugin picks bf16 by itself where the CPU
    has AVX512_BF16 or AMX (f32 elsewhere), unless ov_config asks for another."""
    parts = {"text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None),
             "unet": pipe.unet, "vae_decoder": pipe.vae.decoder}
    return {name: part.request.get_property("INFERENCE_PRECISION_HINT").to_string()  # an openvino.Type: "bf16"
            for name, part in parts.items() if part is not None and part.request is not None}


def _run_peer(pipe, spec: dict, report: dict, start: float, runner: str, device: str) -> dict:
    """diffusers' pipeline call, shared by diffusers, optimum and optimum-intel (whose pipelines inherit it)."""
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(json.loads(Path(spec["scheduler_config"]).read_text()))
    pipe.set_progress_bar_config(disable=True)
    report["load_s"] = time.perf_counter() - start
    timings: dict[str, float] = {}
    _time_calls(timings, "text_encoder", pipe.text_encoder, "forward")
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: both encoders are the text stage, as in edgediff
        _time_calls(timings, "text_encoder", pipe.text_encoder_2, "forward")
    _time_calls(timings, "unet", pipe.unet, "forward")
    _time_calls(timings, "vae_decoder", pipe.vae, "decode")
    latents = torch.from_numpy(np.load(spec["latents"]))
    call = dict(negative_prompt=spec["negative"] or None, guidance_scale=spec["guidance"], width=spec["width"],
                height=spec["height"], num_images_per_prompt=spec["batch"], latents=latents, output_type="np")
    if spec["warmup_steps"]:
        begin = time.perf_counter()
        pipe(spec["prompt"], num_inference_steps=spec["warmup_steps"], **call)
        report["first_run_s"] = time.perf_counter() - begin
    timings.clear()
    peak = _ProcessPeak()
    peak.read()
    _reset_peak()
    begin = time.perf_counter()
    out = pipe(spec["prompt"], num_inference_steps=spec["steps"], **call)
    report["total_s"] = time.perf_counter() - begin
    report["generation_peak_bytes"] = _peak()
    report["process_peak_bytes"] = peak.read()
    images = np.asarray(out.images, dtype=np.float32)  # (B, H, W, 3) in [0, 1]
    _save(spec, (images * 255).round().astype(np.uint8))  # as diffusers' numpy_to_pil rounds
    report.update(timings=timings, backend="cpu", device=device, peak_device_bytes=None,
                  versions=versions(PEER_PACKAGES[runner]))
    return report


def _time_calls(timings: dict, key: str, obj, method: str) -> None:
    """Add the time of every call of obj.method to timings[key] (an instance attribute shadows the class's
    method; torch modules and optimum's parts both call self.forward)."""
    original = getattr(obj, method)

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - begin

    setattr(obj, method, timed)


def _reset_peak() -> None:
    try:  # Linux: 5 resets the peak-RSS counter (VmHWM), as engine/pipeline.py does per generation
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _ProcessPeak:
    """The largest VmHWM read so far: the process's peak across the resets of the generation's counter."""

    def __init__(self):
        self.value = None

    def read(self) -> int | None:
        now = _peak()
        if now is not None:
            self.value = max(self.value or 0, now)
        return self.value


def _peak() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _save(spec: dict, images) -> None:
    import numpy as np
    from PIL import Image

    out = Path(spec["out"])
    np.save(out / "images.npy", images)
    Image.fromarray(images[0]).save(out / "image.png")


def versions(packages) -> dict:
    import importlib.metadata

    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


@contextmanager
def _quiet():
    """Progress bars and library chatter off: the parent keeps this process's output for its errors."""
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="one benchmark runner, in its own process (bench/run.py runs it)")
    p.add_argument("runner", choices=RUNNERS)
    p.add_argument("--spec", required=True, type=Path)
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            report = {"edgediff": run_edgediff, "diffusers": run_diffusers, "optimum": run_optimum,
                      "optimum-intel": run_optimum_intel}[args.runner](spec)
    except Exception as e:
        if type(e).__name__ != "EdgediffError":  # edgediff is not importable in the optimum venvs
            raise
        print(f"edgediff: error: {e}", file=sys.stderr)  # the line the parent's report quotes
        return 2
    report["runner"] = args.runner
    (Path(spec["out"]) / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    # Run by its path: this folder is sys.path[0]; its modules (run.py, ...) must not shadow others'.
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.exit(main())
