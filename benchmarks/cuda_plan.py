"""What the CUDA kernels do per op and weight shape, modelled from their launch plan without a GPU: size class
(one block, or a grid and its size), launches (cooperative; phased), grid-wide barriers, the bytes each op moves
against the minimum a fused spectral norm must move, and, per phase, the chain of dependent steps each block walks
(the critical path), turned into modelled device time by benchmarks/device_model.py.

    python -m benchmarks.cuda_plan                 # the baseline shapes, float32, one power iteration, an H100/H200
    python -m benchmarks.cuda_plan --sms 132 --dtype bfloat16 --shape 300x200x3x3
    python -m benchmarks.cuda_plan --round split   # the split u-first round (SN_EXT_CUDA_ROUND=split; or split-scalar)
    python -m benchmarks.cuda_plan --phases --gpu h200 --v-first --shape 4096x4096   # per phase: chain, bytes, us

The minimum, in weight-sized passes: the forward reads W twice (power iteration, then W / sigma: W v and W^T (W v)
in one pass) and writes W_sn once; the backward reads G twice (<G, W_sn>, then the correction) and W_sn once and
writes grad_W once; 7 passes per train step. "passes" counts what the kernels do: the fused round (the default,
SN_EXT_CUDA_ROUND=fused) reads W once, or twice for rows wider than one register-held segment (the second read from
L2); the split round reads W for W v and again for W^T u, in 16-byte packs where the rows are (a contiguous weight
whose rows are a whole number of packs; its plans then count threads in packs), else, and under
SN_EXT_CUDA_ROUND=split-scalar, one element at a time.
Bytes are what the kernels read and write (MB), wherever it is served from: a weight that fits in the GPU's L2
(50-60 MB on an H100/H200) is read again from there, not from device memory.

The chains mirror the device code of csrc/cuda/common.cuh phase by phase (the comments name each function): a
block's loads issued together cost one round trip (DRAM for an op's first read of a weight-sized tensor, L2 for
workspaces, vectors and re-reads of weights that fit in L2), then its block sums and __syncthreads; a block that
walks several virtual blocks adds their chains. The plan's constants and split rules are those of
csrc/cuda/common.cuh (tests/test_benchmarks.py checks the constants against it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from . import device_model as dm
from .records import markdown_table

# csrc/cuda/common.cuh, block_walk.h (the plans), fused_round.cuh, elementwise.cuh, split_round.cuh
THREADS = 256
MIN_BLOCKS_PER_SM = 2
TARGET_BLOCKS = 256
MIN_COLS_PER_SPLIT = 2048
MIN_ROWS_PER_THREAD = 8
MAX_GRID_Y = 65535
ONE_BLOCK_MAX_NUMEL = 1 << 16  # the split round's one-block class
ELEMENTS_PER_THREAD = 8
MAX_LAMBDA_BLOCKS = 4 * THREADS
LAMBDA_ITEMS_PER_THREAD = 8
RMATVEC_SCALAR_UNROLL = 4  # rmatvec_block_scalar's `#pragma unroll 4`
SPLIT_UNROLL = 4
GROUP_LAYERS = 12
ELEMENTWISE_THREADS_PER_SM = 2048  # elementwise_blocks: multiprocessor_count() * (2048 / kThreads)
STREAM_PACKS = 4  # kStreamPacks: W / sigma, the correction: 16-byte packs in flight per thread
STREAM_PAIR_PACKS = 4  # kStreamPairPacks: <G, W_sn>, per tensor
FUSED_BYTES = 64  # kFusedBytes: a thread's op-math bytes of a row per step, packed rows
FUSED_ELEMENTWISE_BYTES = 16  # kFusedElementwiseBytes: element-wise rows
REDUCE_PER_THREAD = 8  # kReducePerThread: partial rows a column-sums thread adds at most
REDUCE_MAX_GROUPS = 32  # kReduceMaxGroups
REDUCE_UNROLL = 4  # column_sums_block's `#pragma unroll 4`
VECTOR_BATCH = 8  # kVectorBatch: finish_elements' elements in flight per thread
NOMINAL_GRID = 264  # kNominalGrid: 132 SMs x 2
# block_walk.h's scenarios for the plans' choices (tests/test_benchmarks.py checks them against device_model): the
# latencies (ns) at the low and at the high end of their ranges, on an H100 and on an H200 (copy bytes per ns).
SCENARIO_KEYS = ("l2", "dram", "block_sum", "sync", "grid_barrier", "copy")
SCENARIOS = [
    dict(zip(SCENARIO_KEYS, values))
    for values in (
        (150.0, 700.0, 200.0, 50.0, 1000.0, 3000.0),
        (300.0, 1200.0, 300.0, 75.0, 2000.0, 3000.0),
        (150.0, 700.0, 200.0, 50.0, 1000.0, 4300.0),
        (300.0, 1200.0, 300.0, 75.0, 2000.0, 4300.0),
    )
]
CHOICE_L2_BYTES = 50e6
MIN_PASSES = {"forward": 3, "backward": 4}

SHAPES = ["64x3x3x3", "128x128x3x3", "256x256x3x3", "512x512x3x3", "1024x1024", "1024x1024x3x3", "4096x4096"]
ITEMSIZE = dm.ITEMSIZE
ROUND_MODES = ("fused", "split", "split-scalar")
LAUNCH_MODES = ("cooperative", "phased")


def _pow2_at_least(n: int, cap: int) -> int:
    p = 1
    while p < n and p < cap:
        p <<= 1
    return p


ceil_div = dm.ceil_div


def matvec_unroll(pack: int) -> int:
    """Packs of W (and of x) a matvec thread loads before using any (matvec_unroll)."""
    return SPLIT_UNROLL // 2 if pack == 8 else SPLIT_UNROLL


@dataclasses.dataclass(frozen=True)
class Weight:
    """A contiguous, 16-byte aligned weight as the kernels view it for `dim`: (outer, rows, inner) (as_matrix3d),
    Wm[i, o * inner + r] = W3[o][i][r]."""

    outer: int
    rows: int
    inner: int
    itemsize: int

    @classmethod
    def of(cls, shape: tuple[int, ...], itemsize: int, dim: int = 0) -> Weight:
        dim %= len(shape)
        return cls(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]), itemsize)

    @property
    def cols(self) -> int:
        return self.outer * self.inner

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def acc(self) -> int:
        """Bytes of the sums (at::opmath_type: float, double for float64)."""
        return 8 if self.itemsize == 8 else 4

    @property
    def pack(self) -> int:
        return 16 // self.itemsize

    @property
    def rows_packable(self) -> bool:
        """rows_packable for a contiguous tensor: rows contiguous (outer 1, or one row) and whole packs."""
        return (
            (self.outer == 1 or self.rows == 1)
            and self.cols % self.pack == 0
            and (self.rows == 1 or self.inner % self.pack == 0)
        )

    @property
    def lines_packable(self) -> bool:
        """packable(t, line_packs=true) for a contiguous tensor: a line (inner) a whole number of packs."""
        return self.inner % self.pack == 0

    @property
    def fused_packable(self) -> bool:
        """fused_packable for a contiguous tensor: rows_packable, or lines holding whole runs of a thread's
        FUSED_BYTES of op-math sums' worth of columns (a ConvTranspose's 4x4 kernels seen through dim 1)."""
        return self.rows_packable or self.inner % (FUSED_BYTES // self.acc) == 0


@dataclasses.dataclass(frozen=True)
class Split:
    """A split product's plan (SplitPlan): threads per row or column group, splits of the reduced dimension, their
    length, and blocks along the other dimension (grid.x)."""

    lanes: int
    splits: int
    chunk: int
    blocks_x: int

    @property
    def virtual_blocks(self) -> int:
        return self.blocks_x * self.splits


def split_evenly(reduced: int, splits: int, align: int = 1) -> tuple[int, int]:
    """(splits, chunk) of block_walk::split_evenly."""
    chunk = ceil_div(ceil_div(reduced, splits), align) * align
    return ceil_div(reduced, chunk), chunk


def plan_matvec(w: Weight, pack: int) -> Split:
    """plan_matvec: `pack` elements per 16-byte pack on the packed path, else 1."""
    splits = max(1, min(ceil_div(TARGET_BLOCKS, w.rows), ceil_div(w.cols, MIN_COLS_PER_SPLIT), MAX_GRID_Y))
    per_thread = 1 if pack == 1 else pack * matvec_unroll(pack)
    lanes = _pow2_at_least(ceil_div(ceil_div(w.cols, splits), per_thread), THREADS)
    splits, chunk = split_evenly(w.cols, splits, pack)
    return Split(lanes, splits, chunk, ceil_div(w.rows, THREADS // lanes))


def plan_rmatvec(w: Weight, pack: int) -> Split:
    """plan_rmatvec."""
    col_packs = w.cols // pack
    lanes = _pow2_at_least(col_packs, THREADS)
    col_blocks = ceil_div(col_packs, lanes)
    row_lanes = THREADS // lanes
    wanted = min(ceil_div(TARGET_BLOCKS, col_blocks), ceil_div(w.rows, row_lanes * MIN_ROWS_PER_THREAD), MAX_GRID_Y)
    splits, chunk = split_evenly(w.rows, max(1, wanted))
    return Split(lanes, splits, chunk, col_blocks)


def matvec_blocks(rows: int, cols: int, pack: int = 1) -> tuple[int, int]:
    """(virtual blocks, splits) of W v."""
    plan = plan_matvec(Weight(1, rows, cols, 4), pack)
    return plan.virtual_blocks, plan.splits


def rmatvec_blocks(rows: int, cols: int, pack: int = 1) -> tuple[int, int]:
    """(virtual blocks, splits) of W^T u."""
    plan = plan_rmatvec(Weight(1, rows, cols, 4), pack)
    return plan.virtual_blocks, plan.splits


# ---------------------------------------------------------------------------------------------------------------
# The fused round's plan and the backward's (csrc/cuda/block_walk.h: the same arithmetic, the same order of
# floating-point operations, so that the same choices come out; tests/test_benchmarks.py compares them with the
# C++ on a set of shapes).


@dataclasses.dataclass(frozen=True)
class FusedPlan:
    """block_walk::FusedPlan: a thread's `units` loads of `unit` elements per row, `threads` threads per row,
    `rows_per_step` rows per step, `segments` per row (> 1: wide), `rows_per_block`, `blocks` (1: dense), and the
    column sums' `reduce_groups` threads per column and `reduce_blocks` virtual blocks."""

    unit: int
    units: int
    threads: int
    rows_per_step: int
    segments: int
    rows_per_block: int = 0
    blocks: int = 0
    reduce_groups: int = 1
    reduce_blocks: int = 0

    @property
    def dense(self) -> bool:
        return self.blocks == 1

    @property
    def reduce_columns(self) -> int:
        return THREADS // self.reduce_groups


