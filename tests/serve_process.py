"""A real `edgediff serve` process on a free local port, for the tests that talk to one: tests/test_serve.py
(its API through httpx) and tests/test_serve_ui.py (its page through Chromium, its API through urllib)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import cached_property
from pathlib import Path

import pytest

START_SECONDS = 120  # a generous bound for the process to answer; a fresh CI machine is slow to import
LOG_TAIL = 3000  # characters of the server's log that a failure shows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    """`edgediff serve ARGS` through this interpreter: the venv's bin/ need not be on PATH."""
    return [sys.executable, "-m", "edgediff.cli", "serve", *args]


class ServeProcess:
    """`edgediff serve ARGS` (--model, --api-auth, --models-dir, ...) on a free port of 127.0.0.1, its
    output in `folder`/serve-PORT.log. Starting does not wait for it, so a test can start something else
    meanwhile; wait() does, and fails the test with the log's tail when the process exits or does not
    answer in time. stop() ends it, whether it answered or not.

    `url` ends with "/"; `client` is an httpx client for it with `auth`, the credentials for --api-auth."""

    def __init__(self, folder: Path, *args: str, auth: tuple[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = Path(folder) / f"serve-{self.port}.log"
        self.auth = auth
        self.up = False
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log has everything up to a failure
        command = serve_command(*args, "--host", "127.0.0.1", "--port", str(self.port))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = START_SECONDS) -> str:
        """The server's URL, once it answers (at once after the first time)."""
        deadline = time.monotonic() + timeout
        while not self.up:
            if self.proc.poll() is not None:
                pytest.fail(f"edgediff serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "sdapi/v1/progress", timeout=2) as r:
                    self.up = r.status == 200
            except urllib.error.HTTPError as e:
                e.close()
                self.up = e.code == 401  # up, and asking for --api-auth's credentials
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if self.up:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"edgediff serve did not answer {self.url} within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self.url

    @cached_property
    def client(self):
        """An httpx client for the server's API (closed by stop())."""
        import httpx

        return httpx.Client(base_url=self.url, timeout=120, auth=self.auth)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-LOG_TAIL:]

    def stop(self) -> None:
        if "client" in self.__dict__:
            self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
