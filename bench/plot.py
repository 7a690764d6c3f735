"""Plot a benchmark CSV: GB/s against tokens per rank, one line per phase, the roofline as a line.

    python -m bench.plot bench/results/h100_ep8_deepseek_bf16.csv --out bench/results/h100_ep8_deepseek_bf16.png

Reads the sweep CSV of `bench.run` (one subplot per (shape, payloads, ranks); lines for dispatch,
combine in workspace and combine staged, from `gbps_dedup`; the copy roofline from
`roofline_gbps`) or the CSV of `bench.multi_gpu` (one subplot per (shape, gpus); dispatch and
combine from the remote GB/s columns; the P2P roofline from `p2p_gbps`). The PNG goes next to the
CSV unless `--out` is given. Needs matplotlib (not a dependency of a2a).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class Panel:
    """One subplot: a title, a roofline, and (label, [(tokens, GB/s)]) per line."""

    title: str
    roofline_label: str
    roofline_gbps: float
    lines: tuple[tuple[str, tuple[tuple[int, float], ...]], ...]


SWEEP_PHASES = (
    ("dispatch", "dispatch"),
    ("combine_in_workspace", "combine (in workspace)"),
    ("combine_staged", "combine (staged)"),
)
MULTI_GPU_PHASES = (
    ("dispatch_remote_gbps", "dispatch (remote bytes)"),
    ("combine_remote_gbps", "combine (remote bytes)"),
)


def _series(rows: list[dict], column: str) -> tuple[tuple[int, float], ...]:
    points = sorted((int(row["tokens"]), float(row[column])) for row in rows if row.get(column) not in (None, ""))
    return tuple(points)


def sweep_panels(rows: list[dict]) -> list[Panel]:
    """Panels of a `bench.run` CSV (columns phase, ranks, tokens, gbps_dedup, roofline_gbps, ...)."""
    keys = sorted({(row["shape"], row.get("payloads", ""), int(row["ranks"])) for row in rows})
    panels = []
    for shape, payloads, ranks in keys:
        group = [r for r in rows if (r["shape"], r.get("payloads", ""), int(r["ranks"])) == (shape, payloads, ranks)]
        lines = []
        for phase, label in SWEEP_PHASES:
            points = _series([r for r in group if r["phase"] == phase], "gbps_dedup")
            if points:
                lines.append((label, points))
        gpu = group[0].get("gpu", "")
        panels.append(Panel(title=f"{shape} {payloads}, {ranks} ranks on one GPU\n{gpu}",
                            roofline_label="copy roofline (read + write)",
                            roofline_gbps=statistics.median(float(r["roofline_gbps"]) for r in group),
                            lines=tuple(lines)))  # fmt: skip
    return panels


def multi_gpu_panels(rows: list[dict]) -> list[Panel]:
    """Panels of a `bench.multi_gpu` CSV (columns gpus, tokens, *_remote_gbps, p2p_gbps, ...)."""
    keys = sorted({(row["shape"], int(row["gpus"])) for row in rows})
    panels = []
    for shape, gpus in keys:
        group = [r for r in rows if (r["shape"], int(r["gpus"])) == (shape, gpus)]
        lines = tuple((label, _series(group, column)) for column, label in MULTI_GPU_PHASES)
        panels.append(Panel(title=f"{shape}, {gpus} GPUs, one process each\n{group[0].get('gpu', '')}",
                            roofline_label="P2P write roofline",
                            roofline_gbps=statistics.median(float(r["p2p_gbps"]) for r in group),
                            lines=lines))  # fmt: skip
    return panels


def panels_of(rows: list[dict]) -> list[Panel]:
    if not rows:
        raise ValueError("the CSV has no rows")
    if "phase" in rows[0] and "gbps_dedup" in rows[0]:
        return sweep_panels(rows)
    if "p2p_gbps" in rows[0]:
        return multi_gpu_panels(rows)
    raise ValueError(f"not a bench.run or bench.multi_gpu CSV: columns {sorted(rows[0])}")


def draw(panels: list[Panel], out: Path, source: str) -> None:
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 4.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        ends = []
        for label, points in panel.lines:
            tokens = [t for t, _ in points]
            gbps = [g for _, g in points]
            (line,) = ax.plot(tokens, gbps, marker="o", label=label)
            ends.append((gbps[-1], tokens[-1], line.get_color()))
        # The share of the roofline reached at the largest batch (the figure of merit), right of the
        # last point; labels closer than 6 % of the roofline are pushed apart so they stay legible.
        label_y = None
        for gbps, tokens, color in sorted(ends, reverse=True):
            y = gbps if label_y is None else min(gbps, label_y - 0.06 * panel.roofline_gbps)
            ax.annotate(f"{100 * gbps / panel.roofline_gbps:.0f} %", (tokens, y), textcoords="offset points",
                        xytext=(7, 0), ha="left", va="center", fontsize=8, color=color)  # fmt: skip
            label_y = y
        ax.axhline(panel.roofline_gbps, color="black", linestyle="--", linewidth=1.0)
        ax.annotate(f"{panel.roofline_label}: {panel.roofline_gbps:.0f} GB/s", (0.01, panel.roofline_gbps),
                    xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 3), fontsize=8)
        ax.set_xscale("log", base=2)
        all_tokens = sorted({t for _, points in panel.lines for t, _ in points})
        ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
        ax.set_xlim(all_tokens[0] / 1.6, all_tokens[-1] * 2.2)
        ax.set_ylim(0, 1.12 * panel.roofline_gbps)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("GB/s")
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        # Just under the roofline, at the left, where small batches leave the plot empty.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.86))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(source, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: the CSV's path with .png)")
    args = parser.parse_args()
    with open(args.csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = args.out or args.csv.with_suffix(".png")
    draw(panels_of(rows), out, args.csv.name)
    print(out)


if __name__ == "__main__":
    main()
