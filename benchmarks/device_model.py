"""The device-time model of sn_ext's GPU kernels: every number it assumes, stated once with its source, and the
arithmetic that turns a launch plan into modelled device time. Nothing here runs on a GPU.

A plan (benchmarks/cuda_plan.py for the CUDA kernels, benchmarks/triton_model.py for the Triton ones) describes an
op as phases. A phase moves some bytes, and each of its blocks (a thread block; a Triton program) walks a chain of
dependent steps: global-memory round trips (DRAM or L2), block-wide sums, __syncthreads. A phase takes

    max(bytes / copy bandwidth, the slowest block's chain)

and an op the sum of its phases, plus its grid barriers (cooperative launches) and its launches. Each latency is a
range (low, high); the model evaluates both ends, every latency at its low end, then every one at its high end.

    from benchmarks import device_model
    device_model.modelled_step_us("cuda", (512, 512, 3, 3), "float32", "h100")        # fwd + bwd, (low, high) us
    device_model.gpu_key(torch.cuda.get_device_name())                                # "h100" or "h200"

The tables for today's kernels: python -m benchmarks.model_tables (benchmarks/results/model/).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Assumptions. Sources: ../shared/reference/cuda_desk_review_2.md ("Model inputs", resources and SASS) and
# triton_desk_review_2.md (sections 2-4), both at b9d22d8, both without a GPU; the copy bandwidths as measured on
# the project's GPU machines (the machines' descriptions). A first GPU run replaces them with measurements.


@dataclasses.dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    sms: int  # streaming multiprocessors
    copy_bytes_per_us: float  # a device copy's read + write bytes per microsecond
    l2_bytes: int


GPUS = {
    # 132 SMs: H100 SXM and H200 (cuda_desk_review_2: "cooperative grid, 132 SMs"). Copy: read + write bytes of a
    # device-to-device copy, 3.0 TB/s (H100) and 4.3 TB/s (H200), measured on these machines. L2: 50 MB (H100 SXM,
    # NVIDIA's whitepaper) and 60 MB (H200, as the reviews and the lead's brief state: not checked on the device;
    # torch.cuda.get_device_properties().L2_cache_size on the first GPU run settles it).
    "h100": Gpu("h100", "NVIDIA H100 80GB HBM3", 132, 3.0e6, 50 * 10**6),
    "h200": Gpu("h200", "NVIDIA H200", 132, 4.3e6, 60 * 10**6),
}

# What each step of a chain costs, in microseconds, (low, high). The same on both GPUs (the reviews give one set).
LATENCY_US = {
    # A dependent round trip to device memory while the memory system is loaded (cuda_desk_review_2's "loaded DRAM
    # latency"): a grid launch's first read of a weight-sized tensor, and re-reads of tensors that do not fit in L2.
    "dram": (0.7, 1.2),
    # A dependent round trip served by L2: workspaces, vectors and re-reads of a weight that fits in L2
    # (cuda_desk_review_2). triton_desk_review_2 took ~0.4 us for a one-program Triton kernel's round trip; this
    # model uses one L2 latency for both backends.
    "l2": (0.15, 0.3),
    # One block_sum (common.cuh): 3 BAR.SYNC and 10 SHFL (cuda_desk_review_2, from the SASS); also a Triton tl.sum
    # across the warps of a program.
    "block_sum": (0.2, 0.3),
    # One __syncthreads (or Triton's debug_barrier) alone: a quarter of block_sum, which holds three of them and the
    # shuffles (an assumption derived from the block_sum figure; no review gives it).
    "sync": (0.05, 0.075),
    # One grid-wide barrier of a cooperative launch (cuda_desk_review_2).
    "grid_barrier": (1.0, 2.0),
    # One kernel launch's device-side cost in a stream of back-to-back launches (cuda_desk_review_2: 2-4 us;
    # triton_desk_review_2 took ~2.5 us per eager Triton kernel).
    "launch": (2.0, 4.0),
}
TERMS = tuple(LATENCY_US)
# Where a one-block launch (the CUDA kernels' class of weights up to 65,536 elements; Triton's one-program path) finds
# its weight on its first read: in L2. One block cannot load the memory system, and a weight of at most 256 KB is
# likely still in L2 from its last use (the previous train step; D runs twice per D step); the review's figures for
# these layers assume as much (cuda_desk_review_2: 64 serial rows of 64x3x3x3 in 25-35 us, ~0.4-0.55 us per row:
# an L2 round trip and a block_sum). Grid launches read their weights from DRAM first. The first GPU run's 64x3x3x3
# and 512x512x3x3 timings check both.
ONE_BLOCK_FIRST_READ = "l2"
TERM_NAMES = {
    "dram": "DRAM round trips",
    "l2": "L2 round trips",
    "block_sum": "block sums",
    "sync": "__syncthreads",
    "grid_barrier": "grid barriers",
    "launch": "launches",
    "bandwidth": "bandwidth",
}

# Host time per Triton launch not in the device model: Triton's device and stream lookups, launch_metadata and its
# C launcher (triton_desk_review_2 section 2, measured with launches stubbed plus the GPU-only part estimated). For
# a GPU check that puts eager wall time beside the device model.
TRITON_HOST_US_PER_LAUNCH = (4.0, 7.0)

# Loads in flight per loop iteration where the SASS keeps fewer than the code asks for (cuda_desk_review_2,
# "16-byte loads issued before the first FP use"): the float32 fused wide-row y pass unrolls 2 segments in the
# source, but ptxas keeps one LDG.E.128 in flight at the 80-register cap.
CUDA_WIDE_Y_PACKS_IN_FLIGHT = 1
# Loops that the source leaves to the compiler (no #pragma unroll) and that only load and add: nvcc unrolls them by
# 4, 4 loads in flight (cuda_desk_review_2: normalize_block's loop over splits). Triton's `_raw` loop over partial
# sums likewise (triton_desk_review_2: "unrolled x4 by ptxas, 8 LDG per trip").
COMPILER_UNROLL = 4
# A row of at most this many bytes shares its cache line with the next rows: a block that walks a contiguous
# weight's rows one after another (the fused round's one-segment rows) pays one round trip per line, and its loads
# of the rows after the first in a line hit L1 (~30 cycles: counted as free). The L1/L2 line size of NVIDIA GPUs
# (CUDA C++ Programming Guide, "Global Memory").
CACHE_LINE_BYTES = 128
# Loops that load and then store through another pointer: one round trip per iteration (the compiler cannot move
# the next load above a store that may alias it). Streaming loops with one scalar load per thread likewise.

# Triton programs resident per SM (a grid larger than SMs x this runs in waves). The pipelined kernels (matvec,
# rmatvec, gram, lambda: 3 stages of a 32 x 128 tile in shared memory, 33-66 KB, triton_desk_review_2 section 3):
# 3; the element-wise ones (divide, backward: 4 warps, no shared memory, 28-80 registers): 8 (65536 registers /
# (128 threads x 64)). An assumption from the resource figures, not a measured occupancy.
TRITON_PIPELINED_PROGRAMS_PER_SM = 3
TRITON_ELEMENTWISE_PROGRAMS_PER_SM = 8

# The floor of a train step (forward + backward): 7 weight-sized passes (the forward reads W twice and writes W_sn;
# the backward reads G twice and W_sn once and writes grad_W) at the copy bandwidth, and 2 launches. Plain
# `W * 1.0` with autograd: 2 launches (the multiply, its backward) and 2 reads + 2 writes.
FLOOR_PASSES = 7
FLOOR_LAUNCHES = 2
PLAIN_PASSES = 4
PLAIN_LAUNCHES = 2

ENDS = (0, 1)  # LATENCY_US's low and high ends
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def dtype_name(dtype) -> str:
    """'float32' for 'float32', torch.float32 or 'torch.float32'."""
    return str(dtype).removeprefix("torch.")


def gpu_key(device_name: str) -> str:
    """The device model's key, "h100" or "h200", for a torch.cuda.get_device_name() string ("NVIDIA H100 80GB HBM3",
    "NVIDIA H200"): the SXM parts of the project's machines (an H100 PCIe, 114 SMs and 2 TB/s, has no model)."""
    name = device_name.upper()
    for key in GPUS:
        if key.upper() in name and "PCIE" not in name:
            return key
    raise ValueError(f"no device model for {device_name!r}: the model knows {', '.join(g.name for g in GPUS.values())}")


