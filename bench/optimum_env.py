"""Virtual environments for Hugging Face optimum's two runtimes, each beside the dev venv: optimum-onnx
(ONNX Runtime) for the interop tests (tests/test_optimum_interop.py) and the benchmark's `optimum` peer,
and optimum-intel (OpenVINO) for the benchmark's `optimum-intel` peer (bench/peers.py).

Neither can live in the dev venv, which has transformers 5.24 and diffusers 0.42. optimum-onnx pins
transformers below 4.58 (and so, through huggingface_hub < 1.0, diffusers at 0.39); optimum-intel 2.2.0
wants transformers < 5.6 and huggingface_hub < 1.22, and diffusers 0.40 and later need a newer
huggingface_hub, so 0.39.0 again. So each gets a venv of its own, `<repo>/.venv-optimum` and
`<repo>/.venv-optimum-intel` (`.venv*/` in .gitignore covers them), created on first use and reused
while its stamp matches its requirements, its lock, this interpreter and the dev venv's packages.
Outside a checkout (edgediff installed from a wheel) they go to edgediff's cache;
EDGEDIFF_OPTIMUM_VENV and EDGEDIFF_OPTIMUM_INTEL_VENV name other places.

    from edgediff.bench.optimum_env import optimum_python, optimum_intel_python
    python = optimum_python()   # Path to .venv-optimum/bin/python; builds the venv when it has to

How torch gets there: it is not installed but shared from the dev venv. A `.pth` file in each venv
names the dev venv's site-packages, and Python appends `.pth` entries to sys.path *after* the venv's
own site-packages, so every package the venv installs (transformers, diffusers, huggingface_hub, ...)
shadows the dev venv's copy, and whatever it does not install (torch above all, numpy, onnxruntime or
openvino when the pin equals the dev's) comes from the dev venv. The .pth is written before
`pip install`, so pip sees the shared torch as installed and never downloads one: on a machine whose
PyTorch CPU index is out of reach, a plain torch requirement would pull PyPI's 5 GB CUDA build, and even
the CPU wheel is 200 MB of download and 1 GB of disk for a second copy of the same thing. The
requirement handed to pip is torch==<the dev venv's exact version> (2.13.0+cpu here): it is satisfied by
the shared copy, and no index but PyTorch's own could ever satisfy a `+cpu` version. pip never changes
the dev venv: it does not uninstall distributions that lie outside the venv it runs in ("Not
uninstalling ..., outside environment"). After the install, torch must still be the dev venv's build
(its version, its folder and its torch.version.cuda: None for the CPU build), or the build fails.
Sharing needs the same Python (minor) version on both sides, hence each venv is created by the
interpreter that runs the tests, the dev venv's.

torchvision, which optimum-intel 2.2.0 requires, is left out, and optimum-intel is installed with
--no-deps after its other requirements. Measured here (Python 3.11, torch 2.13.0+cpu shared):
- torchvision 0.28.0 is the release built for torch 2.13.0, but PyPI's Linux wheel of it (the one any
  index but PyTorch's serves) is a CUDA 13 build: its _C.so links libtorch_cuda.so and libc10_cuda.so,
  which the CPU torch does not have, so `import torchvision` raises "operator torchvision::nms does not
  exist". PyTorch's own CPU index (torchvision 0.28.0+cpu) was out of reach from this machine.
- With it installed, `from optimum.intel import OVStableDiffusionPipeline` fails: optimum.intel imports
  transformers' AutoProcessor at import, and transformers 5.5 imports torchvision whenever it is
  installed (for its fast image processors).
- Without it, everything the benchmark runs works: the import, `optimum-cli export openvino` of SD 1.x
  and OVStableDiffusionPipeline's generation. transformers falls back to its PIL image processors, and
  optimum-intel imports torchvision in one place only, the preprocessing of a vision-language model.
So the build checks with `pip check` that torchvision is the only requirement left unmet, and imports
OVStableDiffusionPipeline once. If the dev venv has a torchvision (a build that matches its torch), it
is shared like torch.

Everything here is offline-safe except `pip install`; when that fails because the package index cannot
be reached, OptimumEnvUnavailable is raised (the tests skip on it, the benchmark skips the peer), and
any other failure is a RuntimeError (the tests fail).

Measured on the 2-core CI machine, from nothing (no pip cache): the optimum venv takes about 17 s and
220 MB; the optimum-intel venv took 115 s and 422 MB with the machine busy (load average 5; 62 s of CPU,
the import check included; openvino is shared, its pin being the dev venv's). Reusing either costs a
stamp comparison.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]  # the checkout, when edgediff is installed editable from one

# What pip prints when it cannot reach an index (urllib3 and socket errors, through pip's retry warnings).
_NETWORK_ERRORS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "No route to host", "Connection refused",
    "ConnectTimeoutError", "ReadTimeoutError", "Read timed out", "ProxyError", "Max retries exceeded",
    "connection broken by",
)
_NOT_FOUND = ("No matching distribution found", "Could not find a version that satisfies")


class OptimumEnvUnavailable(Exception):
    """A venv here could not be built because the package index is unreachable."""


class Check(NamedTuple):
    """A module the venv must provide at the version its requirements pin."""
    module: str
    dists: tuple[str, ...]  # the distributions that may provide it, the one the requirements pin first
    own: bool = True  # from the venv itself, not from the dev venv's shared site-packages


@dataclass(frozen=True)
class PeerVenv:
    name: str  # the folder .venv-<name>, the lock bench/<name>-constraints.txt
    requirements: tuple[str, ...]  # installed with their dependencies, as pip resolves them
    checks: tuple[Check, ...]
    no_deps: tuple[str, ...] = ()  # installed afterwards, without their dependencies
    left_out: tuple[str, ...] = ()  # no_deps' requirements not installed: the only ones `pip check` may name
    smoke: str = ""  # Python run in the venv after the build; it must not fail

    @property
    def venv(self) -> Path:
        given = os.environ.get(f"EDGEDIFF_{self.name.upper().replace('-', '_')}_VENV")
        if given:
            return Path(given)
        if (REPO / "pyproject.toml").is_file():
            return REPO / f".venv-{self.name}"
        from ..engine.files import cache_root

        return cache_root() / f"venv-{self.name}"

    @property
    def lock_file(self) -> Path:
        """Everything pip installs into the venv beside the requirements, pinned as constraints.txt pins
        the dev venv, so that a new release cannot change what runs there. `python -m
        edgediff.bench.optimum_env --lock` (run by `./dev lock`) rewrites it."""
        return Path(__file__).with_name(f"{self.name}-constraints.txt")

    def python(self, locked: bool = True) -> Path:
        """The venv's python, after building the venv if it is missing or its stamp is stale.
        `locked=False` builds it from the newest releases the requirements admit (for `lock`)."""
        venv, shared = self.venv, _shared_site_packages()
        stamp = {
            "requirements": list(self.requirements),
            "lock": self.lock_file.read_text() if self.lock_file.is_file() else None,
            "python": sys.version,
            "shared": str(shared),
            # a change in the dev venv (another torch, numpy, ...) rebuilds: pip resolved against these
            "shared_packages": sorted(f"{d.metadata['Name']}=={d.version}"
                                      for d in importlib.metadata.distributions(path=[str(shared)])),
        }
        # only where set, so that a venv without them keeps the stamp it was built with
        stamp.update({k: v for k, v in (("no_deps", list(self.no_deps)), ("left_out", list(self.left_out)),
                                        ("smoke", self.smoke)) if v})
        text = json.dumps(stamp, indent=1)
        python = venv / "bin" / "python"
        stamp_file = venv / f".edgediff-{self.name}-stamp"
        if locked and python.exists() and stamp_file.is_file() and stamp_file.read_text() == text:
            return python
        start = time.perf_counter()
        self._build(venv, python, shared, locked)
        if not locked:
            return python  # no stamp: the next locked use rebuilds from the lock
        stamp_file.write_text(text)  # last: an interrupted build is redone next time
        print(f"optimum_env: built {venv} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return python

    def lock(self) -> Path:
        """Rebuild the venv from the newest releases and pin what pip put in it (its own site-packages,
        not the shared dev packages) into lock_file."""
        python = self.python(locked=False)
        frozen = _run([str(python), "-m", "pip", "freeze", "--path", _purelib(python)], "list its packages").stdout
        self.lock_file.write_text(f"# The {self.name} venv's own packages (bench/optimum_env.py); written by "
                                  "`python -m edgediff.bench.optimum_env --lock`, do not edit by hand.\n" + frozen)
        return self.lock_file

    def _build(self, venv: Path, python: Path, shared: Path, locked: bool) -> None:
        if venv.exists():
            shutil.rmtree(venv)
        # The interpreter running the tests (the dev venv's) creates the venv: `-m venv` from inside a venv
        # uses the base Python, and the shared site-packages need the same Python version.
        _run([sys.executable, "-m", "venv", str(venv)], "create the venv")
        (Path(_purelib(python)) / "zz-edgediff-dev-venv.pth").write_text(f"{shared}\n")

        torch_version = importlib.metadata.version("torch")
        dev = _probe(python, self.checks)  # only the .pth so far: this torch is the dev venv's own
        if dev.get("torch") != [torch_version, str(shared)]:
            raise RuntimeError(f"{venv} does not see the dev venv's torch {torch_version} in {shared} "
                               f"(it sees {dev.get('torch')}); refusing to let pip install one")

        constraints = ["-c", str(self.lock_file)] if locked and self.lock_file.is_file() else []
        self._pip(python, [*self.requirements, f"torch=={torch_version}", *constraints])
        if self.no_deps:
            self._pip(python, ["--no-deps", *self.no_deps, *constraints])

        # What the runners rely on: the pinned versions, from the venv itself; torch still the shared one.
        seen = _probe(python, self.checks)
        if seen.get("torch") != [torch_version, str(shared)] or seen["torch_cuda"] != dev["torch_cuda"]:
            version, folder = seen.get("torch") or (None, None)
            raise RuntimeError(f"{venv}: pip install replaced the dev venv's torch {torch_version} "
                               f"({_build_name(dev['torch_cuda'])}) from {shared} with torch {version} "
                               f"({_build_name(seen['torch_cuda'])}) from {folder}")
        wanted = dict(r.split("==") for r in (*self.requirements, *self.no_deps) if "==" in r)
        problems = []
        for check in self.checks:
            version, where = seen.get(check.module) or (None, "")
            if version != wanted[check.dists[0]]:
                problems.append(f"{check.module}: {version} from {where}, wanted {wanted[check.dists[0]]}")
            elif check.own and not where.startswith(str(venv.resolve())):
                problems.append(f"{check.module}: from {where}, wanted the copy in {venv}")
        problems += self._unmet(python)
        if self.smoke and not problems:
            done = subprocess.run([str(python), "-c", self.smoke], capture_output=True, text=True,
                                  env=subprocess_env())
            if done.returncode:
                problems.append(f"`{self.smoke}` fails: {_tail(done.stderr, 1)}")
        if problems:
            raise RuntimeError(f"{venv} was built but is not what the runners need: " + "; ".join(problems))

    def _unmet(self, python: Path) -> list[str]:
        """`pip check`'s complaints but those about left_out ("X 1.0 requires torchvision, which is not
        installed."): the requirements of no_deps that the build did not meet."""
        lines = _run([str(python), "-m", "pip", "check"], "check its requirements", ok=(0, 1)).stdout.splitlines()
        missing = {f" requires {name}, which is not installed." for name in self.left_out}
        return [ln for ln in lines if ln.strip() and not ln.startswith("No broken requirements")
                and not any(ln.endswith(m) for m in missing)]

    def _pip(self, python: Path, args: list[str]) -> None:
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check",
               "--no-input", "--retries", "2", "--timeout", "30", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
        if proc.returncode != 0:
            output = proc.stdout + proc.stderr
            if any(m in output for m in _NOT_FOUND) and any(m in output for m in _NETWORK_ERRORS):
                first = next(line for line in output.splitlines() if any(m in line for m in _NETWORK_ERRORS))
                raise OptimumEnvUnavailable(f"cannot build {self.venv}: the package index is unreachable "
                                            f"(pip: {first.strip()[:300]})")
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{_tail(output, 40)}")


