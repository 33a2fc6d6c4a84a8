"""The FastAPI app: AUTOMATIC1111's /sdapi/v1 routes over a Worker, and the one-page UI at `/`.

Every request passes the Guard first (HTTP Basic when --api-auth is set, the body's size bound, and
the last word on anything unexpected), then the route, which checks its body with edgediff.a1111 and
queues the work. Errors are one line in {"error": kind, "detail": message}: 4xx for a request edgediff
cannot honour, 500 for a bug, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from secrets import compare_digest

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from .. import a1111
from ..engine import arguments as arg
from ..engine.errors import EdgediffError, EdgediffTypeError, first_line
from .catalog import Catalog, NotFound
from .worker import Worker

log = logging.getLogger("edgediff")

STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 0.5  # how often a waiting request looks whether its client is still there


@dataclass(frozen=True)
class Settings:
    limits: a1111.Limits = a1111.Limits()
    credentials: dict[str, str] | None = None  # --api-auth: user -> password; None: no auth


def create_app(worker: Worker, catalog: Catalog, settings: Settings = Settings()) -> FastAPI:
    app = FastAPI(title="edgediff", description="AUTOMATIC1111's /sdapi/v1 API on edgediff", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, limit=settings.limits.max_body_bytes, credentials=settings.credentials)
    limits = settings.limits

    @app.exception_handler(EdgediffError)
    async def refused(request: Request, e: EdgediffError):
        return _error(404 if isinstance(e, NotFound) else 422, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        try:
            kind = HTTPStatus(e.status_code).phrase
        except ValueError:  # 499: nginx's "client closed request", which nobody reads
            kind = "Client Closed Request"
        return JSONResponse({"error": kind, "detail": e.detail}, status_code=e.status_code, headers=e.headers)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def generate(request: Request, make_job) -> dict:
        # off the event loop: decoding, filling and blurring a large init image takes a while, and
        # /progress polls must not wait for it
        job = await asyncio.to_thread(make_job, await _body(request), limits)
        if job.model is not None:
            catalog.find(job.model)  # an unknown name is refused now, not after the queue
        task = worker.generate(job)
        outcome = await _wait(task, request)
        return {"images": outcome.images, "parameters": job.parameters, "info": outcome.info}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, a1111.txt2img_job)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, a1111.img2img_job)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return worker.progress(with_image=not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        worker.skip()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": worker.current.title, "sd_checkpoint_hash": worker.current.sha256,
                "show_progress_every_n_steps": worker.preview_every,
                "live_previews_enable": worker.preview_every > 0, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await _body(request)
        if not isinstance(body, dict):
            raise EdgediffTypeError("the options must be a JSON object of settings, such as "
                                    "{\"sd_model_checkpoint\": \"name\"}")
        every = body.get("show_progress_every_n_steps")
        if every is not None:  # checked before the model switch, so a bad value changes nothing
            every = arg.whole("show_progress_every_n_steps", every, 0, limits.max_steps, " (0: no previews)")
        name = body.get("sd_model_checkpoint")
        if name is not None:
            if not isinstance(name, str) or not name.strip():
                raise EdgediffTypeError("sd_model_checkpoint must be a model's title from /sdapi/v1/sd-models")
            await _wait(worker.switch(catalog.find(name)), request)
        if every is not None:
            worker.preview_every = every
        ignored = [k for k in body if k not in ("sd_model_checkpoint", "show_progress_every_n_steps")]
        if ignored:
            log.info("options ignored: %s", ", ".join(ignored))
        return {"ignored": ignored}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [c.item() for c in catalog.checkpoints()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return {}  # the list is read afresh on every request

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/loras")
    async def loras():
        return catalog.loras()

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        body = await _body(request)
        if not isinstance(body, dict) or "image" not in body:
            raise EdgediffError("png-info takes {\"image\": \"<base64 PNG>\"}")
        image = a1111.decode_image(body["image"], "image")
        text = image.info.get("parameters")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        if not isinstance(text, str):
            return {"info": "", "items": items, "parameters": {}}
        return {"info": text, "items": items, "parameters": a1111.read_parameters(text)}

    return app


async def _body(request: Request):
    """The request's JSON, or one line saying where it is malformed (the Guard bounds its size)."""
    data = await request.body()
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise HTTPException(400, "the body is not UTF-8 text; send JSON") from None
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column "
                                 f"{e.colno}") from None


async def _wait(task, request: Request):
    """The task's result, looking every POLL_SECONDS whether the client is still there: one that went
    away abandons its task (dropped from the queue, or cancelled at its next step)."""
    future = asyncio.wrap_future(task.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=POLL_SECONDS)
        if done:
            return future.result()
        if await request.is_disconnected():
            task.abandon()
            log.info("a client went away; its %s is abandoned", task.what)
            raise HTTPException(499, "the client went away")


def _error(status: int, e: BaseException, kind: str | None = None) -> JSONResponse:
    return JSONResponse({"error": kind or type(e).__name__, "detail": first_line(e)}, status_code=status)


class BodyTooLarge(HTTPException):
    pass


class Guard:
    """Pure ASGI, around the whole app: HTTP Basic (as A1111's --api-auth), the body's size bound (its
    Content-Length, then the bytes actually read), and a one-line 500 for anything the routes did not
    answer. A body over the bound is answered 413 at once and read no further."""

    def __init__(self, app, limit: int, credentials: dict[str, str] | None):
        self.app, self.limit, self.credentials = app, limit, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.credentials is not None and not self._authorised(headers.get("authorization", "")):
            refusal = {"error": HTTPStatus(401).phrase,
                       "detail": "this server needs a user name and password (HTTP Basic, --api-auth)"}
            return await _send(send, 401, refusal, [(b"www-authenticate", b"Basic")])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send(send, 413, self._too_large(length))
        started = False
        read = 0

        async def bounded():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.limit:
                    raise BodyTooLarge(413, self._too_large(None)["detail"])
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded, watched)
        except Exception as e:  # a bug: one line to the client and the log, the traceback with --debug
            where = f"{scope.get('method')} {scope.get('path')}"
            log.error("%s: unexpected %s: %s", where, type(e).__name__, first_line(e))
            log.debug("traceback", exc_info=True)
            if not started:
                detail = f"{type(e).__name__}: {first_line(e)} (the server's log has more)"
                await _send(send, 500, {"error": "internal error", "detail": detail})

    def _authorised(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        expected = self.credentials.get(user)
        # compare_digest on the bytes: the time taken says nothing about how much of the password matched
        return expected is not None and compare_digest(password.encode(), expected.encode())

    def _too_large(self, length) -> dict:
        size = f" of {int(length) / 2**20:.1f} MB" if length and length.isdigit() else ""
        return {"error": HTTPStatus(413).phrase, "detail": f"the request body{size} is over this server's "
                f"{self.limit / 2**20:.0f} MB limit; send smaller images"}


async def _send(send, status: int, content: dict, headers: list | None = None) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
