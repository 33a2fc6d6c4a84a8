"""`edgediff serve`: AUTOMATIC1111's `/sdapi/v1` HTTP API, for the desktop apps that speak it (Photoshop
and GIMP plugins, openOutpaint, the `webuiapi` client), and a one-page UI at `/`.

    edgediff serve --model builtin                 # http://127.0.0.1:7861/
    edgediff serve --model sd15-onnx --models-dir models --lora-dir loras --host 0.0.0.0 --api-auth me:secret

Safe by default: it listens on 127.0.0.1 only; another address needs --api-auth (HTTP Basic, as
A1111's) or an explicit --insecure. Request bodies, sizes, steps and batches are bounded
(edgediff.a1111.Limits), and model and LoRA names resolve only inside the configured folders.

This module imports argparse and the standard library only: FastAPI and uvicorn (the `serve` extra)
are imported when the server starts, so `edgediff --help` works without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from ..engine.errors import EdgediffError

log = logging.getLogger("edgediff")

DEFAULT_PORT = 7861  # A1111's port with --nowebui (its API alone): what desktop plugins try first


def add_arguments(parser: argparse.ArgumentParser, backends: str) -> None:
    parser.add_argument("--model", required=True,
                        help="an exported folder, or any export source (exported once into the cache): "
                             "`builtin`, a diffusers folder, a .safetensors file, a hub id")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default: %(default)s, this machine only); another needs "
                             "--api-auth or --insecure")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS...]",
                        help="require HTTP Basic credentials on every request, as A1111's --api-auth")
    parser.add_argument("--insecure", action="store_true",
                        help="listen on a non-loopback --host without --api-auth: anyone who reaches the port "
                             "can generate")
    parser.add_argument("--models-dir", default=None, metavar="DIR",
                        help="a folder of exported models (one sub-folder each): what /sdapi/v1/sd-models lists "
                             "and `sd_model_checkpoint` may switch to")
    parser.add_argument("--lora-dir", default=None, metavar="DIR",
                        help="the LoRA folder: what /sdapi/v1/loras lists and a prompt's <lora:name:weight> finds")
    parser.add_argument("--backend", default="auto", help=backends)
    parser.add_argument("--budget", default=None,
                        help="memory budget, e.g. 4GB (default: 7GB, capped by free memory)")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="do not run the model's safety checker (which blacks out flagged images)")


def parse_auth(text: str | None) -> dict[str, str] | None:
    """A1111's --api-auth: "user:pass", several separated by commas; a password may hold colons."""
    if text is None:
        return None
    credentials = {}
    for pair in text.split(","):
        user, colon, password = pair.strip().partition(":")
        if not colon or not user or not password:
            raise EdgediffError(f"--api-auth {pair.strip()!r} is not USER:PASSWORD; write it like me:secret")
        credentials[user] = password
    return credentials


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_host(host: str, credentials, insecure: bool) -> None:
    if is_loopback(host):
        return
    if credentials is None and not insecure:
        raise EdgediffError(f"--host {host} lets other machines generate: add --api-auth USER:PASS, or --insecure "
                            "if the network is yours alone")
    if credentials is None:
        log.warning("listening on %s with no --api-auth: anyone who reaches the port can generate", host)


def run(args) -> None:
    """The `edgediff serve` command: check everything cheap, open the model, serve until stopped."""
    credentials = parse_auth(args.api_auth)
    check_host(args.host, credentials, args.insecure)
    if not 0 < args.port < 65536:
        raise EdgediffError(f"--port {args.port} is not a port; give one from 1 to 65535")
    for flag, folder in (("--models-dir", args.models_dir), ("--lora-dir", args.lora_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise EdgediffError(f"{flag} {folder} is not a folder")
    try:
        import uvicorn

        from .app import Settings, create_app
    except ImportError:
        raise EdgediffError("edgediff serve needs FastAPI: pip install 'edgediff[serve]'") from None
    from ..engine.pipeline import Pipeline
    from .catalog import Catalog, Checkpoint
    from .worker import Worker

    def open_model(path):
        return Pipeline.from_pretrained(path, backend=args.backend, safety_checker=not args.no_safety_checker,
                                        memory_budget=args.budget, lora_dir=args.lora_dir)

    pipe = open_model(args.model)
    first = Checkpoint.of_folder(pipe.model.path, pipe.model.name)
    lora_dir = Path(args.lora_dir) if args.lora_dir else None
    catalog = Catalog(first, Path(args.models_dir) if args.models_dir else None, lora_dir)
    worker = Worker(catalog, open_model, pipe, first)
    app = create_app(worker, catalog, Settings(credentials=credentials))
    verbose = logging.getLogger("edgediff").isEnabledFor(logging.DEBUG)
    log.info("serving %s on http://%s:%d/ (backend %s; AUTOMATIC1111's API under /sdapi/v1)", first.title,
             args.host if ":" not in args.host else f"[{args.host}]", args.port, pipe.device.backend)
    try:
        # a generation in flight when the server is stopped gets a few seconds, then is cut off
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if verbose else "warning",
                    access_log=verbose, timeout_graceful_shutdown=3)
    finally:
        worker.close()
