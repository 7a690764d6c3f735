"""Adversarial engine traffic: rounds whose geometry changes every time, several layers on one
workspace, no host synchronisation between rounds, ranks delayed / prioritised / scheduled in a
random order. Every output is checked against the reference (tests/engine_traffic.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings

from tests.engine_traffic import LayerSpec, Traffic, TrafficCase, traffic_cases


def run_case(case: TrafficCase, device: str) -> None:
    traffic = Traffic(case, device)
    try:
        traffic.run()
        traffic.check()
    finally:
        traffic.close()


@settings(max_examples=20)
@given(case=traffic_cases())
def test_engine_traffic_matches_reference(case, device):
    run_case(case, device)


def test_growing_rt_after_a_slow_gather(device):
    """The reproduced hazard: round k's combine plane lies where round k+1's (larger rt) receive
    planes go; a fast rank must not write its next rows there while a slow rank still gathers."""
    layer = LayerSpec(torch.bfloat16, 48, (), torch.bfloat16, 96, in_workspace=True)
    steps = (((4, 4, 4), 4), ((16, 16, 16), 16), ((4, 1, 0), 4), ((16, 9, 16), 16))
    for schedule_seed in range(8):
        run_case(TrafficCase(3, 2, 6, 16, (layer,), steps, seed=7, schedule_seed=schedule_seed), device)
