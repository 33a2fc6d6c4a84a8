"""The optimum venv of the interop tests: moved to edgediff/bench/optimum_env.py (the benchmark's optimum
peer builds and uses the same venv); this name stays for tests/test_optimum_interop.py.

    python tests/optimum_env.py   # build (or check) the venv and print its python
"""

from edgediff.bench.optimum_env import (REPO, REQUIREMENTS, VENV, OptimumEnvUnavailable,  # noqa: F401
                                        optimum_python, subprocess_env)

if __name__ == "__main__":
    print(optimum_python())