def _at_least(chain_ns: float, nbytes: float, x: dict) -> float:
    return chain_ns if chain_ns > nbytes / x["copy"] else nbytes / x["copy"]


def _in_all_scenarios(time) -> float:
    total = 0.0
    for x in SCENARIOS:
        total += time(x)
    return total


def stream_trips(elements: int, unit: int, packs: int = STREAM_PACKS) -> float:
    """Round trips of a block's threads streaming `elements` (`packs` packs of `unit` elements in flight each)."""
    return float(ceil_div(ceil_div(elements, unit), THREADS * packs))


def fused_layout(cols: int, itemsize: int, packed: bool) -> FusedPlan:
    acc = 8 if itemsize == 8 else 4
    unit = 16 // itemsize if packed else 1
    units = (FUSED_BYTES if packed else FUSED_ELEMENTWISE_BYTES) // acc // unit
    col_units = ceil_div(cols, unit)
    threads = _pow2_at_least(ceil_div(col_units, units), THREADS)
    return FusedPlan(unit, units, threads, THREADS // threads, ceil_div(col_units, threads * units))


def with_row_blocks(p: FusedPlan, rows: int, cols: int, min_rows: int) -> FusedPlan:
    rows_per_block = ceil_div(max(min_rows, p.rows_per_step), p.rows_per_step) * p.rows_per_step
    blocks = ceil_div(rows, rows_per_block)
    groups = 1 if blocks == 1 else _pow2_at_least(ceil_div(blocks, REDUCE_PER_THREAD), REDUCE_MAX_GROUPS)
    reduce_blocks = 0 if blocks == 1 else ceil_div(cols, THREADS // groups)
    return dataclasses.replace(
        p, rows_per_block=rows_per_block, blocks=blocks, reduce_groups=groups, reduce_blocks=reduce_blocks
    )


def fused_pass_ns(p: FusedPlan, rows: int, trip_ns: float, x: dict) -> float:
    pairs = ceil_div(ceil_div(rows, p.rows_per_step), 2)
    total = x["l2"] + 2 * x["sync"] + x["block_sum"]
    if p.segments == 1:
        return total + pairs * (trip_ns + (x["sync"] if p.threads > 32 else 0))
    return total + pairs * (p.segments * trip_ns + x["sync"]) + x["sync"] + pairs * p.segments * x["l2"]


def dense_forward_ns(p: FusedPlan, rows: int, cols: int, itemsize: int, x: dict) -> float:
    finish_trips = (
        stream_trips(rows * cols, 16 // itemsize)
        + stream_trips(rows, 1, VECTOR_BATCH)
        + stream_trips(cols, 1, VECTOR_BATCH)
    )
    return fused_pass_ns(p, rows, x["l2"], x) + x["l2"] + finish_trips * x["l2"]


def spread_forward_ns(p: FusedPlan, rows: int, cols: int, itemsize: int, x: dict) -> float:
    acc = 8 if itemsize == 8 else 4
    w = float(rows) * cols * itemsize
    partial = float(p.blocks) * cols * acc
    pass_ = _at_least(fused_pass_ns(p, p.rows_per_block, x["dram"], x), (2 if p.segments > 1 else 1) * w + partial, x)
    reduce_waves = float(ceil_div(p.reduce_blocks, NOMINAL_GRID))
    per_thread = float(ceil_div(ceil_div(p.blocks, p.reduce_groups), 4))
    reduce = _at_least(
        x["l2"] + x["block_sum"] + reduce_waves * (per_thread * x["l2"] + 3 * x["sync"] + x["block_sum"]), partial, x
    )
    waves = float(ceil_div(p.blocks, NOMINAL_GRID))
    divide_trips = waves * stream_trips(p.rows_per_block * cols, 16 // itemsize)
    divide_ns = x["l2"] if 2 * w <= CHOICE_L2_BYTES else x["dram"]
    normalize = _at_least(x["l2"] + x["block_sum"] + divide_trips * divide_ns, 2 * w, x)
    return pass_ + reduce + normalize + 2 * x["grid_barrier"]


def plan_fused(rows: int, cols: int, itemsize: int, packed: bool) -> FusedPlan:
    """block_walk::plan_fused: dense (one block of rows) where its time, summed over the model's scenarios, is no
    longer than the grid's, else the rows per block the model finds fastest."""
    layout = fused_layout(cols, itemsize, packed)
    best = with_row_blocks(layout, rows, cols, rows)
    if rows <= layout.rows_per_step:
        return best
    dense = best
    best_ns = _in_all_scenarios(lambda x: dense_forward_ns(dense, rows, cols, itemsize, x))
    min_rows = ceil_div(rows, TARGET_BLOCKS)
    while True:
        spread = with_row_blocks(layout, rows, cols, min_rows)
        if spread.blocks == 1:
            break
        t = _in_all_scenarios(lambda x, spread=spread: spread_forward_ns(spread, rows, cols, itemsize, x))
        if t < best_ns:
            best, best_ns = spread, t
        min_rows *= 2
    return best


def fused_plan_of(w: Weight, packed: bool) -> FusedPlan:
    return plan_fused(w.rows, w.cols, w.itemsize, packed)


def dense_backward_ns(numel: int, itemsize: int, x: dict) -> float:
    trips = stream_trips(numel, 16 // itemsize, STREAM_PAIR_PACKS) + stream_trips(numel, 16 // itemsize)
    return trips * x["l2"] + x["block_sum"] + x["sync"]


def spread_backward_ns(numel: int, itemsize: int, blocks: int, x: dict) -> float:
    nbytes = 2.0 * numel * itemsize
    waves = float(ceil_div(blocks, NOMINAL_GRID))
    piece = ceil_div(numel, blocks)
    lambda_trips = waves * stream_trips(piece, 16 // itemsize, STREAM_PAIR_PACKS)
    trips = waves * stream_trips(piece, 16 // itemsize)
    return (
        _at_least(lambda_trips * x["dram"] + waves * x["block_sum"], nbytes, x)
        + _at_least(x["l2"] + x["block_sum"] + trips * x["l2"], nbytes, x)
        + x["grid_barrier"]
    )


def lambda_blocks(numel: int, itemsize: int = 4) -> int:
    """block_walk::lambda_blocks_for: the backward's pieces (1: a dense layer, one block)."""
    blocks = max(1, min(ceil_div(numel, THREADS * LAMBDA_ITEMS_PER_THREAD), MAX_LAMBDA_BLOCKS))
    if blocks == 1:
        return 1
    dense = _in_all_scenarios(lambda x: dense_backward_ns(numel, itemsize, x))
    spread = _in_all_scenarios(lambda x: spread_backward_ns(numel, itemsize, blocks, x))
    return 1 if dense <= spread else blocks


def piece_chunk(n: int, pieces: int, align: int) -> int:
    return ceil_div(ceil_div(n, pieces), align) * align


def fused_steps(n: int, v_first: bool, dense: bool) -> int:
    """block_walk::fused_steps: u-first (pass | sums) x n | finish; v-first one pass more; dense layers no sums."""
    if n == 0:
        return 2
    return (n + 1 if v_first else n) + (0 if dense else n) + 1


def fused_step(s: int, n: int, v_first: bool, dense: bool) -> tuple[str, str]:
    """block_walk::fused_step: (phase, pass) of step s: ("pass", "fused" | "y" | "z"), ("sums", "fused" | "z": the
    pass before), ("finish", "")."""
    last = fused_steps(n, v_first, dense) - 1
    if n == 0:
        return ("pass", "y") if s == 0 else ("finish", "")
    if s == last:
        return "finish", ""
    if v_first and s == last - 1:
        return "pass", "y"
    round_ = s if dense else s // 2
    z_only = v_first and round_ == 0
    if not dense and s % 2 == 1:
        return "sums", "z" if z_only else "fused"
    return "pass", "z" if z_only else "fused"


def layer_step(s: int, steps: int, n: int, v_first: bool, dense: bool) -> int:
    """block_walk::layer_step: a layer's step in phase s of a fused launch of `steps` phases, or -1: spread layers'
    schedules end with the launch's last phase, dense ones' start with its first."""
    own = fused_steps(n, v_first, dense)
    t = s if dense else s - (steps - own)
    return t if 0 <= t < own else -1


def _orders(v_first: bool | Sequence[bool], count: int) -> list[bool]:
    """Each layer's power-iteration order: one for all, or one per layer."""
    return [bool(v_first)] * count if isinstance(v_first, bool) else [bool(o) for o in v_first]


def elementwise_blocks(numel: int, sms: int) -> int:
    return max(1, min(ceil_div(numel, THREADS), sms * (ELEMENTWISE_THREADS_PER_SM // THREADS)))


def split_launch_blocks(numel: int, wanted: int, sms: int) -> int:
    """split_launch_blocks (the split round's size classes): one block up to ONE_BLOCK_MAX_NUMEL elements, else a grid
    sized by the work, at most resident."""
    if numel <= ONE_BLOCK_MAX_NUMEL:
        return 1
    return max(1, min(wanted, ceil_div(numel, THREADS * ELEMENTS_PER_THREAD), MIN_BLOCKS_PER_SM * sms))


# ---------------------------------------------------------------------------------------------------------------
# Chains: one row of term counts (device_model.TERMS) per virtual block of a phase, for one layer.

T = dm.terms


def _rows_of(total: int, per: int, index: int) -> int:
    """How many of `total` items piece `index` of `per` items each holds."""
    return max(0, min(total, (index + 1) * per) - index * per)


def setup_chain(s: int, norms: bool) -> np.ndarray:
    """A phase's per-layer setup in a block (for_each_virtual_block_of_layers, once per layer a block meets): the
    previous step's degenerate flag and, where the step needs a norm, the partial squares (one round trip), their sum
    (ordered_sum2_block: one block sum), and the setup's way through shared memory (two __syncthreads)."""
    return T(l2=1 if s > 0 or norms else 0, block_sum=1 if norms else 0, sync=2)


def fused_pass_chain(p: FusedPlan, rows: int, read: str, kind: str) -> np.ndarray:
    """row_pass_block over a block's `rows` rows (kind "fused", "y" or "z"). Narrow rows: x's share into shared
    memory (one round trip), then per two steps their loads (one round trip: both rows' runs in flight) and one
    combined sum (a __syncthreads where a row spans warps, else shuffles), then the row groups' z sums added
    (add_thread_groups: a __syncthreads a level) and the partial row written. Wide rows: per pair of rows their
    segments' loads (a round trip each, x's values with them) and a block-wide sum; a __syncthreads; then per segment
    the pairs again from L1/L2 for z. A dense layer's block adds |z|^2 (a block sum)."""
    has_y, has_z = kind != "z", kind != "y"
    pairs = ceil_div(ceil_div(rows, p.rows_per_step), 2)
    chain = T()
    if p.segments == 1:
        if has_y:
            chain += T(l2=1) + pairs * T(sync=1 if p.threads > 32 else 0)
        chain += pairs * T(**{read: 1})
        if p.threads < THREADS:
            holders = THREADS // 32 if p.threads < 32 else p.rows_per_step
            chain += T(sync=int(math.log2(holders)) + 1)
        else:
            chain += T(sync=1)
    else:
        if has_y:
            chain += pairs * (p.segments * T(**{read: 1}) + T(sync=1))
        if has_z:
            chain += T(sync=1) + pairs * p.segments * T(l2=1)
    return chain + T(sync=1, block_sum=1 if p.dense and has_z else 0)


def column_sums_chain(p: FusedPlan) -> np.ndarray:
    """column_sums_block: a thread's partial rows (ceil(blocks / reduce_groups), REDUCE_UNROLL in flight), the
    groups' tree (add_thread_groups), z and |z|^2's share (a block sum)."""
    per_thread = ceil_div(p.blocks, p.reduce_groups)
    holders = THREADS // 32 if p.reduce_columns < 32 else p.reduce_groups
    return T(l2=ceil_div(per_thread, REDUCE_UNROLL), sync=int(math.log2(holders)) + 1, block_sum=1)


def finish_chain(w: Weight, p: FusedPlan, b: int, read: str, divide: bool) -> np.ndarray:
    """finish_block, virtual block b: u for its rows and v for its share of the columns (finish_elements:
    VECTOR_BATCH elements per thread loaded, then stored: a round trip a batch), then W / sigma over its rows walked
    back (divide_range: STREAM_PACKS packs in flight, a round trip a step; the last piece's tail one more)."""
    rows = _rows_of(w.rows, p.rows_per_block, b)
    share = ceil_div(w.cols, p.blocks)
    batch = THREADS * VECTOR_BATCH
    chain = T(l2=ceil_div(rows, batch) + ceil_div(_rows_of(w.cols, share, b), batch))
    if divide:
        unit = w.pack
        chunk = ceil_div(p.rows_per_block * w.cols, unit) * unit
        begin, end = min(b * chunk, w.numel), min((b + 1) * chunk, w.numel)
        packs = end // unit - begin // unit
        tail = 1 if end > end // unit * unit and end > begin else 0
        chain += T(**{read: ceil_div(packs, THREADS * STREAM_PACKS) + tail})
    return chain


def _piece_trips(numel: int, unit: int, chunk: int, index: int, packs: int) -> int:
    """Round trips of a piece's stream (element-wise passes over [index * chunk, ...): `packs` in flight per tensor)."""
    begin, end = min(index * chunk, numel), min((index + 1) * chunk, numel)
    whole = end // unit - begin // unit
    tail = 1 if end > end // unit * unit and end > begin else 0
    return ceil_div(whole, THREADS * packs) + tail


def _streaming_chains(numel: int, pack: int, blocks: int, read: str) -> np.ndarray:
    """W / sigma in the split round (divide_range over `blocks` pieces, STREAM_PACKS packs in flight)."""
    chunk = piece_chunk(numel, blocks, pack)
    return np.array([T(**{read: _piece_trips(numel, pack, chunk, b, STREAM_PACKS)}) for b in range(blocks)])


def matvec_chains(w: Weight, plan: Split, packed: bool, read: str) -> np.ndarray:
    """matvec_block per (row block, split): a thread's packs of its split, matvec_unroll at a time (W's and x's in
    flight together), the rest in one more round trip; or matvec_block_scalar's one element per round trip. Then
    store_row_sum (a __syncthreads when a row spans warps) and the phase's __syncthreads."""
    out = []
    for s in range(plan.splits):
        begin, end = s * plan.chunk, min(w.cols, (s + 1) * plan.chunk)
        if packed:
            mine = ceil_div((end - begin) // w.pack, plan.lanes)
            unroll = matvec_unroll(w.pack)
            trips = mine // unroll + (1 if mine % unroll else 0)
        else:
            trips = ceil_div(end - begin, plan.lanes)
        chain = T(**{read: trips}) + T(sync=1 + (1 if plan.lanes > 32 else 0))
        out += [chain] * plan.blocks_x
    return np.array(out)


def rmatvec_chains(w: Weight, plan: Split, packed: bool, read: str) -> np.ndarray:
    """rmatvec_block per (column block, split): a thread's rows of its split, SPLIT_UNROLL at a time, the rest one
    by one; or rmatvec_block_scalar's rows 4 at a time (#pragma unroll 4). Then the tree over the threads that share
    a column (a __syncthreads and one per halving) and the phase's __syncthreads."""
    row_lanes = THREADS // plan.lanes
    out = []
    for s in range(plan.splits):
        mine = ceil_div(_rows_of(w.rows, plan.chunk, s), row_lanes)
        trips = mine // SPLIT_UNROLL + mine % SPLIT_UNROLL if packed else ceil_div(mine, RMATVEC_SCALAR_UNROLL)
        chain = T(**{read: trips}) + T(sync=2 + int(math.log2(row_lanes)))
        out += [chain] * plan.blocks_x
    return np.array(out)


def normalize_split_chain(w: Weight, into_u: bool, splits: int, last: bool) -> np.ndarray:
    """normalize_block, the split round's one block per layer: per element group of THREADS, the splits' partial
    sums (unrolled by the compiler) and the raw value's store; a block_sum; per group, the raw value back and the
    new vector's store (a round trip each); the last half-step also commits u and v (copy_vector: a round trip per
    group); the phase's __syncthreads."""
    n = w.rows if into_u else w.cols
    groups = ceil_div(n, THREADS)
    chain = T(l2=groups * dm.round_trips(splits, dm.COMPILER_UNROLL) + groups, block_sum=1, sync=1)
    if last:
        chain = chain + T(sync=1, l2=ceil_div(w.rows, THREADS) + ceil_div(w.cols, THREADS))
    return chain


def dot_chain(w: Weight, splits: int) -> np.ndarray:
    """dot_block (n = 0), one block per layer: W v's partial sums and u per group, a block_sum, then u and v copied
    to the returned vectors."""
    groups = ceil_div(w.rows, THREADS)
    copies = ceil_div(w.rows, THREADS) + ceil_div(w.cols, THREADS)
    return T(l2=groups * dm.round_trips(splits, dm.COMPILER_UNROLL) + copies, block_sum=1, sync=1)


# ---------------------------------------------------------------------------------------------------------------
# Ops: a launch's phases for its layers (up to GROUP_LAYERS), walked by its grid.


def _phase(name, layers_chains, grid, nbytes, passes, per_layer: bool = False, setups=None) -> dm.Phase:
    """A phase whose layers' virtual blocks (concatenated in layer order) the grid walks; `per_layer`: one block per
    layer (block l takes layers l, l + grid, ...); `setups`: per layer, the chain a block adds once when it meets
    the layer (for_each_virtual_block_of_layers), or None."""
    layers_chains = [np.asarray(c, dtype=float).reshape(-1, len(dm.TERMS)) for c in layers_chains]
    chains = np.vstack(layers_chains)
    walked = dm.walk(chains, grid)
    start = 0
    for c, setup in zip(layers_chains, setups or [None] * len(layers_chains)):
        if setup is not None and len(c):
            for block in set((np.arange(start, start + len(c)) % grid).tolist()):
                walked[block] += setup
        start += len(c)
    return dm.Phase(name, nbytes, passes, walked, 1 if per_layer else len(chains))


def _finish_op(op: str, phases: list[dm.Phase], grid: int, launch: str, independent: bool = False) -> dm.Op:
    """launch_steps: one block, or blocks that each work alone (`independent`: dense layers only; an ordinary launch,
    __syncthreads between phases), cooperative (grid barriers) or phased (one launch per phase)."""
    if launch not in LAUNCH_MODES:
        raise ValueError(f"unknown launch mode {launch!r}: {', '.join(LAUNCH_MODES)}")
    if grid == 1 or independent:
        return dm.Op(op, "one block" if grid == 1 else "dense", grid, phases, launches=1, syncs=len(phases) - 1)
    if launch == "cooperative":
        return dm.Op(op, "cooperative", grid, phases, launches=1, grid_barriers=len(phases) - 1)
    return dm.Op(op, "phased", grid, phases, launches=len(phases))


_PASS_NAMES = {"fused": "W v, W^T y (one pass)", "y": "W v", "z": "W^T u"}


def forward(
    weights: list[Weight],
    gpu: dm.Gpu,
    n: int = 1,
    round_mode: str = "fused",
    v_first: bool | Sequence[bool] = False,
    launch: str = "cooperative",
) -> dm.Op:
    """One launch of the forward kernel (run_forward) for up to GROUP_LAYERS layers: n rounds, then W / sigma.
    v_first: every layer's power-iteration order, or each one's (the fused round runs both in one launch; the split
    round one order per launch: give it one)."""
    if round_mode not in ROUND_MODES:
        raise ValueError(f"unknown round mode {round_mode!r}: {', '.join(ROUND_MODES)}")
    orders = _orders(v_first, len(weights))
    if round_mode != "fused":
        if len(set(orders)) > 1:
            raise ValueError("the split round runs one power-iteration order per launch")
        return _split_forward(weights, gpu, n, round_mode == "split-scalar", orders[0], launch)
    plans = [fused_plan_of(w, w.fused_packable) for w in weights]
    spread = any(not p.dense for p in plans)
    steps = max(fused_steps(n, o, p.dense) for o, p in zip(orders, plans))
    total = sum(w.nbytes for w in weights)
    # Where reads of W come from: a launch of dense layers only finds its (small) weights in L2, as a one-block one;
    # a grid reads them from DRAM first; passes after the first read W again (L2 if the launch's weights fit), W /
    # sigma reads W while writing W_sn (L2 if both fit).
    first = dm.ONE_BLOCK_FIRST_READ if not spread else "dram"
    again = "l2" if total <= gpu.l2_bytes else "dram"
    divide_read = "l2" if 2 * total <= gpu.l2_bytes else "dram"
    wanted = max(sum(p.blocks for p in plans), sum(p.reduce_blocks for p in plans))
    grid = min(wanted, MIN_BLOCKS_PER_SM * gpu.sms) if spread else len(weights)
    phases = []
    for s in range(steps):
        chains, setups, nbytes, passes, names = [], [], 0.0, 0, set()
        for w, p, o in zip(weights, plans, orders):
            t = layer_step(s, steps, n, o, p.dense)
            if t < 0:
                chains.append(np.zeros((0, len(dm.TERMS))))
                setups.append(None)
                continue
            phase, kind = fused_step(t, n, o, p.dense)
            if phase == "pass":
                read = first if t == 0 else again
                chains.append(
                    [fused_pass_chain(p, _rows_of(w.rows, p.rows_per_block, b), read, kind) for b in range(p.blocks)]
                )
                setups.append(setup_chain(t, t > 0))
                reads = 2 if p.segments > 1 and kind == "fused" else 1
                partial = w.cols if p.dense else p.blocks * w.cols
                nbytes += reads * w.nbytes + w.acc * (w.rows + partial) + w.itemsize * w.cols
                passes += reads
                names.add(_PASS_NAMES[kind])
            elif phase == "sums":
                chains.append([column_sums_chain(p)] * p.reduce_blocks)
                setups.append(setup_chain(t, kind == "fused"))
                nbytes += w.acc * (p.blocks * w.cols + w.cols)
                names.add("z summed")
            else:
                chains.append([finish_chain(w, p, b, divide_read, True) for b in range(p.blocks)])
                setups.append(setup_chain(t, True))
                nbytes += 2 * w.nbytes + (w.rows + w.cols) * (w.acc + 2 * w.itemsize)
                passes += 2
                names.add("u, v, sigma, W / sigma")
        phases.append(_phase(" + ".join(sorted(names)), chains, grid, nbytes, passes, setups=setups))
    return _finish_op("spectral_normalize_", phases, grid, launch, independent=not spread)


def _split_forward(weights: list[Weight], gpu: dm.Gpu, n: int, scalar: bool, v_first: bool, launch: str) -> dm.Op:
    """The split rounds (SN_EXT_CUDA_ROUND=split, split-scalar; split_round.cuh): W v | u = N(.) | W^T u | v = N(.)
    per round (v-first: W^T u first), each normalization in one block per layer, then W / sigma."""
    packed = [not scalar and w.rows_packable for w in weights]
    mv = [plan_matvec(w, w.pack if p else 1) for w, p in zip(weights, packed)]
    rmv = [plan_rmatvec(w, w.pack if p else 1) for w, p in zip(weights, packed)]
    total = sum(w.nbytes for w in weights)
    again = "l2" if total <= gpu.l2_bytes else "dram"
    divide_read = "l2" if 2 * total <= gpu.l2_bytes else "dram"
    divide_blocks = [elementwise_blocks(w.numel, gpu.sms) for w in weights]
    wanted = max(
        [
            sum(p.virtual_blocks for p in mv),
            0 if n == 0 else sum(p.virtual_blocks for p in rmv),
            sum(divide_blocks),
            len(weights),
        ]
    )
    grid = split_launch_blocks(sum(w.numel for w in weights), wanted, gpu.sms)
    first = dm.ONE_BLOCK_FIRST_READ if grid == 1 else "dram"
    W = [w.nbytes for w in weights]

    def matvec(read):
        chains = [matvec_chains(w, p, k, read) for w, p, k in zip(weights, mv, packed)]
        moved = sum(b + w.acc * p.splits * w.rows for w, p, b in zip(weights, mv, W))
        return _phase("W v", chains, grid, moved, len(weights))

    def rmatvec(read):
        chains = [rmatvec_chains(w, p, k, read) for w, p, k in zip(weights, rmv, packed)]
        moved = sum(b + w.acc * p.splits * w.cols for w, p, b in zip(weights, rmv, W))
        return _phase("W^T u", chains, grid, moved, len(weights))

    def normalize(into_u, last):
        plans = mv if into_u else rmv
        chains = [normalize_split_chain(w, into_u, p.splits, last) for w, p in zip(weights, plans)]
        moved = sum(
            w.acc * p.splits * (w.rows if into_u else w.cols) + 2 * w.itemsize * (w.rows if into_u else w.cols)
            for w, p in zip(weights, plans)
        )
        return _phase("u = N(W v)" if into_u else "v = N(W^T u)", chains, grid, moved, 0, per_layer=True)

    phases = []
    if n == 0:
        phases.append(matvec(first))
        chains = [dot_chain(w, p.splits) for w, p in zip(weights, mv)]
        moved = sum(w.acc * p.splits * w.rows + 2 * w.itemsize * (w.rows + w.cols) for w, p in zip(weights, mv))
        phases.append(_phase("sigma = u^T W v", chains, grid, moved, 0, per_layer=True))
    for r in range(n):
        read = first if r == 0 else again
        last = r == n - 1
        if v_first:
            phases += [rmatvec(read), normalize(False, False), matvec(again), normalize(True, last)]
        else:
            phases += [matvec(read), normalize(True, False), rmatvec(again), normalize(False, last)]
    chains = [_streaming_chains(w.numel, w.pack, b, divide_read) for w, b in zip(weights, divide_blocks)]
    phases.append(_phase("W / sigma", chains, grid, 2 * total, 2 * len(weights)))
    return _finish_op("spectral_normalize_", phases, grid, launch)


def backward(weights: list[Weight], gpu: dm.Gpu, launch: str = "cooperative") -> dm.Op:
    """One launch of the backward kernel (run_backward): <G, W_sn>'s partial sums, a piece of the elements per
    virtual block (STREAM_PAIR_PACKS packs of each in flight, then a block sum) | lambda from the partial sums (each
    block, once per layer) and (G - lambda u v^T) / sigma over the same pieces walked back (STREAM_PACKS of G in
    flight, then each pack's u and v). A dense layer (one piece) does both in the first phase."""
    total = sum(w.nbytes for w in weights)
    again = "l2" if 3 * total <= gpu.l2_bytes else "dram"  # G again, after G and W_sn, while grad_W is written
    lam = [lambda_blocks(w.numel, w.itemsize) for w in weights]
    spread = any(b > 1 for b in lam)
    grid = min(sum(lam), MIN_BLOCKS_PER_SM * gpu.sms) if spread else len(weights)
    first = dm.ONE_BLOCK_FIRST_READ if not spread else "dram"

    def lambda_chain(w: Weight, blocks: int, b: int) -> np.ndarray:
        chunk = piece_chunk(w.numel, blocks, w.pack)
        return T(**{first: _piece_trips(w.numel, w.pack, chunk, b, STREAM_PAIR_PACKS)}, block_sum=1)

    def correction_chain(w: Weight, blocks: int, b: int) -> np.ndarray:
        chunk = piece_chunk(w.numel, blocks, w.pack)
        trips = _piece_trips(w.numel, w.pack, chunk, b, STREAM_PACKS)
        return T(**{again: trips}) + T(l2=trips)  # G's packs, then each pack's u and v (L1; one round trip a step)

    vectors = sum(w.itemsize * (w.rows + w.cols) for w in weights)
    first_chains = [
        [lambda_chain(w, b, k) + (correction_chain(w, b, k) if b == 1 else T()) for k in range(b)]
        for w, b in zip(weights, lam)
    ]
    dense_bytes = sum(2 * w.nbytes for w, b in zip(weights, lam) if b == 1)
    phases = [
        _phase(
            "<G, W_sn> partials" + ("" if spread else " + (G - lambda u v^T) / sigma"),
            first_chains,
            grid,
            sum(2 * w.nbytes + w.acc * b for w, b in zip(weights, lam)) + dense_bytes,
            2 * len(weights) + sum(2 for b in lam if b == 1),
        )
    ]
    if spread:
        phases.append(
            _phase(
                "lambda, (G - lambda u v^T) / sigma",
                [[correction_chain(w, b, k) for k in range(b)] if b > 1 else [] for w, b in zip(weights, lam)],
                grid,
                sum(2 * w.nbytes for w, b in zip(weights, lam) if b > 1) + vectors,
                sum(2 for b in lam if b > 1),
                setups=[
                    T(l2=dm.round_trips(ceil_div(b, THREADS), dm.COMPILER_UNROLL), block_sum=1, sync=2)
                    if b > 1
                    else None
                    for b in lam
                ],
            )
        )
    return _finish_op("spectral_normalize_backward", phases, grid, launch, independent=not spread)


def train_step(
    weights: list[Weight],
    gpu: dm.Gpu,
    n: int = 1,
    round_mode: str = "fused",
    v_first: bool | Sequence[bool] = False,
    launch: str = "cooperative",
) -> list[dm.Op]:
    """A train step's ops for a layer (one weight) or a grouped model (up to GROUP_LAYERS layers per launch):
    the forward launches (the split round: per order, u-first layers first, as run_forward), then the backward
    ones."""
    orders = _orders(v_first, len(weights))
    ops = []
    for launch_orders in [None] if round_mode == "fused" else [False, True]:
        chosen = [i for i, o in enumerate(orders) if launch_orders is None or o == launch_orders]
        for k in range(0, len(chosen), GROUP_LAYERS):
            part = chosen[k : k + GROUP_LAYERS]
            ops.append(forward([weights[i] for i in part], gpu, n, round_mode, [orders[i] for i in part], launch))
    groups = [weights[i : i + GROUP_LAYERS] for i in range(0, len(weights), GROUP_LAYERS)]
    return ops + [backward(g, gpu, launch) for g in groups]


# ---------------------------------------------------------------------------------------------------------------
# The plan table (docs/design.md) and the per-phase table.


def plan(
    shape: tuple[int, ...], itemsize: int, sms: int, n: int = 1, fused: bool = True, scalar: bool = False
) -> list[dict]:
    """One row per op: spectral_normalize_ (u-first, n rounds, fused or split) and spectral_normalize_backward, for
    dim 0."""
    gpu = dataclasses.replace(dm.GPUS["h100"], sms=sms)
    round_mode = "fused" if fused else "split-scalar" if scalar else "split"
    ops = train_step([Weight.of(shape, itemsize)], gpu, n, round_mode)
    out = []
    for op in ops:
        kind = "forward" if op.op == "spectral_normalize_" else "backward"
        one_block = op.launch == "one block"
        out.append(
            {
                "op": op.op,
                "blocks": "1 (one block)" if one_block else str(op.grid),
                "launches": "1" if one_block else f"1 (phased: {len(op.phases)})",
                "grid barriers": 0 if one_block else len(op.phases) - 1,
                "passes": op.weight_passes,
                "minimum passes": MIN_PASSES[kind],
                "bytes": op.bytes,
                "minimum bytes": MIN_PASSES[kind] * math.prod(shape) * itemsize,
            }
        )
    return out


def table(shapes: list[str], dtype: str, sms: int, fused: bool = True, scalar: bool = False) -> str:
    rows = []
    for text in shapes:
        shape = parse_shape(text)
        ops = plan(shape, ITEMSIZE[dtype], sms, fused=fused, scalar=scalar)
        for r in ops:
            mb = [f"{r[k] / 1e6:.3g}" for k in ("bytes", "minimum bytes")]
            rows.append([text, *list(r.values())[:6], *mb, f"{r['bytes'] / r['minimum bytes']:.2f}"])
        total, minimum = sum(r["bytes"] for r in ops), sum(r["minimum bytes"] for r in ops)
        passes = sum(r["passes"] for r in ops)
        rows.append(
            [
                text,
                "train step",
                "",
                "",
                "",
                passes,
                7,
                f"{total / 1e6:.3g}",
                f"{minimum / 1e6:.3g}",
                f"{total / minimum:.2f}",
            ]
        )
    headers = ["weight", "op", "blocks", "launches", "grid barriers", "passes", "min passes", "MB", "min MB"]
    return markdown_table([*headers, "bytes / min"], rows)


def us(pair: tuple[float, float]) -> str:
    """A (low, high) range in microseconds as text."""
    low, high = pair
    return f"{low:.3g}" if f"{low:.3g}" == f"{high:.3g}" else f"{low:.3g}-{high:.3g}"


def chain_text(counts: np.ndarray) -> str:
    """A chain's term counts in words: "64 dram + 64 block_sum"."""
    return " + ".join(f"{c:g} {name}" for name, c in zip(dm.TERMS, counts) if c) or "-"


def phase_table(ops: list[dm.Op], gpu: dm.Gpu) -> str:
    """Per phase of each op: virtual blocks, the slowest block's chain, bytes, and modelled time."""
    rows = []
    for op in ops:
        for p in op.phases:
            chain = (p.chain_us(0), p.chain_us(1))
            rows.append(
                [
                    op.op,
                    p.name,
                    p.virtual_blocks,
                    chain_text(p.slowest(1)),
                    us(chain),
                    f"{p.bytes / 1e6:.3g}",
                    f"{p.bandwidth_us(gpu):.3g}",
                    us((p.time_us(gpu, 0), p.time_us(gpu, 1))),
                ]
            )
        overhead = f"{op.launch}, grid {op.grid}: {chain_text(op.overhead())}"
        rows.append([op.op, overhead, "", "", "", "", "", us(op.time_us(gpu))])
    headers = ["op", "phase", "virtual blocks", "slowest block's chain", "chain us", "MB", "bandwidth us", "us"]
    return markdown_table(headers, rows)


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split("x"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_plan", description=__doc__)
    p.add_argument("--shape", action="append", help="weight shape, e.g. 300x200x3x3 (default: the baseline shapes)")
    p.add_argument("--dtype", default="float32", choices=list(ITEMSIZE))
    p.add_argument("--sms", type=int, default=132, help="the GPU's SM count (H100/H200 SXM: 132)")
    p.add_argument("--round", default="fused", choices=ROUND_MODES, help="the round mode (SN_EXT_CUDA_ROUND)")
    p.add_argument("--phases", action="store_true", help="per phase: the critical path, bytes and modelled time")
    p.add_argument("--gpu", default="h100", choices=list(dm.GPUS), help="the device model for --phases")
    p.add_argument("--v-first", action="store_true", help="--phases: v-first (legacy) rounds")
    p.add_argument("--n", type=int, default=1, help="--phases: power iterations")
    p.add_argument("--launch", default="cooperative", choices=LAUNCH_MODES, help="--phases: SN_EXT_CUDA_LAUNCH")
    args = p.parse_args(argv)
    if not args.phases:
        print(f"{args.dtype}, one power iteration (u-first, {args.round} round), dim 0, {args.sms} SMs:\n")
        print(
            table(
                args.shape or SHAPES,
                args.dtype,
                args.sms,
                fused=args.round == "fused",
                scalar=args.round == "split-scalar",
            )
        )
        return
    gpu = dataclasses.replace(dm.GPUS[args.gpu], sms=args.sms)
    order = "v-first" if args.v_first else "u-first"
    for text in args.shape or SHAPES:
        w = Weight.of(parse_shape(text), ITEMSIZE[args.dtype])
        ops = train_step([w], gpu, args.n, args.round, args.v_first, args.launch)
        print(f"\n{text} {args.dtype}, n = {args.n}, {order}, {args.round} round, {gpu.name} (model):\n")
        print(phase_table(ops, gpu))
        print(f"\ntrain step: {us(dm.step_us(ops, gpu))} us; {dm.dominant(ops, gpu)}")


if __name__ == "__main__":
    main()
