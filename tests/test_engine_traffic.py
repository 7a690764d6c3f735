"""Adversarial engine traffic: rounds whose geometry changes every time, several layers on one
workspace, no host synchronisation between rounds, ranks delayed / prioritised / scheduled in a
random order. Every output is checked against the reference (tests/support/engine_traffic.py)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from a2a.ops import configs
from tests.conftest import requires_cuda
from tests.support.engine_traffic import COMPILED_LAYERS, GraphTraffic, LayerSpec, Traffic, TrafficCase, traffic_cases


@pytest.fixture(autouse=True)
def compare_in_both_places(monkeypatch):
    """The combine compares the signatures in the gather up to GATHER_COMPARE_MAX_TOKENS rows and in
    the barrier (CPU: the host's wait) above; the traffic here draws at most 8 (CPU) or 32 (GPU)
    rows a rank, so at the default (32) it would never reach the barrier's compare. At 4 both
    places run, and ranks of one round often pick differently."""
    monkeypatch.setattr(configs, "GATHER_COMPARE_MAX_TOKENS", 4)


def run_case(case: TrafficCase, device: str) -> None:
    traffic = Traffic(case, device)
    try:
        traffic.run()
        traffic.check()
    finally:
        traffic.close()


@settings(max_examples=20)
@given(data=st.data())
def test_engine_traffic_matches_reference(data, device):
    run_case(data.draw(traffic_cases(compiled=device != "cpu")), device)


def test_growing_rt_after_a_slow_gather(device):
    """The reproduced hazard: round k's combine plane lies where round k+1's (larger rt) receive
    planes go; a fast rank must not write its next rows there while a slow rank still gathers."""
    layer = LayerSpec(torch.bfloat16, 48, (), torch.bfloat16, 96, in_workspace=True)
    steps = (((4, 4, 4), 4), ((16, 16, 16), 16), ((4, 1, 0), 4), ((16, 9, 16), 16))
    for schedule_seed in range(8):
        run_case(TrafficCase(3, 2, 6, 16, (layer,), steps, seed=7, schedule_seed=schedule_seed), device)


@settings(max_examples=6)
@given(data=st.data())
def test_a_rank_that_raises_mid_run_makes_every_rank_raise(data, device, monkeypatch):
    """One rank's call raises at a random round and that rank stops: rounds before are exact, and
    every other rank ends in an error (on CUDA through the in-kernel timeout, 1 s here)."""
    monkeypatch.setenv("A2A_SIGNAL_TIMEOUT_S", "1")
    case = data.draw(traffic_cases(max_layers=2, max_steps=2, compiled=device != "cpu"))
    crash = (data.draw(st.integers(0, case.rounds - 1)), data.draw(st.integers(0, case.ep_size - 1)))
    traffic = Traffic(case, device)
    try:
        traffic.run(crash=crash)
        traffic.check_after_crash(crash[0])
    finally:
        traffic.close()


# The long runs' layers: fixed shapes, so kernels compile once; rt and counts change every round.
LONG_RUN_LAYERS = COMPILED_LAYERS
# Rounds of the long run: a few on the CPU (CI); A2A_TRAFFIC_ROUNDS sets more on a GPU.
LONG_RUN_ROUNDS = int(os.environ.get("A2A_TRAFFIC_ROUNDS", "60"))


def test_engine_traffic_long_run(device):
    """Many rounds of three layers with different payload sets on one workspace, rt = max of the
    ranks' counts every step, nothing synchronised until the end of each chunk of steps."""
    rng = random.Random(2026)
    ep_size, max_tokens = (8, 32) if device != "cpu" else (3, 8)
    steps_per_chunk = 10 if device != "cpu" else 2
    done, chunk, traffic = 0, 0, None
    try:
        while done < LONG_RUN_ROUNDS:
            steps = []
            for _ in range(steps_per_chunk):
                counts = tuple(rng.choice([0, 1, rng.randint(0, max_tokens), max_tokens]) for _ in range(ep_size))
                steps.append((counts, max(1, max(counts))))
            case = TrafficCase(ep_size, 4, 4 * ep_size + 1, max_tokens, LONG_RUN_LAYERS, tuple(steps), seed=chunk,
                               schedule_seed=chunk)  # fmt: skip
            traffic = Traffic(case, device, after=traffic)
            traffic.run()
            traffic.check()
            done += case.rounds
            chunk += 1
    finally:
        if traffic is not None:
            traffic.close()
    print(f"long run: {done} rounds of {len(LONG_RUN_LAYERS)} layers on {ep_size} ranks, all checked")


@requires_cuda
def test_graph_replays_of_engine_steps_with_device_counts():
    """Per-rank CUDA graphs of a two-layer step (different payload sets), for rt 8 and 24, replayed
    in a random order of rt with new inputs and device-side token counts, ranks delayed at random."""
    layers = LONG_RUN_LAYERS[:2]
    case = TrafficCase(4, 4, 17, 24, layers, (((1, 1, 1, 1), 1),), seed=1, schedule_seed=5)
    traffic = GraphTraffic(case, rts=(8, 24))
    generator = torch.Generator().manual_seed(11)
    rng = random.Random(3)
    try:
        for replay in range(int(os.environ.get("A2A_GRAPH_REPLAYS", "60"))):
            rt = rng.choice(traffic.rts)
            rounds = traffic.fill(rt, generator)
            traffic.replay(rt)
            traffic.check(rt, rounds, f"replay {replay} (rt {rt})")
        for moes in traffic.layers:
            for moe in moes:
                moe.synchronize()
    finally:
        traffic.close()
