"""A virtual environment with Hugging Face optimum-onnx, for the interop tests (tests/test_optimum_interop.py)
and the benchmark's optimum peer (bench/peers.py).

optimum-onnx pins transformers below 4.58 (and so, through huggingface_hub < 1.0, diffusers at 0.39),
while the dev venv has transformers 5 and diffusers 0.42: the two cannot share one environment. So
optimum gets a venv of its own, `<repo>/.venv-optimum` (`.venv*/` in .gitignore covers it), created on
first use and reused while its stamp matches REQUIREMENTS, this interpreter and the dev venv's packages.
Outside a checkout (edgediff installed from a wheel) it goes to edgediff's cache; EDGEDIFF_OPTIMUM_VENV
names another place.

    from edgediff.bench.optimum_env import optimum_python
    python = optimum_python()   # Path to .venv-optimum/bin/python; builds the venv when it has to

How torch gets there: it is not installed but shared from the dev venv. A `.pth` file in the optimum
venv names the dev venv's site-packages, and Python appends `.pth` entries to sys.path *after* the
venv's own site-packages, so every package the optimum venv installs (transformers 4.57, diffusers
0.39, huggingface_hub 0.36, ...) shadows the dev venv's copy, and whatever it does not install (torch
above all, numpy, onnxruntime when the pin equals the dev's) comes from the dev venv. The .pth is
written before `pip install`, so pip sees the shared torch as installed and never downloads one: on a
machine whose PyTorch CPU index is out of reach, a plain torch requirement would pull PyPI's 5 GB CUDA
build, and even the CPU wheel is 200 MB of download and 1 GB of disk for a second copy of the same
thing. The requirement handed to pip is torch==<the dev venv's exact version> (2.13.0+cpu here): it
is satisfied by the shared copy, and no index but PyTorch's own could ever satisfy a `+cpu` version.
pip never changes the dev venv: it does not uninstall distributions that lie outside the venv it runs
in ("Not uninstalling ..., outside environment"). Sharing needs the same Python (minor) version on both
sides, hence the venv is created by the interpreter that runs the tests, the dev venv's.

Everything here is offline-safe except the one `pip install`; when that fails because the package
index cannot be reached, OptimumEnvUnavailable is raised (the tests skip on it), and any other failure
is a RuntimeError (the tests fail).

Measured on the 2-core CI machine: building from nothing (no pip cache) takes about 17 s and 220 MB;
reusing it costs a stamp comparison.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout, when edgediff is installed editable from one


def _default_venv() -> Path:
    if (REPO / "pyproject.toml").is_file():
        return REPO / ".venv-optimum"
    from ..engine.files import cache_root

    return cache_root() / "venv-optimum"


VENV = Path(os.environ.get("EDGEDIFF_OPTIMUM_VENV") or _default_venv())
STAMP = ".edgediff-optimum-stamp"

# Verified together (tests/test_optimum_interop.py, Python 3.11, torch 2.13.0+cpu shared from the dev venv).
# optimum-onnx 0.1.0 is the newest release and wants optimum~=2.1.0 and transformers<4.58; transformers
# 4.57 needs huggingface_hub<1.0, and diffusers 0.40 and later need huggingface_hub>=1, so 0.39.0 is the
# newest diffusers that can sit beside it.
REQUIREMENTS = (
    "optimum-onnx==0.1.0",
    "optimum==2.1.0",
    "transformers==4.57.6",
    "diffusers==0.39.0",
    "onnxruntime==1.31.1",
)
# Everything pip installs into the optimum venv beside REQUIREMENTS (huggingface_hub 0.x, tokenizers,
# ...), pinned as constraints.txt pins the dev venv, so that a new release cannot change what the
# interop tests run. `python -m edgediff.bench.optimum_env --lock` (run by `./dev lock`) rewrites it.
LOCK = Path(__file__).with_name("optimum-constraints.txt")
# What must come from the optimum venv itself, not from the shared dev site-packages.
OWN = {"optimum": "optimum-onnx", "transformers": "transformers", "diffusers": "diffusers"}

# What pip prints when it cannot reach an index (urllib3 and socket errors, through pip's retry warnings).
_NETWORK_ERRORS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "No route to host", "Connection refused",
    "ConnectTimeoutError", "ReadTimeoutError", "Read timed out", "ProxyError", "Max retries exceeded",
    "connection broken by",
)
_NOT_FOUND = ("No matching distribution found", "Could not find a version that satisfies")


class OptimumEnvUnavailable(Exception):
    """The optimum venv could not be built because the package index is unreachable."""


def optimum_python(locked: bool = True) -> Path:
    """The optimum venv's python, after building the venv if it is missing or its stamp is stale.
    `locked=False` builds it from the newest releases REQUIREMENTS admit (for `lock`)."""
    shared = _shared_site_packages()
    stamp = json.dumps({
        "requirements": list(REQUIREMENTS),
        "lock": LOCK.read_text() if LOCK.is_file() else None,
        "python": sys.version,
        "shared": str(shared),
        # a change in the dev venv (another torch, numpy, ...) rebuilds: pip resolved against these
        "shared_packages": sorted(f"{d.metadata['Name']}=={d.version}"
                                  for d in importlib.metadata.distributions(path=[str(shared)])),
    }, indent=1)
    python = VENV / "bin" / "python"
    if locked and python.exists() and (VENV / STAMP).is_file() and (VENV / STAMP).read_text() == stamp:
        return python
    start = time.perf_counter()
    _build(python, shared, locked)
    if not locked:
        return python  # no stamp: the next locked use rebuilds from the lock
    (VENV / STAMP).write_text(stamp)  # last: an interrupted build is redone next time
    print(f"optimum_env: built {VENV} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return python


def subprocess_env() -> dict[str, str]:
    """Environment for the optimum venv's processes: nothing from the dev side's PYTHONPATH (it would
    come before the venv's own packages), and no network (local folders only)."""
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


def lock() -> Path:
    """Rebuild the venv from the newest releases and pin what pip put in it (its own site-packages,
    not the shared dev packages) into LOCK."""
    python = optimum_python(locked=False)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   "find its site-packages").stdout.strip()
    frozen = _run([str(python), "-m", "pip", "freeze", "--path", purelib], "list its packages").stdout
    LOCK.write_text("# The optimum venv's own packages (bench/optimum_env.py); written by `python -m "
                    "edgediff.bench.optimum_env --lock`, do not edit by hand.\n" + frozen)
    return LOCK


