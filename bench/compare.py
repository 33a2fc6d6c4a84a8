"""Bench reports side by side: a table on the terminal and a bar chart as a PNG (drawn with Pillow).

    edgediff bench compare A.json B.json ... [--png chart.png]
    python -m edgediff.bench.compare A.json B.json ... [--png chart.png]

Each file is a report of `edgediff bench --json`; every row of every file becomes a line of the table and
a bar of the chart, labelled by the file's name when there are several. `edgediff bench` prints its own
report with the same table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..engine.errors import EdgediffError

SCHEMA = "edgediff-bench/1"
GB = 2**30


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgediffError(f"no bench report at {path}; write one with `edgediff bench --json {path}`")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgediffError(f"{path} is not a bench report (not JSON: {e})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise EdgediffError(f"{path} is not a bench report of this edgediff (schema {SCHEMA!r})")
    return report


def render_table(reports: list[dict], labels: list[str] | None = None) -> str:
    """One line per row of every report; the report's label (and protocol) first when there are several."""
    several = len(reports) > 1
    head = (["report", "protocol"] if several else []) + [
        "runner", "e2e s", "steps/s", "load s", "1st s", "text s", "unet/step", "vae s",
        "peak RSS", "gen peak", "GFLOP/s", "%peak", "PSNR dB"]
    lines = []
    for k, report in enumerate(reports):
        for row in report["rows"]:
            stages = row.get("stages") or {}
            cells = ([labels[k] if labels else str(k + 1), _protocol_name(report["protocol"])] if several else [])
            if row["status"] != "ok":
                lines.append(cells + [row["name"], f"{row['status']}: {row.get('note') or ''}"])
                continue
            cells += [row["name"], _num(row["total_s"], 2), _num(row["steps_per_s"], 2), _num(row["load_s"], 2),
                      _num(row["first_run_s"], 2), _num(stages.get("text_encoder"), 3),
                      _num(stages.get("unet_per_step"), 3), _num(stages.get("vae_decoder"), 3),
                      _gb(row["peak_rss_bytes"]), _gb(row["generation_peak_bytes"]),
                      _num(row["unet_flops_per_s"] and row["unet_flops_per_s"] / 1e9, 1),
                      "-" if row["unet_peak_fraction"] is None else f"{100 * row['unet_peak_fraction']:.1f}%",
                      psnr_text(row)]
            lines.append(cells)
    widths = [max(len(head[i]), *(len(line[i]) for line in lines if len(line) > i and len(line) == len(head)))
              for i in range(len(head))] if lines else [len(h) for h in head]
    left = set(range(3 if several else 1))  # text columns
    out = []
    for line in [head] + lines:
        if len(line) != len(head):  # a failed row: its note runs on
            out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(line[:-1])) + "  " + line[-1])
            continue
        out.append("  ".join(c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(line)))
    return "\n".join(out)


def psnr_text(row: dict) -> str:
    if row.get("psnr_note") in ("reference", "identical"):
        return row["psnr_note"]
    return "-" if row.get("psnr_db") is None else f"{row['psnr_db']:.1f}"


def _psnr_label(text: str) -> str:
    return {"reference": "the PSNR reference", "identical": "identical to the reference", "-": "no PSNR"}.get(
        text, f"PSNR {text} dB")


def _protocol_name(protocol: dict) -> str:
    name = protocol["name"]
    return name + ("*" if protocol.get("overrides") else "")


def _num(x, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _gb(n) -> str:
    return "-" if n is None else f"{n / GB:.2f} GB"


def draw_chart(reports: list[dict], labels: list[str] | None, path: Path) -> Path:
    """Horizontal bars, one per row that ran: end-to-end seconds, and peak RSS; PSNR written beside."""
    from PIL import Image, ImageDraw, ImageFont

    bars = []
    for k, report in enumerate(reports):
        for row in report["rows"]:
            if row["status"] == "ok":
                label = f"{labels[k]}: {row['name']}" if labels and len(reports) > 1 else row["name"]
                bars.append((label, row["total_s"], (row["peak_rss_bytes"] or 0) / GB, psnr_text(row)))
    if not bars:
        raise EdgediffError("no row of these reports ran: nothing to chart")
    font = ImageFont.load_default()
    panels = (("end-to-end seconds (lower is better)", 1, "{:.2f} s", (66, 133, 244)),
              ("peak resident memory, GB (lower is better)", 2, "{:.2f} GB", (234, 134, 52)))
    bar_h, gap, label_w, plot_w, margin = 18, 6, 300, 420, 12
    panel_h = 24 + len(bars) * (bar_h + gap)
    image = Image.new("RGB", (label_w + plot_w + 120 + 2 * margin, margin + len(panels) * (panel_h + margin) + 16),
                      "white")
    draw = ImageDraw.Draw(image)
    y = margin
    for title, index, fmt, colour in panels:
        draw.text((margin, y), title, fill="black", font=font)
        top = max(b[index] for b in bars) or 1.0
        yy = y + 22
        for bar in bars:
            value = bar[index]
            draw.text((margin, yy + 3), f"{bar[0][:44]}  ({_psnr_label(bar[3])})" if index == 1 else bar[0][:44],
                      fill="black", font=font)
            width = int(plot_w * value / top)
            draw.rectangle([label_w, yy, label_w + max(1, width), yy + bar_h], fill=colour)
            draw.text((label_w + width + 6, yy + 3), fmt.format(value), fill="black", font=font)
            yy += bar_h + gap
        y += panel_h + margin
    first = reports[0]
    draw.text((margin, y - 4), f"{_protocol_name(first['protocol'])} on {first['machine']['cpu']}"
              + (" and others" if len(reports) > 1 else ""), fill="gray", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs="+", help="JSON files written by `edgediff bench --json`")
    p.add_argument("--png", default="bench-compare.png", help="the bar chart to write (default: %(default)s)")


def run(args) -> None:
    reports = [load_report(p) for p in args.reports]
    labels = [Path(p).stem for p in args.reports]
    if len(set(labels)) != len(labels):
        labels = [str(Path(p)) for p in args.reports]
    for label, report in zip(labels, reports):
        p = report["protocol"]
        custom = f"; custom: {', '.join(p['overrides'])}" if p.get("overrides") else ""
        print(f"{label}: {p['name']} ({p['width']}x{p['height']}, batch {p['batch']}, {p['steps']} steps{custom}) "
              f"on {report['machine']['cpu']}, {report['machine']['cores']} cores, {report['created']}")
    print(render_table(reports, labels))
    print(f"wrote {draw_chart(reports, labels, Path(args.png))}")


def main(argv: list[str] | None = None) -> int:
    """`python -m edgediff.bench.compare ...` is `edgediff bench compare ...`."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["bench", "compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
