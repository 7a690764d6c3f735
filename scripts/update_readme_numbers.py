"""Regenerate the README's generated blocks from the code: the workspace-size worked example and the
environment-variable table.

    PYTHONPATH=. python scripts/update_readme_numbers.py          # rewrite README.md in place
    PYTHONPATH=. python scripts/update_readme_numbers.py --check  # exit 1 if README.md is stale

Each block sits between `<!-- NAME begin ... -->` and `<!-- NAME end -->` lines; only the text
between them is replaced. tests/test_docs.py checks the numbers against the code, so run this after
changing the workspace layout or a2a/envs.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import a2a
from a2a import layout as layout_module
from a2a.layout import REGION_ALIGN, WorkspaceLayout, align_up, num_route_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ENVS = ROOT / "a2a" / "envs.py"

# The worked example: DeepSeek-V3-like, 8 ranks, 4096 tokens a rank.
EP_SIZE = 8
MAX_NUM_TOKENS = 4096
HIDDEN = 7168
TOP_K = 8
DISPATCH_PAYLOADS = (
    ("hidden states, bf16", HIDDEN * 2),
    ("expert ids, int32", TOP_K * 4),
    ("weights, fp32", TOP_K * 4),
)
COMBINE_ROW_BYTES = HIDDEN * 2


from a2a.runtime.protocol import SIGNATURE_WORDS  # noqa: E402


def _aux_rules() -> dict[str, tuple[str, int]]:
    """field -> (size rule as text, unaligned bytes) for the example; one entry per aux field."""
    ep, tokens = EP_SIZE, MAX_NUM_TOKENS
    blocks = num_route_blocks(tokens)
    top_k_max = layout_module.MAX_TOP_K
    state_len = layout_module.ROUND_STATE_LEN
    topk = (f"4 × max_num_tokens × MAX_TOP_K = 4 × {tokens} × {top_k_max}", 4 * tokens * top_k_max)
    return {
        "send_counters": (f"4 × ep_size = 4 × {ep}", 4 * ep),
        "recv_counters": (f"4 × ep_size = 4 × {ep}", 4 * ep),
        "dispatch_flags": (f"4 × ep_size = 4 × {ep}", 4 * ep),
        "combine_flags": (f"4 × ep_size = 4 × {ep}", 4 * ep),
        "gather_flags": (f"4 × ep_size = 4 × {ep}", 4 * ep),
        "signatures": (f"4 × 2 × ep_size × SIGNATURE_WORDS = 4 × 2 × {ep} × {SIGNATURE_WORDS}", 4 * 2 * ep * SIGNATURE_WORDS),
        "round_state": (f"4 × {state_len}", 4 * state_len),
        "topk_target_ranks": topk,
        "topk_send_indices": topk,
        "topk_local_slots": topk,
        "block_counts": (f"4 × blocks × ep_size = 4 × {blocks} × {ep}", 4 * blocks * ep),
        "block_invalid": (f"4 × blocks = 4 × {blocks}", 4 * blocks),
        "eplb_stats": ("4 × ep_size × eplb_stats_num_experts (0 here)", 0),
    }


def aux_fields(layout: WorkspaceLayout) -> list[tuple[str, int, int]]:
    """(field, offset, bytes up to the next field) of every aux field, in layout order."""
    offsets = sorted(
        (getattr(layout, f.name), f.name[: -len("_offset")])
        for f in fields(layout)
        if f.name.endswith("_offset") and f.name != "payload_offset"
    )
    ends = [offset for offset, _ in offsets[1:]] + [layout.payload_offset]
    return [(name, offset, end - offset) for (offset, name), end in zip(offsets, ends)]


def _n(value: int) -> str:
    return f"{value:,}"


def workspace_example() -> str:
    """The markdown of the worked example (two tables and a closing line)."""
    ep, tokens = EP_SIZE, MAX_NUM_TOKENS
    layout = WorkspaceLayout.compute(ep, tokens)
    rules = _aux_rules()
    missing = [name for name, _, _ in aux_fields(layout) if name not in rules]
    if missing:
        raise SystemExit(f"no size rule for aux field(s) {missing}: add them to _aux_rules() in {__file__}")
    lines = [
        f"Aux region, `blocks = ceil(max_num_tokens / {layout_module.ROUTE_BLOCK_TOKENS})"
        f" = {num_route_blocks(tokens)}`:",
        "",
        "| field | size rule | bytes | offset | bytes, rounded up to 128 |",
        "|---|---|---:|---:|---:|",
    ]
    for name, offset, padded in aux_fields(layout):
        rule, raw = rules[name]
        if align_up(raw, REGION_ALIGN) != padded:
            raise SystemExit(f"size rule for {name} gives {raw} bytes, the layout reserves {padded}: fix _aux_rules()")
        lines.append(f"| `{name}` | {rule} | {_n(raw)} | {_n(offset)} | {_n(padded)} |")
    aux = layout.payload_offset
    reserve = layout_module.ALIGNMENT_RESERVE
    lines.append(f"| aux region | the fields above: where the payload begins | | | **{_n(aux)}** |")
    lines.append(f"| aux data size | `moe_a2a_get_aux_data_size({ep}, {tokens})`: the aux region + {_n(reserve)} bytes "
                 f"the planes' 4096-byte starts may use | | | {_n(a2a.moe_a2a_get_aux_data_size(ep, tokens))} |")

    row_bytes = [b for _, b in DISPATCH_PAYLOADS]
    round_layout = layout.round_layout(tokens, row_bytes)
    exact = a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, row_bytes, COMBINE_ROW_BYTES)
    summed = a2a.moe_a2a_get_workspace_size_per_rank(ep, tokens, sum(row_bytes), COMBINE_ROW_BYTES)
    combine = exact - round_layout.combine_offset
    if combine != align_up(ep * tokens * COMBINE_ROW_BYTES, REGION_ALIGN):
        raise SystemExit("the combine plane no longer follows the documented rule: update the README text")
    lines += [
        "",
        "Payload region and total:",
        "",
        "| term | rule | offset | bytes |",
        "|---|---|---:|---:|",
        f"| aux region | table above | 0 | {_n(aux)} |",
    ]
    for index, ((what, row), offset, size) in enumerate(
        zip(DISPATCH_PAYLOADS, round_layout.recv_plane_offsets, round_layout.recv_plane_sizes)
    ):
        lines.append(f"| receive plane {index} ({what}) | {ep} × {tokens} × {_n(row)} | {_n(offset)} | {_n(size)} |")
    lines += [
        f"| combine plane (bf16) | {ep} × {tokens} × {_n(COMBINE_ROW_BYTES)}, rounded up to 128 "
        f"| {_n(round_layout.combine_offset)} | {_n(combine)} |",
        f"| workspace per rank | `moe_a2a_get_workspace_size_per_rank({ep}, {tokens}, {row_bytes}, "
        f"{COMBINE_ROW_BYTES})` | | **{_n(exact)}** |",
        f"| workspace per rank, summed payload size | `moe_a2a_get_workspace_size_per_rank({ep}, {tokens}, "
        f"{sum(row_bytes)}, {COMBINE_ROW_BYTES})` | | {_n(summed)} |",
        "",
        f"That is {exact / 2**20:.1f} MiB a rank, {ep * exact / 2**30:.2f} GiB over the {ep} ranks.",
        f"The summed form is {summed - exact} bytes larger: it is FlashInfer's formula, `aux data size` + the",
        "summed planes + the combine plane, each rounded up to 128, and the aux data size counts the",
        f"{_n(reserve)} bytes that starting up to {layout_module.MAX_PAYLOADS} receive planes and the combine plane on",
        "4096-byte boundaries may use.",
    ]
    return "\n".join(lines)


def env_table() -> str:
    """The variable table of a2a/envs.py's docstring, verbatim."""
    text = ENVS.read_text()
    docstring = text.split('"""')[1]
    rows = [line for line in docstring.splitlines() if line.startswith("|")]
    if len(rows) < 3:
        raise SystemExit(f"no variable table in the docstring of {ENVS}")
    return "\n".join(rows)


BLOCKS = {"workspace-example": workspace_example, "env-table": env_table}


def replace_block(text: str, name: str, body: str) -> str:
    begin = f"<!-- {name} begin"
    end = f"<!-- {name} end -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"README.md must hold exactly one '{begin} ...' and one '{end}' line")
    head, rest = text.split(begin)
    marker, rest = rest.split("\n", 1)
    _, tail = rest.split(end)
    return f"{head}{begin}{marker}\n{body}\n{end}{tail}"


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        text = replace_block(text, name, make())
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether README.md is up to date")
    args = parser.parse_args()
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md is stale: run PYTHONPATH=. python scripts/update_readme_numbers.py")
            sys.exit(1)
        print("README.md is up to date")
        return
    if new != text:
        README.write_text(new)
    print("README.md updated" if new != text else "README.md already up to date")


if __name__ == "__main__":
    main()
