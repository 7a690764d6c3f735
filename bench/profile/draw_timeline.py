"""Draw one round (dispatch, local work, combine) across two ranks: docs/timeline.png.

    python -m bench.profile.draw_timeline [--out docs/timeline.png]

Two lanes, one per rank stream, time to the right. Rank 1 starts later (a straggler), so rank 0's
spins are visibly longer: each rank waits for the slower one's flag store. Only matplotlib is
needed; the picture is a schematic (box widths are not measured times).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

A2A_COLOR = "#9ec5e8"  # a2a kernels
BARRIER_COLOR = "#f6c28b"  # one-program flag kernels / the flag tail of the copy kernel
CALLER_COLOR = "#d9d9d9"  # the caller's expert MoE
DATA_ARROW = "#1f5fa8"  # rows and counters written into a peer's segment
FLAG_ARROW = "#c0392b"  # flag stores into a peer's segment
READ_ARROW = "#2e8b57"  # reads of a peer's segment

LANE_HEIGHT = 1.0
LANE_Y = {0: 3.1, 1: 0.9}  # bottom edge of each rank's lane


@dataclass(frozen=True)
class RankTimes:
    """Where one rank's launches sit on the time axis (schematic units)."""

    route: tuple[float, float]
    copy: tuple[float, float]  # the copy part of the dispatch copy kernel
    dispatch_store: float  # the last program's flag store
    dispatch_spin_end: float
    sanitize: tuple[float, float]
    moe: tuple[float, float]
    stage: tuple[float, float]
    combine_store: float
    combine_spin_end: float
    gather: tuple[float, float]


# Rank 1 is late; every spin ends once the later of the two stores has landed.
RANK0 = RankTimes(route=(0.3, 1.5), copy=(1.6, 4.6), dispatch_store=4.6, dispatch_spin_end=6.05,
                  sanitize=(6.2, 6.95), moe=(7.1, 10.2), stage=(10.3, 11.2), combine_store=11.3,
                  combine_spin_end=12.55, gather=(12.7, 15.6))  # fmt: skip
RANK1 = RankTimes(route=(1.3, 2.5), copy=(2.6, 5.5), dispatch_store=5.5, dispatch_spin_end=6.05,
                  sanitize=(6.2, 6.95), moe=(7.1, 10.9), stage=(11.0, 11.7), combine_store=12.0,
                  combine_spin_end=12.55, gather=(12.7, 15.6))  # fmt: skip


def box(ax, rank, span, label, color, *, dashed=False, hatch=None, sublabel=None, fontsize=10):
    x0, x1 = span
    y = LANE_Y[rank]
    ax.add_patch(Rectangle((x0, y), x1 - x0, LANE_HEIGHT, facecolor=color, edgecolor="black",
                           linewidth=1.2, linestyle="--" if dashed else "-", hatch=hatch))  # fmt: skip
    center = (x0 + x1) / 2
    if sublabel:
        ax.text(center, y + 0.66 * LANE_HEIGHT, label, ha="center", va="center", fontsize=fontsize, weight="bold")
        ax.text(center, y + 0.3 * LANE_HEIGHT, sublabel, ha="center", va="center", fontsize=8, linespacing=1.1)
    else:
        ax.text(center, y + LANE_HEIGHT / 2, label, ha="center", va="center", fontsize=fontsize, weight="bold")


def arrow(ax, start, end, color, *, style="-", width=1.6):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color=color, linewidth=width,
                                 linestyle=style, shrinkA=0, shrinkB=0))  # fmt: skip


def lane_top(rank):
    return LANE_Y[rank] + LANE_HEIGHT


def lane_bottom(rank):
    return LANE_Y[rank]


def toward_peer(rank):
    """The lane edge facing the other rank (rank 0 is drawn on top)."""
    return lane_bottom(rank) if rank == 0 else lane_top(rank)


