"""The one thread that owns the Pipeline. Generations and model switches run one at a time, in the
order they came, as A1111's queue lock runs them; the HTTP side only queues tasks and reads the state.

`interrupt` stops the running generation at its next step and `skip` its current batch (one of
n_iter): the pipeline's callback returns False, which cancels the call. A client that goes away
abandons its task: dropped if it is still queued, cancelled at the next step if it runs.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from .. import a1111
from ..engine.errors import first_line
from .catalog import Catalog, Checkpoint

log = logging.getLogger("edgediff")

# A1111's show_progress_every_n_steps: a preview for /progress every this many steps (0: none). Previews
# are the tiny autoencoder's decode where the export has one, else a latent-to-RGB projection.
PREVIEW_EVERY = 5


@dataclass
class Outcome:
    """What a generation made, ready for A1111's answer."""

    images: list[str]  # base64 PNGs with their `parameters` chunk
    info: str  # A1111's info: a JSON string


class Task:
    def __init__(self, run: Callable[["Task"], object], what: str):
        self.run = run
        self.what = what  # "txt2img", "img2img", "switch"
        self.future: Future = Future()
        self.abandoned = threading.Event()  # the client went away

    def abandon(self) -> None:
        self.abandoned.set()


@dataclass
class State:
    """A1111's shared.state, as /progress shows it."""

    job: str = ""
    job_count: int = 0  # n_iter of the running generation; 0 when idle
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    started: float = 0.0  # time.time() of the generation's start
    job_timestamp: str = ""
    preview: Image.Image | None = field(default=None, repr=False)


class Worker:
    def __init__(self, catalog: Catalog, open_model: Callable[[Path], object], pipe, current: Checkpoint):
        self.catalog = catalog
        self.open_model = open_model  # Path -> Pipeline
        self.pipe = pipe
        self.current = current
        self.preview_every = PREVIEW_EVERY
        self._queue: queue.Queue[Task | None] = queue.Queue()
        self._lock = threading.Lock()  # guards state, read by /progress from the event loop
        self.state = State()
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgediff-serve-worker", daemon=True)
        self._thread.start()

    # -- what the HTTP side calls ---------------------------------------------------------------------

    def generate(self, job: a1111.Job) -> Task:
        return self._put(Task(lambda task: self._generate(job, task), job.mode))

    def switch(self, checkpoint: Checkpoint) -> Task:
        return self._put(Task(lambda task: self._load(checkpoint), "switch"))

    def interrupt(self) -> None:
        """Stop the running generation at its next step (A1111: what is queued still runs)."""
        with self._lock:
            if self.state.job_count:
                self.state.interrupted = True
                self._interrupt.set()

    def skip(self) -> None:
        """Drop the running generation's current batch and go on with its next one."""
        with self._lock:
            if self.state.job_count:
                self.state.skipped = True
                self._skip.set()

    def progress(self, with_image: bool) -> dict:
        """A1111's /sdapi/v1/progress answer, with its formula: 0.01 as soon as a job runs, then the share
        of batches done plus the running one's share of steps."""
        with self._lock:
            s = self.state
            state = {"skipped": s.skipped, "interrupted": s.interrupted, "stopping_generation": False,
                     "job": s.job, "job_count": s.job_count, "job_timestamp": s.job_timestamp, "job_no": s.job_no,
                     "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps,
                     "queued": self._queue.qsize()}
            if not s.job_count:
                return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
            progress = 0.01 + s.job_no / s.job_count
            if s.sampling_steps:
                progress += s.sampling_step / s.sampling_steps / s.job_count
            elapsed = time.time() - s.started
            preview = s.preview if with_image else None
        image = a1111.encode_png(preview) if preview is not None else None
        return {"progress": min(progress, 1.0), "eta_relative": elapsed / progress - elapsed, "state": state,
                "current_image": image, "textinfo": None}

    def close(self) -> None:
        """Stop after the running task (interrupted), dropping what is queued."""
        self.interrupt()
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.future.cancel()
        self._queue.put(None)

    # -- the worker thread ----------------------------------------------------------------------------

    def _put(self, task: Task) -> Task:
        self._queue.put(task)
        return task

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            if task.abandoned.is_set() or not task.future.set_running_or_notify_cancel():
                continue  # its client went away while it waited
            try:
                task.future.set_result(task.run(task))
            except BaseException as e:  # handed to the request that waits for it, which answers it
                if not isinstance(e, Exception):
                    raise
                log.debug("%s failed: %s", task.what, first_line(e), exc_info=True)
                task.future.set_exception(e)
            finally:
                gc.collect()

    def _generate(self, job: a1111.Job, task: Task) -> Outcome:
        previous = self.current
        if job.model is not None:
            self._load(self.catalog.find(job.model))
        self._begin(job)
        images, parameters, interrupted, skipped = [], [], False, 0
        try:
            for i, kwargs in enumerate(job.runs()):
                with self._lock:
                    self.state.job_no, self.state.sampling_step, self.state.skipped = i, 0, False
                    self._skip.clear()
                extra = {"preview_every": self.preview_every} if self.preview_every else {}
                result = self.pipe(**kwargs, callback=self._callback(task), **extra)
                if result.cancelled:
                    if self._interrupt.is_set() or task.abandoned.is_set():
                        interrupted = True
                        break
                    skipped += 1
                    continue
                parameters += result.parameters
                finished = job.finish(result.images)
                if job.send_images:
                    images += [a1111.encode_png(image, p.a1111()) for image, p in zip(finished, result.parameters)]
            info = a1111.info(job, parameters, self.current.name, self.current.hash, interrupted, skipped)
        finally:
            self._end()
            if job.model is not None and job.restore_model and self.current != previous:
                self._load(previous)
        return Outcome(images, info)

    def _callback(self, task: Task):
        def callback(step, total, latents, previews=None):
            with self._lock:
                self.state.sampling_step, self.state.sampling_steps = step + 1, total
                if previews:
                    self.state.preview = previews[0]  # the batch's first image, as A1111's live preview
            return not (self._interrupt.is_set() or self._skip.is_set() or task.abandoned.is_set())
        return callback

    def _begin(self, job: a1111.Job) -> None:
        with self._lock:
            self._interrupt.clear()
            self._skip.clear()
            self.state = State(job=job.mode, job_count=job.n_iter, started=time.time(),
                               job_timestamp=time.strftime("%Y%m%d%H%M%S"))

    def _end(self) -> None:
        with self._lock:
            self.state = State(interrupted=self.state.interrupted, skipped=self.state.skipped)
            self._interrupt.clear()
            self._skip.clear()

    def _load(self, checkpoint: Checkpoint) -> Checkpoint:
        """Make `checkpoint` the loaded model. The old one is freed first (two models at once may not fit
        the memory one was planned for); if the new one does not open, the old one comes back."""
        if checkpoint.path == self.current.path:
            self.current = checkpoint
            return checkpoint
        log.info("loading %s", checkpoint.title)
        previous, self.pipe = self.current, None
        gc.collect()
        try:
            self.pipe = self.open_model(checkpoint.path)
        except Exception:
            self.pipe = self.open_model(previous.path)
            raise
        self.current = checkpoint
        return checkpoint
