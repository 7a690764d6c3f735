"""Launch-parameter choices: the tuned table's tie-break and the table as committed."""

import json

from a2a.ops import configs


def _entry(alone: dict[str, float], busy: dict[str, dict[str, float]] | None = None) -> dict:
    entry = {"candidates_us": alone}
    if busy is not None:
        entry["busy_us"] = busy
    return entry


def test_without_busy_timings_the_fastest_alone_wins():
    choice = configs.tie_break(_entry({"tile=1024,warps=4": 41.98, "tile=2048,warps=8": 41.63}))
    assert choice == configs.TileConfig(2048, 8)


def test_busy_timings_break_a_tie_of_the_one_rank_timings():
    alone = {"tile=1024,warps=4": 41.98, "tile=2048,warps=8": 41.63, "tile=512,warps=2": 60.0}
    busy = {"tile=2048,warps=8": {"16": 21.5, "4096": 777.7}, "tile=1024,warps=4": {"16": 22.5, "4096": 735.1},
            "tile=512,warps=2": {"16": 1.0, "4096": 1.0}}  # fastest busy, but not tied alone: ignored
    assert configs.tie_break(_entry(alone, busy)) == configs.TileConfig(1024, 4)
    # Small rounds (16 tokens here) are judged on their own sizes only.
    assert configs.tie_break(_entry(alone, busy), small_rounds=True) == configs.TileConfig(2048, 8)


def test_busy_timings_count_only_at_the_sizes_the_fastest_alone_was_timed_at():
    alone = {"tile=1024,warps=4": 41.98, "tile=2048,warps=8": 41.63}
    partial = {"tile=1024,warps=4": {"16": 22.5}, "tile=2048,warps=8": {"16": 21.5, "4096": 777.7}}
    assert configs.tie_break(_entry(alone, partial)) == configs.TileConfig(2048, 8)
    fastest_untimed = {"tile=1024,warps=4": {"16": 22.5, "4096": 735.1}}
    assert configs.tie_break(_entry(alone, fastest_untimed)) == configs.TileConfig(2048, 8)


def test_the_committed_table_holds_its_own_tie_break():
    """Every entry's stored choice is what tie_break makes of its timings for the larger rounds (a
    hand edit would not be)."""
    table = json.loads(configs.TUNED_TABLE.read_text())["configs"]
    checked = 0
    for kernels in table.values():
        for entries in kernels.values():
            for key, entry in entries.items():
                stored = configs.TileConfig(entry["tile"], entry["num_warps"])
                assert configs.tie_break(entry) == stored, key
                checked += 1
    assert checked >= 8
