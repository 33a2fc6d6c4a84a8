"""`edgediff bench --ray auto|ADDRESS`: one protocol on every node of a Ray cluster, one table of the nodes.

    edgediff bench --protocol tiny --ray auto
    edgediff bench --protocol sd15-512 --backend auto --ray 10.0.0.5:6379 --json fleet.json

1. The arguments are checked here, before the cluster is reached (bench/run.checked).
2. Each live node runs this machine's benchmark, bench/run.measure (the protocol, its exports, each runner
   in a process of its own, its report), in a Ray task pinned to the node (edgediff/fleet.py). The report
   and its images come back.
3. One table: node, device, plan, speed, memory, and the PSNR of every row against the first node's
   reference (the head's; bench/run._add_psnr picks it as it does on one machine), so that a node whose
   device draws another picture shows it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ..engine.errors import first_line
from . import compare, run as bench

FLEET_SCHEMA = "edgediff-bench-fleet/1"


def run_fleet(args) -> None:
    from ..fleet import cluster, node_name, on_each_node

    # 1. The arguments, before the cluster.
    protocol, _, _ = bench.checked(args)
    print(bench._protocol_line(protocol))
    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="edgediff-bench-fleet-"))
    # each node writes into a folder of its own (two nodes of one machine must not share one)
    options = {k: v for k, v in vars(args).items() if k not in ("run", "ray", "json", "out_dir")}

    # 2. The benchmark on every node at once.
    with cluster(args.ray) as ray:
        results = on_each_node(ray, node_bench, options)

    # 3. One table; each node's images kept here, where the PSNR is taken.
    import numpy as np

    nodes = []
    for k, (node, result) in enumerate(results):
        entry = {"node": node_name(node), "status": "ok", "note": None, "report": None}
        if isinstance(result, Exception):
            entry.update(status="failed", note=f"{type(result).__name__}: {first_line(result)}"[:300])
        else:
            report, images = result
            folder = out / f"node-{k + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in images.items():
                path = folder / f"row-{i + 1}.npy"
                np.save(path, pixels)
                report["rows"][i]["images"] = str(path)
            entry["report"] = report
        nodes.append(entry)
    rows = [row for n in nodes if n["report"] for row in n["report"]["rows"]]
    fleet = {"schema": FLEET_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "protocol": nodes[0]["report"]["protocol"] if nodes[0]["report"] else None,
             "reference": bench._add_psnr(rows), "nodes": nodes}
    print(render_fleet(fleet))
    bench.write_json(fleet, args.json)


def node_bench(options: dict) -> tuple[dict, dict]:
    """On one node: its report (bench/run.measure), and the images of each row that ran, by row index."""
    import numpy as np

    report = bench.measure(argparse.Namespace(**options, out_dir=None, json=None, ray=None))
    images = {i: np.load(row["images"]) for i, row in enumerate(report["rows"]) if row["status"] == "ok"}
    return report, images


def render_fleet(fleet: dict) -> str:
    """The nodes' table: one line per row of each node, its machine and plan below."""
    head = ["node", "device", "runner", "plan", "e2e s", "steps/s", "unet/step", "peak RSS", "PSNR dB"]
    lines, notes = [], []
    for n in fleet["nodes"]:
        if n["status"] != "ok":
            lines.append([n["node"], f"failed: {n['note']}"])
            continue
        notes.append(f"{n['node']}: {bench._machine_line(n['report']['machine'])}")
        for row in n["report"]["rows"]:
            if row["status"] != "ok":
                lines.append([n["node"], f"{row['name']} {row['status']}: {row.get('note') or ''}"])
                continue
            stages = row.get("stages") or {}
            lines.append([n["node"], f"{row['backend']} ({row['device']})", row["name"], row.get("rung") or "-",
                          compare._num(row["total_s"], 2), compare._num(row["steps_per_s"], 2),
                          compare._num(stages.get("unet_per_step"), 3), compare._gb(row["peak_rss_bytes"]),
                          compare.psnr_text(row)])
            if row.get("plan"):
                notes.append(f"{n['node']}: {row['name']}: {row['plan']}")
    full = [line for line in lines if len(line) == len(head)]
    widths = [max([len(head[i])] + [len(line[i]) for line in full]) for i in range(len(head))]
    text = []
    for line in [head] + lines:
        if len(line) != len(head):  # a failed node or row: its note runs on
            text.append(line[0].ljust(widths[0]) + "  " + line[1])
            continue
        text.append("  ".join(c.ljust(widths[i]) if i < 4 else c.rjust(widths[i]) for i, c in enumerate(line)))
    ref = fleet["reference"]
    text.append(f"PSNR against {ref['why']} on the first node" if ref["row"] else
                f"PSNR: no reference ({ref['why']})")
    return "\n".join(text + notes)
