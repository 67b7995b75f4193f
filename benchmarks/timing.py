"""How the benchmarks time a step: warm-up, inputs rotated, CUDA events or host clock with synchronisation,
several repeats, median and 20th/80th percentiles.

A measured thing is a list of `Step`s, called in turn (call i runs steps[i % len(steps)]): each holds its own
weights / gradients / inputs, so a weight that fits in a cache is not found there from the previous call just
because it is the same tensor. `Step.reset` (clearing .grad, ...) runs before every call, outside the timed region.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .allocator import page_faults

# A few copies of everything a step reads, up to this many bytes in all (about twice the largest last-level cache
# of the machines we run on: an H100's L2 is 50 MB), at most MAX_ROTATION copies.
ROTATION_BYTES = 128 << 20
MAX_ROTATION = 4


@dataclasses.dataclass
class Step:
    run: Callable[[], object]
    reset: Callable[[], None] | None = None


def rotation(nbytes: int, quick: bool = False) -> int:
    """How many copies of a step's tensors (nbytes each) to cycle through."""
    if quick:
        return 2
    return max(1, min(MAX_ROTATION, ROTATION_BYTES // max(1, nbytes)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed(NamedTuple):
    times: list[float]  # each call's time, microseconds
    faults: list[int]  # the page faults the process took during each call (benchmarks/allocator.py)


def _host_timed(calls: Sequence[Step], device: torch.device) -> Timed:
    times, faults = [], []
    for step in calls:
        if step.reset:
            step.reset()
        synchronize(device)
        faults_before = page_faults()
        t0 = time.perf_counter()
        step.run()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e6)
        faults.append(page_faults() - faults_before)
    return Timed(times, faults)


def _event_timed(calls: Sequence[Step], device: torch.device) -> Timed:
    """CUDA events around each call, no synchronisation in between: a step's time is what it takes on the GPU's
    timeline, including the gaps where the GPU waits for the host to launch the next kernel."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in calls]
    faults = []
    synchronize(device)
    for step, (begin, end) in zip(calls, events):
        if step.reset:
            step.reset()
        faults_before = page_faults()
        begin.record()
        step.run()
        end.record()
        faults.append(page_faults() - faults_before)
    synchronize(device)
    return Timed([begin.elapsed_time(end) * 1e3 for begin, end in events], faults)


def _rotated(steps: Sequence[Step], count: int, start: int) -> list[Step]:
    return [steps[i % len(steps)] for i in range(start, start + count)]


class Sampled(NamedTuple):
    blocks: list[list[float]]  # every timed call's time (microseconds), block by block
    page_faults: int  # the page faults the process took during the timed calls


def sample(steps: Sequence[Step], device: torch.device, **how) -> Sampled:
    """Times `steps` alone: sample_side_by_side() of one thing."""
    return sample_side_by_side({"": steps}, device, **how)[""]


def sample_side_by_side(
    steps_by_name: dict[str, Sequence[Step]],
    device: torch.device,
    *,
    budget_s: float,
    repeats: int = 3,
    warmup: int = 3,
    min_reps: int = 3,
    max_reps: int = 200,
) -> dict[str, Sampled]:
    """Times each thing's `steps` (rotated): `warmup` calls, one call of each step to estimate the time (so every
    copy has run once before the timing), then `repeats` blocks of rounds, round i calling each thing's step i in
    turn; every block has the same number of rounds, chosen so that all blocks take about `budget_s` per thing (at
    least `min_reps`, at most `max_reps` each). Interleaved, so that a burst of load on a shared machine or a change
    of clock falls on all the things alike and their ratios are measured side by side (timed one thing after the
    other, single cells of a 2-core VM moved up to 1.8x between two runs minutes apart)."""
    timed = _event_timed if device.type == "cuda" else _host_timed
    one_round = 0.0
    for steps in steps_by_name.values():
        timed(_rotated(steps, warmup, 0), device)
        one_round += statistics.median(timed(_rotated(steps, len(steps), warmup), device).times) / 1e6
    reps = max(min_reps, min(max_reps, int(budget_s * len(steps_by_name) / repeats / max(one_round, 1e-7))))
    names = list(steps_by_name)
    blocks = {name: [] for name in names}
    faults = dict.fromkeys(names, 0)
    for r in range(repeats):
        rounds = [steps_by_name[name][(r * reps + i) % len(steps_by_name[name])] for i in range(reps) for name in names]
        block = timed(rounds, device)
        for k, name in enumerate(names):
            blocks[name].append(block.times[k :: len(names)])
            faults[name] += sum(block.faults[k :: len(names)])
    return {name: Sampled(blocks[name], faults[name]) for name in names}


def measure(steps: Sequence[Step], device: torch.device, **how) -> dict:
    """sample(steps, device, **how), summarized (summarize())."""
    return summarize(sample(steps, device, **how), rotation=len(steps))


def measure_side_by_side(steps_by_name: dict[str, Sequence[Step]], device: torch.device, **how) -> dict[str, dict]:
    """sample_side_by_side(steps_by_name, device, **how), each thing summarized."""
    sampled = sample_side_by_side(steps_by_name, device, **how)
    return {name: summarize(sampled[name], rotation=len(steps)) for name, steps in steps_by_name.items()}


def low_percentile(blocks: list[list[float]], percent: int = 10) -> float:
    """The `percent`-th percentile over every call of sample()'s blocks: the floor of a fixed cost (a call that no
    burst of load, page fault or garbage collection hit), for costs of a few microseconds on a shared machine."""
    calls = [t for block in blocks for t in block]
    return statistics.quantiles(calls, n=100, method="inclusive")[percent - 1] if len(calls) >= 2 else calls[0]


def summarize(sampled: Sampled, *, rotation: int) -> dict:
    """The median and 20th/80th percentiles over all calls (microseconds), the number of calls per block, the
    rotation, the spread of the blocks' medians (max / min - 1) and the page faults per call (benchmarks/allocator.py
    says why they matter)."""
    samples = [t for block in sampled.blocks for t in block]
    block_medians = [statistics.median(block) for block in sampled.blocks]
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) >= 2 else samples * 9
    spread = max(block_medians) / min(block_medians) - 1 if min(block_medians) > 0 else math.nan
    return {
        "median_us": statistics.median(samples),
        "p20_us": q[1],
        "p80_us": q[7],
        "reps": len(sampled.blocks[0]),
        "repeats": len(sampled.blocks),
        "rotation": rotation,
        "spread": spread,
        "faults_per_call": sampled.page_faults / len(samples),
    }