def _build(python: Path, shared: Path, locked: bool = True) -> None:
    if VENV.exists():
        shutil.rmtree(VENV)
    # The interpreter running the tests (the dev venv's) creates the venv: `-m venv` from inside a venv
    # uses the base Python, and the shared site-packages need the same Python version.
    _run([sys.executable, "-m", "venv", str(VENV)], "create the venv")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   "find its site-packages").stdout.strip()
    (Path(purelib) / "zz-edgediff-dev-venv.pth").write_text(f"{shared}\n")

    torch_version = importlib.metadata.version("torch")
    seen = _probe(python)
    if seen.get("torch") != [torch_version, str(shared)]:
        raise RuntimeError(f"{VENV} does not see the dev venv's torch {torch_version} in {shared} "
                           f"(it sees {seen.get('torch')}); refusing to let pip install one")

    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--retries", "2", "--timeout", "30", *REQUIREMENTS, f"torch=={torch_version}"]
    if locked and LOCK.is_file():
        cmd += ["-c", str(LOCK)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if any(m in output for m in _NOT_FOUND) and any(m in output for m in _NETWORK_ERRORS):
            first = next(line for line in output.splitlines() if any(m in line for m in _NETWORK_ERRORS))
            raise OptimumEnvUnavailable(f"cannot build {VENV}: the package index is unreachable "
                                        f"(pip: {first.strip()[:300]})")
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{_tail(output, 40)}")

    # What the tests rely on: the pinned versions, from the venv itself; torch still the shared one.
    seen = _probe(python)
    wanted = dict(r.split("==") for r in REQUIREMENTS)
    problems = []
    if seen.get("torch") != [torch_version, str(shared)]:
        problems.append(f"torch: {seen.get('torch')}, wanted {torch_version} from {shared}")
    for module, dist in OWN.items():
        version, where = seen.get(module) or (None, "")
        if version != wanted[dist] or not where.startswith(str(VENV.resolve())):
            problems.append(f"{module}: {version} from {where}, wanted {wanted[dist]} from {VENV}")
    if seen.get("onnxruntime", [None])[0] != wanted["onnxruntime"]:
        problems.append(f"onnxruntime: {seen.get('onnxruntime')}, wanted {wanted['onnxruntime']}")
    if problems:
        raise RuntimeError(f"{VENV} was built but is not what the tests need: " + "; ".join(problems))


_PROBE = """
import importlib.metadata as m, importlib.util as u, json, os
out = {}
# onnxruntime's module comes from one of several distributions (the CPU build, onnxruntime-gpu, ...)
for module, dists in (("torch", ("torch",)), ("optimum", ("optimum-onnx",)), ("transformers", ("transformers",)),
                      ("diffusers", ("diffusers",)), ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"))):
    spec = u.find_spec(module)
    if spec is None:
        continue
    # a package's __init__.py is two levels below site-packages; a namespace package's folder (optimum) one
    where = spec.origin or os.path.join(list(spec.submodule_search_locations)[0], "__init__.py")
    folder = os.path.dirname(os.path.dirname(os.path.realpath(where)))
    # the distribution in the same folder as the module (the first on sys.path)
    found = {d.metadata["Name"].lower(): d.version for d in m.distributions(path=[folder])}
    out[module] = [next((found[d] for d in dists if d in found), None), folder]
print(json.dumps(out))
"""


def _probe(python: Path) -> dict:
    """{module: [version, site-packages folder]} as the optimum venv's python sees them."""
    return json.loads(_run([str(python), "-c", _PROBE], "inspect the venv").stdout)


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    if proc.returncode != 0:
        raise RuntimeError(f"could not {what} ({' '.join(cmd)}):\n{_tail(proc.stdout + proc.stderr, 30)}")
    return proc


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


if __name__ == "__main__":  # python -m edgediff.bench.optimum_env [--lock]: build (or check) the venv
    print(lock() if sys.argv[1:] == ["--lock"] else optimum_python())
