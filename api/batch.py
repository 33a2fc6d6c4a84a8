"""`edgediff batch PROMPTS.jsonl --model M --out DIR [--ray auto|ADDRESS]`: many txt2img requests, resumable.

PROMPTS.jsonl holds one JSON object per line with the fields of AUTOMATIC1111's `/sdapi/v1/txt2img` body,
read by edgediff/a1111.py as `edgediff serve` reads them. Blank lines are skipped; line numbers count them.

1. Every line is read and checked before anything loads: a typo on line 19 costs nothing, not 18 images.
2. Each line becomes its `n_iter` pipeline calls of `batch_size` images, each call's seed settled here:
   a line's own seed, or, for a line without one (or -1), `--seed` + its line number - 1, so that a run,
   its resume and a Ray run make the same images. Image k of a line has the line's seed + k, as in
   AUTOMATIC1111.
3. DIR/index.jsonl, one line per finished image, says what is done; a second run skips it.
4. The calls run in this process, or on a Ray cluster (edgediff/fleet.py). Either way each image comes
   back here as the same row (`generate`), and only this process writes: the PNG first (a temporary name,
   then renamed: a killed run leaves no half-written PNG, and the next run sweeps its temporary), then its
   index line, flushed. A PNG without an index line is made again; an index line is never written for an
   image that is not on disk.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .engine.errors import EdgediffError, first_line

log = logging.getLogger("edgediff")

INDEX = "index.jsonl"
MAX_LISTED = 5  # bad lines named in the error beyond the first


def add_arguments(p, backends_help: str) -> None:
    p.add_argument("prompts", metavar="PROMPTS.jsonl",
                   help="one JSON object per line, with the fields of AUTOMATIC1111's /sdapi/v1/txt2img body")
    p.add_argument("--model", required=True, help="an exported folder, or any export source (on every node "
                                                  "with --ray: `builtin` and hub ids export there)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder for the PNGs and index.jsonl; "
                                                              "run again into it to resume")
    p.add_argument("--seed", type=int, default=0,
                   help="lines without a seed (or -1) get this + their line number - 1 (default: %(default)s)")
    p.add_argument("--backend", default="auto", help=backends_help + " (with --ray: on each node)")
    p.add_argument("--budget", default=None, help="memory budget per pipeline, e.g. 4GB (default: the planner's)")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where the prompts' <lora:name:weight> tags are found (with --ray: on each node)")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run on a Ray cluster: auto connects to the running one or starts a local one")
    p.add_argument("--actors", type=int, default=None,
                   help="--ray: pipelines in the actor pool (default: one per node of the cluster)")


@dataclass(frozen=True)
class Call:
    """One pipeline call: `images` pictures of one line, the line's images `first` ... `first + images - 1`."""

    line: int  # in PROMPTS, from 1
    first: int  # the line's image number of the call's first image, from 0
    images: int  # A1111's batch_size
    kwargs: dict  # Pipeline.__call__'s arguments, the seed settled
    request: dict  # the line's JSON object, as written: the index keeps it

    def seed(self, k: int) -> int:
        """The seed of the line's image k (the pipeline's rule: the call's seed + the image's place)."""
        from .engine.noise import MAX_SEED

        return (self.kwargs["seed"] + k - self.first) % (MAX_SEED + 1)


def run(args) -> None:
    from .engine import arguments as arg
    from .engine.files import check_out, sweep_partials
    from .engine.plan import parse_budget

    # 1. Everything the user typed, every line of the file included, before anything slow starts.
    if args.ray is not None:
        from . import fleet

        fleet.need_ray()
    if args.actors is not None:
        arg.whole("--actors", args.actors, 1, None)
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise EdgediffError(f"--lora-dir {args.lora_dir} is not a folder")
    parse_budget(args.budget)
    calls = read_prompts(Path(args.prompts), args.seed)
    out = Path(args.out)
    check_out(out, force=True, folder=True)  # a folder, writable; what it holds is resumed, never replaced
    out.mkdir(parents=True, exist_ok=True)
    sweep_partials(out)  # what a killed run was writing

    # 2. What is done already.
    index = Index(out / INDEX)
    done = index.finished(calls, Path(args.prompts))
    todo = [c for c in calls if any((c.line, k) not in done for k in range(c.first, c.first + c.images))]
    total = sum(c.images for c in calls)
    if not todo:
        print(f"all {total} images of {args.prompts} are in {index.path} already")
        return
    if done:
        print(f"resuming: {len(done)} of {total} images are done, {len(calls) - len(todo)} of {len(calls)} "
              "calls skipped")

    # 3. Generate, here or on the cluster; write each image as it comes.
    options = dict(backend=args.backend, memory_budget=args.budget, lora_dir=args.lora_dir)
    from tqdm import tqdm

    with tqdm(total=total, initial=len(done), unit="image", desc="batch") as bar:
        if args.ray is None:
            rows = in_process(todo, args.model, options)
            _write(rows, calls, done, out, index, bar, Path(args.prompts))
        else:
            from . import fleet

            with fleet.cluster(args.ray) as ray:
                rows = fleet.generate_on(ray, todo, args.model, options, args.actors)
                _write(rows, calls, done, out, index, bar, Path(args.prompts))
    print(f"wrote {total - len(done)} images into {out}; {index.path} lists all {total}")


