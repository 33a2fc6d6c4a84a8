"""Ray, for `edgediff batch --ray` and `edgediff bench --ray`: connecting, an actor pool, a task on each node.

Imported only when --ray is given: Ray is the `[ray]` extra, and nothing else of edgediff needs it.
`--ray auto` is `ray.init()`: it connects to the cluster this machine belongs to, or starts a local one;
any other value is the address of a running cluster's head (`ray.init(address=...)`).

Every node needs edgediff installed (`pip install 'edgediff[ray]'`) and the model: an exported folder at
the same path, or a source each node exports into its own cache (`builtin`, a hub id). Each actor opens
its pipeline on its own node, so the planner sees that node's device and free memory: a GPU node and a
CPU node of one cluster each run their own plan. Ray places actors by CPU count only (num_gpus=0; Ray
2.x leaves CUDA_VISIBLE_DEVICES alone for them), so the backend each one picks is the pipeline's choice.
"""

from __future__ import annotations

import logging
import pickle
import socket
from contextlib import contextmanager
from typing import Callable, Iterator

from .engine.errors import EdgediffError, first_line, quiet


def need_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] part of the extra)
    except ImportError:
        raise EdgediffError("--ray needs Ray: pip install 'edgediff[ray]'") from None
    return ray


@contextmanager
def cluster(address: str):
    """Ray, connected to `address` (or `auto`) for the block; disconnected after, and a local cluster this
    started is stopped. Already connected (a test, a notebook): used as it is, and left so."""
    ray = need_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "auto" else address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            raise EdgediffError(f"--ray {address}: no Ray cluster answers there ({first_line(e)}); start one "
                                "with `ray start --head`, or use --ray auto") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def alive_nodes(ray) -> list[dict]:
    """The cluster's live nodes, the head first (its results are the reference a fleet bench compares to)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeManagerAddress"]))


def node_name(node: dict) -> str:
    return f"{node['NodeManagerHostname']} ({node['NodeManagerAddress']})"


class Generator:
    """An actor of the pool. Its pipeline opens once, here, on the actor's node: the plan is that node's."""

    def __init__(self, model: str, options: dict):
        from .engine.pipeline import Pipeline

        self.pipe, self.failed = None, None
        try:
            self.pipe = Pipeline.from_pretrained(model, **options)
        except EdgediffError as e:  # told back as a row, to say in one line (Ray would print a traceback)
            self.failed = f"{socket.gethostname()} cannot open {model}: {e}"

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .batch import failure, generate

        calls = [pickle.loads(blob) for blob in batch["call"]]
        rows = [failure(call, self.failed, line=0) for call in calls] if self.failed else \
            [row for call in calls for row in generate(self.pipe, call)]
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        columns["pixels"] = np.stack(columns["pixels"])  # (images, H, W, 3): one call's images share a size
        return columns


def generate_on(ray, calls: list, model: str, options: dict, actors: int | None) -> Iterator[dict]:
    """The rows of `calls` (batch.generate's), made by a pool of Generator actors through Ray Data, as
    they finish. Ray Data spreads the pool's actors over the nodes (its default scheduling, SPREAD)."""
    import ray.data

    from .batch import call_item

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the batch's own bar counts images
    context.print_on_execution_start = False
    workers = [n for n in alive_nodes(ray) if n["Resources"].get("CPU", 0) >= 1]
    if not workers:
        raise EdgediffError("the Ray cluster has no node with a CPU to run a pipeline on")
    # One call per block, and one in flight per actor: an actor that finishes takes the next call, so a
    # fast node does more of them (a call costs seconds; a block's overhead, milliseconds).
    items = ray.data.from_items([call_item(c) for c in calls], override_num_blocks=len(calls))
    pool = ray.data.ActorPoolStrategy(size=actors or len(workers), max_tasks_in_flight_per_actor=1)
    done = items.map_batches(Generator, fn_constructor_kwargs=dict(model=model, options=options), compute=pool,
                             batch_size=1, batch_format="numpy", num_cpus=1)
    with quiet("ray.data"):  # its notes on progress bars and execution times, beside the batch's bar
        yield from done.iter_rows()


def on_each_node(ray, fn: Callable, *args) -> list[tuple[dict, object]]:
    """[(node, fn(*args) run on that node, or the exception it raised)] for every live node, all at once."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes(ray)
    # num_cpus=0: a node whose CPUs are all reserved (or a head started with --num-cpus 0) still runs it
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in nodes]
    results = []
    for node, ref in zip(nodes, refs):
        try:
            results.append((node, ray.get(ref)))
        except ray.exceptions.RayError as e:  # a node that fails is a row that says so, not a lost fleet
            cause = getattr(e, "cause", None) or e
            results.append((node, cause if isinstance(cause, Exception) else e))
    return results
