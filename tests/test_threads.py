"""The thread governor (threads.py) on synthetic step times: it probes every candidate,
holds the fastest, probes again when steps slow down or after REPROBE_AFTER steps; and a
generation with it on gives what one with fixed threads gives."""

from __future__ import annotations

import pytest
import torch

from mistral7b.threads import PROBE_STEPS, RECENT, REPROBE_AFTER, ThreadGovernor, candidates


def test_candidates():
    assert candidates(1) == [1]
    assert candidates(2) == [2, 1]
    assert candidates(16) == [16, 8, 1]


class Machine:
    """Step time per thread count; `busy` models a neighbour on one core."""

    def __init__(self):
        self.busy = False
        self.calls: list[int] = []

    def seconds(self, n: int) -> float:
        if self.busy:
            return {2: 0.070, 1: 0.020}[n]
        return {2: 0.015, 1: 0.024}[n]


def _run(gov: ThreadGovernor, machine: Machine, steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        used.append(gov.threads)
        gov.record(machine.seconds(gov.threads))
    return used


def test_probes_holds_the_fastest_and_follows_a_neighbour():
    machine = Machine()
    gov = ThreadGovernor(2, set_threads=machine.calls.append)
    used = _run(gov, machine, 2 * PROBE_STEPS + 20)
    assert used[: 2 * PROBE_STEPS] == [2] * PROBE_STEPS + [1] * PROBE_STEPS
    assert set(used[2 * PROBE_STEPS:]) == {2} and gov.chosen_seconds == 0.015
    machine.busy = True                      # a neighbour arrives: steps slow down 4.7x
    used = _run(gov, machine, RECENT + 2 * PROBE_STEPS + 10)
    assert gov.probes == 2 and gov.threads == 1 and used[-1] == 1
    machine.busy = False                     # it leaves: found at the next periodic probe
    _run(gov, machine, REPROBE_AFTER + 2 * PROBE_STEPS + 1)
    assert gov.threads == 2 and gov.probes == 3
    assert machine.calls and all(n in (1, 2) for n in machine.calls)


def test_one_thread_never_probes():
    calls: list[int] = []
    gov = ThreadGovernor(1, set_threads=calls.append)
    for _ in range(10):
        gov.record(0.01)
    assert gov.threads == 1 and calls == [] and gov.probes == 0


@pytest.mark.parametrize("adaptive", [False, True])
def test_generation_with_the_governor_is_unchanged(adaptive):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "server"))
    from test_scheduler import Decoder, tiny_model

    from mistral7b.batch import run_batch
    from mistral7b.engine import Engine
    from mistral7b.sampling import SamplingParams

    net, config = tiny_model()
    engine = Engine(net, config, kv_cache_memory=2**24, kv_block_size=4)
    engine.adaptive_threads = adaptive
    before = torch.get_num_threads()
    outs = [o.token_id for _, o in run_batch(engine, [[1, 5, 9, 3]], [SamplingParams(
        max_tokens=30)], stop_ids=frozenset(), new_decoder=Decoder)]
    assert torch.get_num_threads() == before       # restored
    engine.adaptive_threads = False
    plain = [o.token_id for _, o in run_batch(engine, [[1, 5, 9, 3]], [SamplingParams(
        max_tokens=30)], stop_ids=frozenset(), new_decoder=Decoder)]
    assert outs == plain
    assert (engine._governor is not None) == adaptive