def latencies(end: int) -> np.ndarray:
    """The cost of one of each term (TERMS order) at one end of the ranges."""
    return np.array([LATENCY_US[t][end] for t in TERMS])


def terms(**counts: float) -> np.ndarray:
    """A chain as counts of each term, e.g. terms(dram=3, block_sum=3)."""
    return np.array([counts.get(t, 0.0) for t in TERMS], dtype=float)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_trips(loads: int, in_flight: int) -> int:
    """Dependent round trips for `loads` loads per thread, `in_flight` of them issued together."""
    return ceil_div(max(0, loads), max(1, in_flight))


def walk(chains: np.ndarray, blocks: int) -> np.ndarray:
    """The chain of each of `blocks` blocks that take virtual blocks b, b + blocks, ... in turn (for_each_virtual_block;
    Triton: programs in waves): `chains` is (virtual blocks, len(TERMS)), the result (blocks, len(TERMS))."""
    chains = np.asarray(chains, dtype=float).reshape(-1, len(TERMS))
    pad = (-len(chains)) % blocks
    if pad:
        chains = np.vstack([chains, np.zeros((pad, len(TERMS)))])
    return chains.reshape(-1, blocks, len(TERMS)).sum(axis=0)


@dataclasses.dataclass
class Phase:
    """One phase of a launch (or, for Triton, one launch): the bytes it moves and each block's chain."""

    name: str
    bytes: float
    weight_passes: float  # weight-sized reads and writes (a pass each)
    chains: np.ndarray  # (blocks, len(TERMS)): each block's chain, its virtual blocks' chains added
    virtual_blocks: int

    def chain_us(self, end: int) -> float:
        return float((self.chains @ latencies(end)).max()) if len(self.chains) else 0.0

    def bandwidth_us(self, gpu: Gpu) -> float:
        return self.bytes / gpu.copy_bytes_per_us

    def time_us(self, gpu: Gpu, end: int) -> float:
        return max(self.bandwidth_us(gpu), self.chain_us(end))

    def slowest(self, end: int) -> np.ndarray:
        """The slowest block's chain (term counts) at one end."""
        return self.chains[int(np.argmax(self.chains @ latencies(end)))]