def draw_rank(ax, rank: int, t: RankTimes) -> None:
    box(ax, rank, t.route, "route", A2A_COLOR, sublabel="slots, send /\nrecv counters")
    box(ax, rank, t.copy, "dispatch copy", A2A_COLOR, sublabel="rows into peers'\nreceive planes")
    box(ax, rank, (t.dispatch_store, t.dispatch_spin_end), "", BARRIER_COLOR, hatch="///")
    # The copy kernel and its flag tail are one launch: one outline around both.
    ax.add_patch(Rectangle((t.copy[0], LANE_Y[rank]), t.dispatch_spin_end - t.copy[0], LANE_HEIGHT,
                           facecolor="none", edgecolor="black", linewidth=2.2))  # fmt: skip
    wide = t.dispatch_spin_end - t.dispatch_store > 1.0
    ax.text((t.dispatch_store + t.dispatch_spin_end) / 2, LANE_Y[rank] + LANE_HEIGHT / 2,
            "last program:\nsignal, spin" if wide else "spin", fontsize=8, ha="center", va="center",
            bbox=dict(facecolor=BARRIER_COLOR, edgecolor="none", pad=0.5))  # fmt: skip
    box(ax, rank, t.sanitize, "sanitize", A2A_COLOR, dashed=True, sublabel="optional,\nlocal", fontsize=9)
    box(ax, rank, t.moe, "expert MoE (caller)", CALLER_COLOR, sublabel="reads receive planes,\nwrites combine plane")
    box(ax, rank, t.stage, "stage", A2A_COLOR, dashed=True, sublabel="optional\ncopy", fontsize=9)
    box(ax, rank, (t.stage[1] + 0.05, t.combine_spin_end), "", BARRIER_COLOR, hatch="///")
    ax.text((t.stage[1] + 0.05 + t.combine_spin_end) / 2, LANE_Y[rank] + LANE_HEIGHT / 2, "combine\nbarrier",
            fontsize=8, ha="center", va="center", weight="bold",
            bbox=dict(facecolor=BARRIER_COLOR, edgecolor="none", pad=0.5))  # fmt: skip
    box(ax, rank, t.gather, "gather-reduce", A2A_COLOR, sublabel="reads peers' combine planes,\nsums over top-k")
    # The flag stores: a marker where the single program publishes flag_val to every peer.
    for x in (t.dispatch_store, t.combine_store):
        ax.plot([x], [toward_peer(rank)], marker="D", color=FLAG_ARROW, markersize=7, zorder=5)


def draw_cross_rank(ax) -> None:
    times = {0: RANK0, 1: RANK1}
    # route's last program writes recv_counters[me] into each peer.
    for src, dst in ((0, 1), (1, 0)):
        t = times[src]
        x = t.route[0] + 0.85 * (t.route[1] - t.route[0])
        arrow(ax, (x, toward_peer(src)), (x + 0.5, toward_peer(dst)), DATA_ARROW, width=1.2)
    ax.text(0.8, 2.5, "recv_counters[me]", color=DATA_ARROW, fontsize=8, ha="center", va="center",
            bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))  # fmt: skip
    # dispatch copy writes rows into the peer's receive planes.
    for src, dst in ((0, 1), (1, 0)):
        t = times[src]
        for frac in (0.2, 0.5):
            x = t.copy[0] + frac * (t.copy[1] - t.copy[0])
            arrow(ax, (x, toward_peer(src)), (x + 0.45, toward_peer(dst)), DATA_ARROW, width=2.2)
    ax.text(2.85, 2.5, "rows", color=DATA_ARROW, fontsize=8, ha="center", va="center",
            bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))  # fmt: skip
    # Flag stores land in the peer's flags; the peer's spin ends once it sees them.
    for src, dst, phase in ((0, 1, "dispatch"), (1, 0, "dispatch"), (0, 1, "combine"), (1, 0, "combine")):
        store = getattr(times[src], f"{phase}_store")
        spin_end = getattr(times[dst], f"{phase}_spin_end")
        arrow(ax, (store, toward_peer(src)), (spin_end - 0.05, toward_peer(dst)), FLAG_ARROW)
    flag_labels = [
        (RANK0.dispatch_store + 0.4, 2.75, "center", "dispatch_flags[0]"),
        (RANK1.dispatch_spin_end + 0.1, 2.3, "left", "dispatch_flags[1] = flag_val"),
        (RANK0.combine_store + 0.25, 2.85, "center", "combine_flags[0]"),
        (RANK1.combine_spin_end + 0.05, 2.3, "left", "combine_flags[1]"),
    ]
    for x, y, align, text in flag_labels:
        ax.text(x, y, text, color=FLAG_ARROW, fontsize=8, ha=align, va="center",
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))  # fmt: skip
    # gather-reduce reads the peer's combine plane.
    for src, dst, offset in ((1, 0, 1.6), (0, 1, 2.5)):
        x = times[dst].gather[0] + offset
        arrow(ax, (x - 0.4, toward_peer(src)), (x, toward_peer(dst)), READ_ARROW, style="--", width=1.6)
    ax.text(RANK0.gather[0] + 1.15, 2.75, "reads of the peer's\ncombine plane", color=READ_ARROW, fontsize=8,
            ha="right", va="center", bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))  # fmt: skip


