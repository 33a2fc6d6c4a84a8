"""NVIDIA GPUs through ONNX Runtime's CUDA execution provider (package onnxruntime-gpu), with TensorRT's
provider first when the build has it and the user asks for it (EDGEDIFF_TENSORRT=1).

The probe reads the GPU through NVML (package nvidia-ml-py, imported as `pynvml`; it needs no GPU to
import): name, total and free memory, driver version, compute capability. Without nvidia-ml-py it asks
`nvidia-smi`, which every NVIDIA driver installs; with neither there is no driver to run on, and the
backend is unavailable (onnxruntime-gpu alone says nothing about a GPU: it installs anywhere).

onnxruntime-gpu's wheels find CUDA and cuDNN in the nvidia-* pip packages only after
`onnxruntime.preload_dlls()`; the backend calls it once before its first session.

What is not run here (no NVIDIA GPU on the development machines): a session on the GPU. The probe runs
against simulated NVML answers, the provider options are checked as built, and a session asked for CUDA
on a machine without it is checked to fall back to the CPU with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ...engine.components import ComponentSpec
from ...engine.files import cache_root
from .. import host
from ..base import (GiB, MiB, Device, OrtProviderBackend, OrtSession, Overrides, Unavailable, artifact_key,
                    first_line, session_options)

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
TENSORRT_ENV = "EDGEDIFF_TENSORRT"  # "1": put TensorRT's provider first when the build has it
# Tensor cores (Volta, sm_70) are what make fp16 fast: 8x the fp32 rate on matrix products. Consumer
# Pascal (sm_61) runs fp16 arithmetic at 1/64 of its fp32 rate; only the P100 (sm_60) was an exception.
FP16_FAST_FROM = (7, 0)
# Scratch memory TensorRT's tactics may use while building and running an engine; ORT's old default, ample
# for SD's convolutions. Under a memory limit it gets at most a quarter of it.
TRT_WORKSPACE = 1 * GiB

MISSING = "onnxruntime-gpu is not installed (pip install onnxruntime-gpu)"
log = logging.getLogger("edgediff")
SHADOWED = ("onnxruntime-gpu is installed, but the CPU-only onnxruntime package shadows it (pip uninstall -y "
            "onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu)")


def cuda_provider_options(device_id: int, memory_limit: int | None = None) -> dict[str, str]:
    """The CUDA execution provider's options (ONNX Runtime takes strings)."""
    options = {
        "device_id": str(device_id),
        # A plan sized the memory: grow the arena by what is asked. The default, kNextPowerOfTwo, rounds each
        # extension up to a power of two, so a 2.1 GB request can reserve 4 GB and break the budget.
        "arena_extend_strategy": "kSameAsRequested",
        # cuDNN times every convolution algorithm once per input shape and keeps the fastest. SD calls the
        # UNet with one shape 20-50 times per image, so the search (once, seconds) pays for itself, where
        # HEURISTIC guesses without timing.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        # Copies run on the compute stream, so IO binding needs no cross-stream synchronisation.
        "do_copy_in_default_stream": "1",
    }
    if memory_limit:
        # Caps ORT's arena (weights and activations); the CUDA context and cuDNN/cuBLAS handles are outside
        # it, so the planner subtracts them from the budget before passing the limit.
        options["gpu_mem_limit"] = str(int(memory_limit))
    return options


def tensorrt_provider_options(device_id: int, fp16: bool, cache_dir: Path,
                              memory_limit: int | None = None) -> dict[str, str]:
    """TensorRT's provider options. `fp16` follows the graph's dtype: with it, an fp32 graph would be run in
    fp16 where TensorRT finds it faster, moving numerics away from what the export checked (and the VAE
    overflows in fp16); without it, an fp16 graph would be run in fp32 (TensorRT treats types as hints)."""
    workspace = TRT_WORKSPACE if not memory_limit else min(TRT_WORKSPACE, int(memory_limit) // 4)
    return {
        "device_id": str(device_id),
        "trt_fp16_enable": "1" if fp16 else "0",
        # Building an engine for the UNet takes minutes; the cache makes it once per model, shape and GPU.
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache_dir),
        "trt_max_workspace_size": str(workspace),
    }