@dataclasses.dataclass
class Op:
    """One op's launches: its phases and what separates them (launches, grid barriers, __syncthreads)."""

    op: str
    launch: str  # "one block", "cooperative", "phased" (CUDA); "triton"
    grid: int  # blocks of the launch (CUDA); the largest grid (Triton)
    phases: list[Phase]
    launches: int
    grid_barriers: int = 0
    syncs: int = 0  # between the phases of a one-block launch

    def overhead(self) -> np.ndarray:
        return terms(launch=self.launches, grid_barrier=self.grid_barriers, sync=self.syncs)

    def time_us(self, gpu: Gpu) -> tuple[float, float]:
        return tuple(
            sum(p.time_us(gpu, end) for p in self.phases) + float(self.overhead() @ latencies(end)) for end in ENDS
        )

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.phases)

    @property
    def weight_passes(self) -> float:
        return sum(p.weight_passes for p in self.phases)

    def contributions(self, gpu: Gpu) -> dict[str, float]:
        """Each term's share of the modelled time at the middle of the ranges: "bandwidth" for the phases that
        stream at the copy bandwidth, the chain terms of the others' slowest blocks, and the overheads."""
        mid = (latencies(0) + latencies(1)) / 2
        out = dict.fromkeys([*TERMS, "bandwidth"], 0.0)
        for p in self.phases:
            chain = p.chains[int(np.argmax(p.chains @ mid))] if len(p.chains) else terms()
            if p.bandwidth_us(gpu) >= float(chain @ mid):
                out["bandwidth"] += p.bandwidth_us(gpu)
            else:
                for name, value in zip(TERMS, chain * mid):
                    out[name] += float(value)
        for name, value in zip(TERMS, self.overhead() * mid):
            out[name] += float(value)
        return out