def draw_phases(ax) -> None:
    top = lane_top(0) + 0.25
    phases = [
        (RANK0.route[0], RANK1.dispatch_spin_end, "dispatch: route + dispatch copy (last program: signal, then spin)"),
        (RANK0.sanitize[0], RANK0.moe[1], "local: sanitize, the caller's experts"),
        (RANK0.stage[0], RANK0.gather[1], "combine: stage, combine barrier, gather-reduce"),
    ]
    for x0, x1, label in phases:
        ax.plot([x0, x0, x1, x1], [top, top + 0.15, top + 0.15, top], color="black", linewidth=1.0)
        ax.text((x0 + x1) / 2, top + 0.32, label, ha="center", va="center", fontsize=10)
    for rank in (0, 1):
        ax.text(-0.15, LANE_Y[rank] + LANE_HEIGHT / 2, f"rank {rank}\nstream", ha="right", va="center",
                fontsize=11, weight="bold")  # fmt: skip
    ax.annotate("", xy=(16.0, 0.45), xytext=(0.3, 0.45), arrowprops=dict(arrowstyle="-|>", color="black", lw=1.0))
    ax.text(16.0, 0.3, "time", ha="right", va="top", fontsize=9)


NOTES = (
    "Flag kernels (one program each, hatched): flag_val += 1; fence.release (system scope); store flag_val into "
    "flags[me] of every peer;\nthen spin (bounded by a timeout) until own flags[s] == flag_val for every peer s. "
    "Dispatch: the last program of the copy kernel; combine: the combine barrier kernel.\n"
    "Flags are epoch values, never reset: a CUDA-graph replay of the round just counts on, so replays need no reset "
    "launch.  On the CPU path the spin is replaced by a host wait.\n"
    "Why the waits suffice: a rank's flag store follows all of its writes into the peer (rows, recv_counters), so "
    "sanitize / the MoE read complete planes;\nthe combine barrier orders every peer's combine plane before any "
    "gather-reduce reads it."
)


def draw(out: Path) -> None:
    fig = plt.figure(figsize=(16, 6.4), dpi=100)
    ax = fig.add_axes([0.055, 0.25, 0.935, 0.73])
    ax.set_xlim(-1.0, 16.2)
    ax.set_ylim(0.2, 5.0)
    ax.axis("off")
    draw_rank(ax, 0, RANK0)
    draw_rank(ax, 1, RANK1)
    draw_cross_rank(ax)
    draw_phases(ax)
    legend = [
        Patch(facecolor=A2A_COLOR, edgecolor="black", label="a2a kernel"),
        Patch(facecolor=A2A_COLOR, edgecolor="black", linestyle="--", label="optional a2a kernel"),
        Patch(facecolor=BARRIER_COLOR, edgecolor="black", hatch="///", label="signal + spin (one program)"),
        Patch(facecolor=CALLER_COLOR, edgecolor="black", label="caller's kernel"),
        Line2D([], [], color=DATA_ARROW, linewidth=2, label="write into the peer's segment"),
        Line2D([], [], color=FLAG_ARROW, linewidth=2, marker="D", markersize=6, label="flag store into the peer"),
        Line2D([], [], color=READ_ARROW, linewidth=2, linestyle="--", label="read of the peer's segment"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=7, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.185))
    fig.text(0.055, 0.015, NOTES, fontsize=9, va="bottom", ha="left", linespacing=1.35)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "timeline.png")
    args = parser.parse_args()
    draw(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