def providers_for(device: Device, path: Path, memory_limit: int | None = None,
                  overrides: Overrides | None = None, dtype: str = "fp32") -> list:
    """InferenceSession's provider list for the component at `path` on `device`: TensorRT first if the
    probe chose it, then CUDA, then the CPU for the few ops neither has. TensorRT bakes the weights into
    its cached engines, so weights overridden at load time (LoRAs) get engines of their own."""
    providers: list = []
    if TENSORRT in device.providers:
        weights = f"-{overrides.key}" if overrides else ""
        cache = cache_root() / "tensorrt" / f"{path.parent.name}-{artifact_key(path)}{weights}"
        cache.mkdir(parents=True, exist_ok=True)
        providers.append((TENSORRT, tensorrt_provider_options(device.device_id, dtype == "fp16", cache,
                                                               memory_limit)))
    providers.append((CUDA, cuda_provider_options(device.device_id, memory_limit)))
    providers.append("CPUExecutionProvider")
    return providers


def _installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
        return True
    except PackageNotFoundError:
        return False


def _import_pynvml():
    import pynvml

    return pynvml


# name, memory in MiB, driver, compute capability ("8.6"; drivers from 510 answer it)
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=name,memory.total,memory.free,driver_version,compute_cap",
              "--format=csv,noheader,nounits"]


def _smi_rows(text: str | None) -> list[list[str]]:
    return [[f.strip() for f in line.split(",")] for line in (text or "").splitlines() if line.count(",") >= 4]


_PRELOADED = False


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu (1.21 and later) loads CUDA and cuDNN from the nvidia-* pip packages, or from
    PyTorch's, only when asked: without this its CUDA provider fails to start unless the libraries are
    on the system's search path. Once per process; older builds have no such call."""
    global _PRELOADED
    if _PRELOADED:
        return
    _PRELOADED = True
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # a missing package is reported by the session that then fails to start
            log.debug("onnxruntime.preload_dlls() failed: %s", first_line(e))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # nvidia-ml-py < 11.515 gives bytes