# Verified together (tests/test_optimum_interop.py, Python 3.11, torch 2.13.0+cpu shared from the dev venv).
# optimum-onnx 0.1.0 is the newest release and wants optimum~=2.1.0 and transformers<4.58; transformers
# 4.57 needs huggingface_hub<1.0, and diffusers 0.40 and later need huggingface_hub>=1, so 0.39.0 is the
# newest diffusers that can sit beside it.
OPTIMUM = PeerVenv(
    "optimum",
    requirements=("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "diffusers==0.39.0",
                  "onnxruntime==1.31.1"),
    # onnxruntime's module comes from one of several distributions (the CPU build, onnxruntime-gpu, ...);
    # it may be the dev venv's when the pin equals it
    checks=(Check("optimum", ("optimum-onnx",)), Check("transformers", ("transformers",)),
            Check("diffusers", ("diffusers",)),
            Check("onnxruntime", ("onnxruntime", "onnxruntime-gpu"), own=False)),
)

# Verified together (the benchmark's tiny protocol, tests/test_optimum_intel.py). optimum-intel 2.2.0 is the
# newest release; these are its requirements (optimum~=2.3.0, transformers>=4.51,<5.6, huggingface_hub<1.22,
# nncf, openvino and openvino-tokenizers >=2026.0, requests, setuptools; diffusers for its `diffusers`
# extra) but torch and torchvision, at the newest releases that satisfy them. openvino-tokenizers must
# match openvino's release; openvino 2026.4.1 is also the dev venv's, so the dev venv's copy serves.
OPTIMUM_INTEL = PeerVenv(
    "optimum-intel",
    requirements=("optimum==2.3.0", "transformers==5.5.4", "huggingface-hub==1.21.0", "diffusers==0.39.0",
                  "nncf==3.4.0", "openvino==2026.4.1", "openvino-tokenizers==2026.4.1.0", "requests>=2.33,<3",
                  "setuptools"),
    checks=(Check("optimum.intel", ("optimum-intel",)), Check("transformers", ("transformers",)),
            Check("diffusers", ("diffusers",)), Check("openvino", ("openvino",), own=False)),
    no_deps=("optimum-intel==2.2.0",),
    left_out=("torchvision",),  # the module docstring says why
    smoke="from optimum.intel import OVStableDiffusionPipeline, OVStableDiffusionXLPipeline",
)
VENVS = {v.name: v for v in (OPTIMUM, OPTIMUM_INTEL)}

