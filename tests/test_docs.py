"""The README's numbers and tables against the code, so the docs cannot go stale silently.

When one of these fails after a change to the layout or to a2a/envs.py, regenerate the README's
generated blocks: `PYTHONPATH=. python scripts/update_readme_numbers.py`.
"""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

import a2a
from a2a.layout import ALIGNMENT_RESERVE, REGION_ALIGN, WorkspaceLayout
from a2a.runtime.alignment import align_up

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENVS_SOURCE = (ROOT / "a2a" / "envs.py").read_text()
REGENERATE = "run PYTHONPATH=. python scripts/update_readme_numbers.py"


def generated_block(name: str) -> str:
    match = re.search(rf"<!-- {name} begin[^\n]*\n(.*?)<!-- {name} end -->", README, re.S)
    assert match, f"README.md has no '<!-- {name} begin' ... '<!-- {name} end -->' block"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table body row in `text` (header and separator rows left out)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(cell and set(cell) <= set("-:") for cell in cells):
            rows.pop()  # the header just above the separator
            continue
        rows.append(cells)
    return rows


def number(cell: str) -> int:
    """`1,084,288` or `**1,084,288**` -> 1084288."""
    return int(cell.replace("*", "").replace(",", ""))


def product(rule: str) -> int:
    """`8 × 4096 × 14,336` (optionally followed by `, rounded up to 128`) -> the product."""
    result = 1
    for factor in rule.split(", rounded")[0].split("×"):
        result *= number(factor.strip())
    return result


def call_arguments(cell: str, function: str) -> tuple:
    match = re.search(rf"`{function}\((.*)\)`", cell)
    assert match, f"no `{function}(...)` in {cell!r}"
    return ast.literal_eval(f"({match.group(1)},)")


@pytest.fixture(scope="module")
def example():
    block = generated_block("workspace-example")
    aux_table, payload_table = block.split("Payload region and total:")
    aux_rows = {row[0].strip("`"): row for row in table_rows(aux_table)}
    payload_rows = {row[0]: row for row in table_rows(payload_table)}
    call = payload_rows["workspace per rank"][1]
    ep_size, max_num_tokens, row_bytes, combine_bytes = call_arguments(call, "moe_a2a_get_workspace_size_per_rank")
    return dict(block=block, aux_rows=aux_rows, payload_rows=payload_rows, ep_size=ep_size,
                max_num_tokens=max_num_tokens, row_bytes=list(row_bytes), combine_bytes=combine_bytes)  # fmt: skip


def test_aux_region_fields_offsets_and_sizes_match_the_layout(example):
    layout = WorkspaceLayout.compute(example["ep_size"], example["max_num_tokens"])
    offsets = sorted(
        (getattr(layout, f.name), f.name[: -len("_offset")])
        for f in fields(layout)
        if f.name.endswith("_offset") and f.name != "payload_offset"
    )
    ends = [offset for offset, _ in offsets[1:]] + [layout.payload_offset]
    rows = dict(example["aux_rows"])
    total_row = rows.pop("aux region")
    size_row = rows.pop("aux data size")
    assert list(rows) == [name for _, name in offsets], f"README aux fields differ from a2a.layout: {REGENERATE}"
    for (offset, name), end in zip(offsets, ends):
        _, _, raw, readme_offset, padded = rows[name]
        assert number(readme_offset) == offset, f"{name} offset: {REGENERATE}"
        assert number(padded) == end - offset, f"{name} size: {REGENERATE}"
        assert align_up(number(raw), REGION_ALIGN) == number(padded), f"{name}: its size rule disagrees with the layout"
    assert number(total_row[-1]) == layout.payload_offset, REGENERATE
    args = call_arguments(size_row[1], "moe_a2a_get_aux_data_size")
    assert args == (example["ep_size"], example["max_num_tokens"])
    assert number(size_row[-1]) == a2a.moe_a2a_get_aux_data_size(*args) == layout.payload_offset + ALIGNMENT_RESERVE