def read_prompts(path: Path, seed_base: int) -> list[Call]:
    """The calls of every line of `path`, or one error naming each bad line (the first with its problem)."""
    from .a1111 import txt2img_job
    from .engine import arguments as arg
    from .engine.noise import MAX_SEED

    seed_base = arg.whole("--seed", seed_base, 0, MAX_SEED)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgediffError(f"no prompts file {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgediffError(f"cannot read {path}: {first_line(e)}") from None
    calls, bad, ignored = [], [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            if not isinstance(body, dict):
                raise EdgediffError(f"a JSON object of txt2img fields is expected, not a {type(body).__name__}")
            seed = body.get("seed", -1)
            # a line without a seed gets one from its place, so that a resumed or a Ray run makes its image
            # again (txt2img_job would draw a random one)
            job = txt2img_job(body if seed not in (None, -1) else
                              {**body, "seed": (seed_base + number - 1) % (MAX_SEED + 1)})
            if job.model is not None:
                raise EdgediffError(f"override_settings.sd_model_checkpoint {job.model!r}: a batch runs one "
                                    "--model; leave it out, or run one batch per model")
        except json.JSONDecodeError as e:
            bad.append((number, f"not JSON ({e.msg} at column {e.colno})"))
            continue
        except EdgediffError as e:
            bad.append((number, str(e)))
            continue
        if job.ignored:
            ignored[number] = job.ignored
        images = job.kwargs["num_images_per_prompt"]
        calls += [Call(number, i * images, images, kwargs, body) for i, kwargs in enumerate(job.runs())]
    if bad:
        (number, problem), rest = bad[0], bad[1:]
        more = "" if not rest else f" (and {len(rest)} more bad line(s): " + ", ".join(
            str(n) for n, _ in rest[:MAX_LISTED]) + (", ..." if len(rest) > MAX_LISTED else "") + ")"
        raise EdgediffError(f"{path} line {number}: {problem}{more}; nothing was generated")
    if ignored:  # said, never dropped silently (as `edgediff serve` says it in `info`)
        log.warning("fields edgediff does not act on, ignored: " + "; ".join(
            f"line {n}: {', '.join(fields)}" for n, fields in list(ignored.items())[:MAX_LISTED])
            + ("; ..." if len(ignored) > MAX_LISTED else ""))
    if not calls:
        raise EdgediffError(f"{path} holds no prompts (one JSON object per line, e.g. "
                            '{"prompt": "a red circle", "steps": 20})')
    return calls


def in_process(calls: list[Call], model: str, options: dict) -> Iterator[dict]:
    from .engine.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, **options)
    for call in calls:
        yield from generate(pipe, call)


def generate(pipe, call: Call) -> list[dict]:
    """One call's images as rows, the same in this process and in a Ray actor: the pixels (H, W, 3 uint8)
    and what the index records. A request the pipeline refuses is a row with `error` set."""
    import numpy as np

    device, host = f"{pipe.device.backend} ({pipe.device.name})", socket.gethostname()
    try:
        result = pipe(**call.kwargs)
    except EdgediffError as e:
        return [failure(call, str(e))]
    return [dict(line=call.line, image=call.first + k, seed=params.seed, parameters=params.a1111(),
                 timings=json.dumps({name: round(s, 4) for name, s in result.timings.items()}),
                 device=device, host=host, error="", pixels=np.asarray(image.convert("RGB")))
            for k, (image, params) in enumerate(zip(result.images, result.parameters))]


def failure(call: Call, error: str, line: int | None = None) -> dict:
    """The row of a call that failed: `error` says why, for the line `line` (0: for none; the pipeline
    itself could not open). Every column is there, so that Ray Data's rows keep one schema."""
    import numpy as np

    return dict(line=call.line if line is None else line, image=call.first, seed=-1, parameters="",
                timings="{}", device="", host=socket.gethostname(), error=error,
                pixels=np.zeros((1, 1, 3), np.uint8))


def call_item(call: Call) -> dict:
    """A call as Ray Data carries it: columns of plain types (the arguments pickled). Only this
    command's own Ray actors unpickle it (fleet.Generator), as Ray itself unpickles every task argument;
    nothing read from a file or a request is ever unpickled."""
    return {"call": pickle.dumps(call)}


def image_name(line: int, image: int) -> str:
    return f"{line:05d}-{image + 1}.png"


def _write(rows, calls: list[Call], done: dict, out: Path, index: "Index", bar, prompts: Path) -> None:
    from PIL import Image

    from .engine.images import save_png

    by_place = {(c.line, k): c for c in calls for k in range(c.first, c.first + c.images)}
    with index.appending() as append:
        for row in rows:
            line, image = int(row["line"]), int(row["image"])
            if row["error"] and not line:  # a node whose pipeline could not open
                raise EdgediffError(row["error"])
            if row["error"]:  # a request only the model could refuse (e.g. a size it cannot take)
                raise EdgediffError(f"{prompts} line {line}: {row['error']}; the images before it are kept: "
                                    "fix the line and run again to resume")
            if (line, image) in done:  # a call of several images, some of which a killed run had finished
                continue
            name = image_name(line, image)
            save_png(Image.fromarray(row["pixels"]), out / name, row["parameters"])
            append({"line": line, "image": image + 1, "file": name, "seed": int(row["seed"]),
                    "parameters": row["parameters"], "timings": json.loads(row["timings"]),
                    "device": row["device"], "host": row["host"], "request": by_place[(line, image)].request})
            bar.update(1)


class Index:
    """DIR/index.jsonl: one JSON line per image on disk, appended after its PNG is in place."""

    def __init__(self, path: Path):
        self.path = path

    def finished(self, calls: list[Call], prompts: Path) -> dict[tuple[int, int], dict]:
        """(line, image from 0) -> index entry, for the images that are done: listed, and their PNG on disk.
        An index written for other prompts or another --seed is refused rather than mixed in."""
        entries = self._read()
        by_place = {(c.line, k): c for c in calls for k in range(c.first, c.first + c.images)}
        done = {}
        for entry in entries:
            place = (entry["line"], entry["image"] - 1)
            call = by_place.get(place)
            if call is None or call.request != entry.get("request") or call.seed(place[1]) != entry["seed"]:
                raise EdgediffError(
                    f"{self.path} lists image {entry['image']} of line {entry['line']} with another request or "
                    f"seed than {prompts} and --seed give now: resume with the same prompts and --seed, or "
                    "choose another --out")
            if (self.path.parent / entry["file"]).is_file():
                done[place] = entry
        if len(done) < len(entries):  # PNGs deleted since: their lines go, so that the index lists what is there
            self._rewrite(done.values())
        return done

    def _read(self) -> list[dict]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        complete, _, torn = data.rpartition(b"\n")
        if torn:  # a line a killed run began: its image is made again
            with open(self.path, "r+b") as f:
                f.truncate(len(complete) + 1 if complete else 0)
        entries = []
        for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), start=1):
            try:
                entry = json.loads(line)
                int(entry["line"]), int(entry["image"]), str(entry["file"]), int(entry["seed"])
            except (ValueError, KeyError, TypeError):
                raise EdgediffError(f"{self.path} line {number} is not an edgediff index line; choose another "
                                    "--out, or delete the index to make every image again") from None
            entries.append(entry)
        return entries

    def _rewrite(self, entries) -> None:
        from .engine.files import partial_prefix

        tmp = self.path.with_name(partial_prefix(self.path.name) + "rewrite")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        os.replace(tmp, self.path)

    @contextmanager
    def appending(self):
        """A function that appends one entry, flushed and synced: the line outlives a crash of the
        machine, as its PNG does."""
        with open(self.path, "a", encoding="utf-8") as f:
            def append(entry: dict) -> None:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
            yield append