# The names tests/optimum_env.py and the benchmark have used since there was one venv here.
VENV, REQUIREMENTS, LOCK = OPTIMUM.venv, OPTIMUM.requirements, OPTIMUM.lock_file
optimum_python = OPTIMUM.python
optimum_intel_python = OPTIMUM_INTEL.python


def subprocess_env() -> dict[str, str]:
    """Environment for the venvs' processes: nothing from the dev side's PYTHONPATH (it would come before
    the venv's own packages), and no network (local folders only)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore")
    return env


def _shared_site_packages() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        raise RuntimeError(f"torch is not importable from {sys.executable}; run the tests in the dev venv "
                           "(./dev test), which has it")
    return Path(spec.origin).resolve().parents[1]


def _build_name(cuda: str | None) -> str:
    return "CPU" if cuda is None else f"CUDA {cuda}"


def _purelib(python: Path) -> str:
    return _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                "find its site-packages").stdout.strip()


_PROBE = """
import importlib.metadata as m, importlib.util as u, json, os, sys
out = {}
for module, dists in [["torch", ["torch"]], *json.loads(sys.argv[1])]:
    try:
        spec = u.find_spec(module)
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        spec = None
    if spec is None:
        continue
    # a package's __init__.py is two levels below site-packages (one more per dot in its name); a namespace
    # package's folder (optimum) one
    where = spec.origin or os.path.join(list(spec.submodule_search_locations)[0], "__init__.py")
    folder = os.path.realpath(where)
    for _ in range(module.count(".") + 2):
        folder = os.path.dirname(folder)
    # the distribution in the same folder as the module (the first on sys.path)
    found = {d.metadata["Name"].lower(): d.version for d in m.distributions(path=[folder])}
    out[module] = [next((found[d] for d in dists if d in found), None), folder]