class CudaBackend(OrtProviderBackend):
    """Probe inputs, each injectable: `available_providers()`; `nvml()` returns the pynvml module (raises
    ImportError without nvidia-ml-py); `tensorrt` (None: read EDGEDIFF_TENSORRT); `environ` (for
    CUDA_VISIBLE_DEVICES); `installed(distribution) -> bool`; `run(args) -> stdout | None` (nvidia-smi)."""

    def __init__(self, available_providers=None, nvml=None, tensorrt: bool | None = None, environ=None,
                 installed=None, device_id: int = 0, run=None):
        super().__init__("cuda", (CUDA,), MISSING, available_providers)
        self._nvml = nvml or _import_pynvml
        self._tensorrt = tensorrt
        self._environ = os.environ if environ is None else environ
        self._installed = installed or _installed
        self._run = run or host.run_command
        self.device_id = device_id

    def _nvml_index(self) -> int:
        """NVML numbers GPUs by PCI bus and ignores CUDA_VISIBLE_DEVICES; CUDA device `device_id` is the
        `device_id`-th entry of that variable when it lists indices."""
        visible = [v.strip() for v in self._environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if len(visible) > self.device_id and visible[self.device_id].isdigit():
            return int(visible[self.device_id])
        return self.device_id

    def probe(self) -> Device | Unavailable:
        available = self._available_providers()
        if CUDA not in available:
            return Unavailable(self.name, SHADOWED if self._installed("onnxruntime-gpu") else MISSING)
        notes = []
        asked = self._tensorrt if self._tensorrt is not None else self._environ.get(TENSORRT_ENV) == "1"
        if asked and TENSORRT not in available:
            notes.append(f"{TENSORRT_ENV}=1, but this onnxruntime build has no TensorRT provider")
        elif TENSORRT in available and not asked:
            notes.append(f"TensorRT provider present: set {TENSORRT_ENV}=1 to use it")
        providers = ((TENSORRT,) if asked and TENSORRT in available else ()) + (CUDA, "CPUExecutionProvider")

        try:
            nvml = self._nvml()
        except ImportError:
            return self._probe_smi(providers, notes)
        try:
            nvml.nvmlInit()
        except Exception as e:  # pynvml.NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            return Unavailable(self.name, f"CUDA provider present but no NVIDIA driver found (NVML: {first_line(e)})")
        try:
            count = nvml.nvmlDeviceGetCount()
            index = self._nvml_index()
            if index >= count:
                return Unavailable(self.name, f"CUDA provider present but NVML sees {count} NVIDIA GPU(s), "
                                              f"so there is no device {index}")
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)  # bytes: .total, .free, .used
            capability = tuple(int(v) for v in nvml.nvmlDeviceGetCudaComputeCapability(handle))
            return Device(self.name, _text(nvml.nvmlDeviceGetName(handle)), providers,
                          total_memory=int(memory.total), free_memory=int(memory.free),
                          fp16=capability >= FP16_FAST_FROM,
                          driver=f"NVIDIA driver {_text(nvml.nvmlSystemGetDriverVersion())}",
                          device_id=self.device_id, compute_capability=capability, notes=tuple(notes))
        except Exception as e:
            return Unavailable(self.name, f"CUDA provider present but NVML could not read the GPU ({first_line(e)})")
        finally:
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass

    def _probe_smi(self, providers: tuple, notes: list) -> Device | Unavailable:
        """The GPU as nvidia-smi reports it, where nvidia-ml-py is not installed."""
        rows = _smi_rows(self._run(NVIDIA_SMI))
        index = self._nvml_index()  # nvidia-smi numbers GPUs as NVML does
        if not rows:
            return Unavailable(self.name, "CUDA provider present but no NVIDIA GPU found: nvidia-ml-py is not "
                                          "installed and nvidia-smi is missing or failed (install the NVIDIA "
                                          "driver; pip install nvidia-ml-py)")
        if index >= len(rows):
            return Unavailable(self.name, f"CUDA provider present but nvidia-smi lists {len(rows)} NVIDIA GPU(s), "
                                          f"so there is no device {index}")
        name, total, free, driver, capability = rows[index][:5]
        try:
            total_b, free_b = int(float(total) * MiB), int(float(free) * MiB)
        except ValueError:
            total_b = free_b = None
            notes = notes + ["memory unknown: nvidia-smi did not report it (pip install nvidia-ml-py)"]
        try:
            cc = tuple(int(v) for v in capability.split(".")[:2])
        except ValueError:  # drivers before 510 answer "[Not Supported]"
            cc = None
        return Device(self.name, name, providers, total_memory=total_b, free_memory=free_b,
                      fp16=cc is not None and cc >= FP16_FAST_FROM, driver=f"NVIDIA driver {driver}",
                      device_id=self.device_id, compute_capability=cc, notes=tuple(notes))

    def open(self, path: Path, spec: ComponentSpec, device: Device, memory_limit: int | None = None,
             overrides: Overrides | None = None, dtype: str = "fp32", precision: str = "f32") -> OrtSession:
        """`precision` is accepted and ignored: ONNX Runtime runs the graph's own dtype (TensorRT's fp16
        follows `dtype`, see tensorrt_provider_options)."""
        _preload_cuda_libraries()
        return OrtSession(path, spec, providers_for(device, path, memory_limit, overrides, dtype), session_options(),
                          require=CUDA, bind_device=("cuda", device.device_id), overrides=overrides)


BACKEND = CudaBackend()