def test_payload_planes_and_total_match_the_code(example):
    ep_size, max_num_tokens = example["ep_size"], example["max_num_tokens"]
    row_bytes, combine_bytes = example["row_bytes"], example["combine_bytes"]
    rows = example["payload_rows"]
    layout = WorkspaceLayout.compute(ep_size, max_num_tokens)
    round_layout = layout.round_layout(max_num_tokens, row_bytes)
    total = a2a.moe_a2a_get_workspace_size_per_rank(ep_size, max_num_tokens, row_bytes, combine_bytes)

    assert number(rows["aux region"][-1]) == layout.payload_offset, REGENERATE
    planes = [cells for key, cells in rows.items() if key.startswith("receive plane")]
    assert len(planes) == len(row_bytes), "one README row per dispatch payload"
    for index, cells in enumerate(planes):
        _, rule, offset, size = cells
        assert product(rule) == number(size), f"receive plane {index}: the rule does not give the bytes shown"
        assert number(offset) == round_layout.recv_plane_offsets[index], f"receive plane {index} offset: {REGENERATE}"
        assert number(size) == round_layout.recv_plane_sizes[index], f"receive plane {index} size: {REGENERATE}"

    combine = next(cells for key, cells in rows.items() if key.startswith("combine plane"))
    assert number(combine[2]) == round_layout.combine_offset, f"combine plane offset: {REGENERATE}"
    assert number(combine[3]) == align_up(product(combine[1]), REGION_ALIGN) == total - round_layout.combine_offset

    assert number(rows["workspace per rank"][-1]) == total, f"workspace size: {REGENERATE}"
    assert number(combine[2]) + number(combine[3]) == total, "the terms do not add up to the total"
    summed_row = rows["workspace per rank, summed payload size"]
    summed_args = call_arguments(summed_row[1], "moe_a2a_get_workspace_size_per_rank")
    assert summed_args == (ep_size, max_num_tokens, sum(row_bytes), combine_bytes)
    summed = a2a.moe_a2a_get_workspace_size_per_rank(*summed_args)
    assert number(summed_row[-1]) == summed, REGENERATE

    mib, gib = re.search(r"That is ([\d.]+) MiB a rank, ([\d.]+) GiB over", example["block"]).groups()
    assert mib == f"{total / 2**20:.1f}" and gib == f"{ep_size * total / 2**30:.2f}", REGENERATE
    assert f"summed form is {summed - total} bytes larger" in example["block"], REGENERATE


def test_worked_example_is_the_documented_shape(example):
    # DeepSeek-V3-like: 8 ranks, 4096 tokens, hidden 7168 bf16 + top-8 int32 ids + top-8 fp32 weights.
    assert (example["ep_size"], example["max_num_tokens"]) == (8, 4096)
    assert example["row_bytes"] == [7168 * 2, 8 * 4, 8 * 4] and example["combine_bytes"] == 7168 * 2


def env_docstring_rows() -> list[list[str]]:
    return table_rows(ENVS_SOURCE.split('"""')[1])


def test_readme_env_table_matches_the_envs_docstring():
    assert table_rows(generated_block("env-table")) == env_docstring_rows(), (
        f"README's environment table differs from a2a/envs.py's docstring: {REGENERATE}"
    )


def test_every_variable_read_in_envs_is_in_the_readme_table():
    read = set(re.findall(r"[\"'`](A2A_[A-Z0-9_]+)[\"'`]", ENVS_SOURCE))
    assert read, "expected a2a/envs.py to read A2A_* variables"
    listed = {row[0].strip("`") for row in table_rows(generated_block("env-table"))}
    assert read <= listed, f"missing from the README table: {sorted(read - listed)}: {REGENERATE}"
    documented = {row[0].strip("`") for row in env_docstring_rows()}
    assert read <= documented, f"read in a2a/envs.py but missing from its docstring table: {sorted(read - documented)}"


def test_every_a2a_variable_the_readme_names_exists():
    named = set(re.findall(r"(?<![A-Z0-9_])A2A_[A-Z0-9_]+", README))
    unknown = {name for name in named if name not in ENVS_SOURCE}
    assert not unknown, f"README names variables a2a/envs.py does not read: {sorted(unknown)}"


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert "docs/timeline.png" in images
    for path in images:
        assert (ROOT / path).is_file(), f"README shows {path}, which does not exist"