import torch  # which build: its version says 2.13.0+cpu, but only this says whether it needs CUDA
out["torch_cuda"] = torch.version.cuda
print(json.dumps(out))
"""


def _probe(python: Path, checks: tuple[Check, ...]) -> dict:
    """{module: [version, site-packages folder], "torch_cuda": torch.version.cuda} as the venv's python
    sees them."""
    return json.loads(_run([str(python), "-c", _PROBE, json.dumps([[c.module, c.dists] for c in checks])],
                           "inspect the venv").stdout)


def _run(cmd: list[str], what: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    if proc.returncode not in ok:
        raise RuntimeError(f"could not {what} ({' '.join(cmd)}):\n{_tail(proc.stdout + proc.stderr, 30)}")
    return proc


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main(argv: list[str]) -> None:
    """python -m edgediff.bench.optimum_env [--lock] [NAME ...]: build (or check) the venvs, or lock them."""
    lock = "--lock" in argv
    names = [a for a in argv if a != "--lock"] or list(VENVS)
    unknown = [n for n in names if n not in VENVS]
    if unknown:
        sys.exit(f"optimum_env: unknown venv {unknown[0]!r}; use one of: {', '.join(VENVS)}")
    for name in names:
        print(VENVS[name].lock() if lock else VENVS[name].python())


if __name__ == "__main__":
    main(sys.argv[1:])
