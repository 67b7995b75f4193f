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


def _host_samples(steps: Sequence[Step], device: torch.device, count: int, start: int) -> list[float]:
    samples = []
    for i in range(start, start + count):
        step = steps[i % len(steps)]
        if step.reset:
            step.reset()
        synchronize(device)
        t0 = time.perf_counter()
        step.run()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


def _event_samples(steps: Sequence[Step], device: torch.device, count: int, start: int) -> list[float]:
    """CUDA events around each call, no synchronisation in between: a step's time is what it takes on the GPU's
    timeline, including the gaps where the GPU waits for the host to launch the next kernel."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    synchronize(device)
    for i, (begin, end) in zip(range(start, start + count), events):
        step = steps[i % len(steps)]
        if step.reset:
            step.reset()
        begin.record()
        step.run()
        end.record()
    synchronize(device)
    return [begin.elapsed_time(end) * 1e3 for begin, end in events]


class Sampled(NamedTuple):
    blocks: list[list[float]]  # every timed call's time (microseconds), block by block
    page_faults: int  # the page faults the process took while the blocks ran (resets included)


def sample(
    steps: Sequence[Step],
    device: torch.device,
    *,
    budget_s: float,
    repeats: int = 3,
    warmup: int = 3,
    min_reps: int = 3,
    max_reps: int = 200,
) -> Sampled:
    """Times `steps` (rotated): `warmup` calls, one call of each step to estimate the time (so every copy has run
    once before the timing), then `repeats` blocks of a number of calls chosen so that all blocks take about
    `budget_s` (at least `min_reps`, at most `max_reps` each)."""
    _host_samples(steps, device, warmup, 0)
    one = statistics.median(_host_samples(steps, device, len(steps), warmup)) / 1e6
    reps = max(min_reps, min(max_reps, int(budget_s / repeats / max(one, 1e-7))))
    timed = _event_samples if device.type == "cuda" else _host_samples
    faults_before = page_faults()
    blocks = [timed(steps, device, reps, r * reps) for r in range(repeats)]
    return Sampled(blocks, page_faults() - faults_before)


def measure(steps: Sequence[Step], device: torch.device, **how) -> dict:
    """sample(steps, device, **how), summarized: the median and 20th/80th percentiles over all calls
    (microseconds), the number of calls per block, the rotation, the spread of the blocks' medians (max / min - 1)
    and the page faults per call (benchmarks/allocator.py says why they matter)."""
    blocks, faults = sample(steps, device, **how)
    calls = [t for block in blocks for t in block]
    return summarize(
        calls,
        reps=len(blocks[0]),
        repeats=len(blocks),
        rotation=len(steps),
        block_medians=[statistics.median(block) for block in blocks],
        faults_per_call=faults / len(calls),
    )


def low_percentile(blocks: list[list[float]], percent: int = 10) -> float:
    """The `percent`-th percentile over every call of sample()'s blocks: the floor of a fixed cost (a call that no
    burst of load, page fault or garbage collection hit), for costs of a few microseconds on a shared machine."""
    calls = [t for block in blocks for t in block]
    return statistics.quantiles(calls, n=100, method="inclusive")[percent - 1] if len(calls) >= 2 else calls[0]


def summarize(
    samples: list[float],
    *,
    reps: int,
    repeats: int,
    rotation: int,
    block_medians: list[float],
    faults_per_call: float,
) -> dict:
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) >= 2 else samples * 9
    spread = max(block_medians) / min(block_medians) - 1 if min(block_medians) > 0 else math.nan
    return {
        "median_us": statistics.median(samples),
        "p20_us": q[1],
        "p80_us": q[7],
        "reps": reps,
        "repeats": repeats,
        "rotation": rotation,
        "spread": spread,
        "faults_per_call": faults_per_call,
    }