def dominant(ops: list[Op], gpu: Gpu) -> str:
    """The largest term of a step (its ops together), with its share: e.g. "L2 round trips (61%)"."""
    total: dict[str, float] = {}
    for op in ops:
        for name, value in op.contributions(gpu).items():
            total[name] = total.get(name, 0.0) + value
    name = max(total, key=total.get)
    return f"{TERM_NAMES[name]} ({100 * total[name] / sum(total.values()):.0f}%)"


def step_us(ops: list[Op], gpu: Gpu) -> tuple[float, float]:
    """The modelled device time of ops run one after another, (low, high)."""
    times = [op.time_us(gpu) for op in ops]
    return tuple(sum(t[end] for t in times) for end in ENDS)


def weight_bytes(shape: tuple[int, ...], dtype) -> int:
    return math.prod(shape) * ITEMSIZE[dtype_name(dtype)]


def _streams(nbytes: float, launches: int, gpu: str | Gpu) -> tuple[float, float]:
    """`nbytes` at the copy bandwidth plus `launches` launches, (low, high)."""
    g = GPUS[gpu] if isinstance(gpu, str) else gpu
    return tuple(nbytes / g.copy_bytes_per_us + launches * LATENCY_US["launch"][end] for end in ENDS)


def floor_us(shape: tuple[int, ...], dtype, gpu: str | Gpu) -> tuple[float, float]:
    """The floor of a train step: 7 weight-sized passes at the copy bandwidth and 2 launches, (low, high)."""
    return group_floor_us(weight_bytes(shape, dtype), gpu)


def group_floor_us(nbytes: float, gpu: str | Gpu) -> tuple[float, float]:
    """The floor of a train step of weights of `nbytes` in all, computed together (grouped): 7 passes over them and
    2 launches."""
    return _streams(FLOOR_PASSES * nbytes, FLOOR_LAUNCHES, gpu)


def copies_us(shape: tuple[int, ...], dtype, gpu: str | Gpu, copies: float = FLOOR_PASSES / 2) -> float:
    """`copies` device copies of the weight at the copy bandwidth (3.5: the floor's 7 passes, no launch)."""
    g = GPUS[gpu] if isinstance(gpu, str) else gpu
    return 2 * copies * weight_bytes(shape, dtype) / g.copy_bytes_per_us


def plain_us(shape: tuple[int, ...], dtype, gpu: str | Gpu) -> tuple[float, float]:
    """Plain `W * 1.0` forward + backward: 2 launches, 2 reads + 2 writes, (low, high)."""
    return _streams(PLAIN_PASSES * weight_bytes(shape, dtype), PLAIN_LAUNCHES, gpu)


def modelled_step_us(
    backend: str,
    shape: tuple[int, ...],
    dtype,
    gpu: str,
    round_mode: str = "fused",
    v_first: bool = False,
    n: int = 1,
    dim: int = 0,
    launch: str = "cooperative",
) -> tuple[float, float]:
    """Modelled device time (us, (low, high)) of one train step, forward with n power iterations then backward, of
    one layer's spectral norm on `backend` ("cuda" or "triton"; `round_mode` is the CUDA backend's
    SN_EXT_CUDA_ROUND, `launch` its SN_EXT_CUDA_LAUNCH) on `gpu` ("h100", "h200": gpu_key), for a GPU check to
    print beside what it measured."""
    g = GPUS[gpu]
    if backend == "cuda":
        from . import cuda_plan

        w = cuda_plan.Weight.of(shape, ITEMSIZE[dtype_name(dtype)], dim)
        return step_us(cuda_plan.train_step([w], g, n, round_mode, v_first, launch), g)
    if backend == "triton":
        from . import triton_model

        return step_us(triton_model.train_step(shape, dtype_name(dtype), g, n, v_first, dim), g)
    raise ValueError(f"no device model for backend {backend!r}: 'cuda' or 'triton'")
