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

import numpy as np

from . import device_model as dm
from .records import markdown_table

# csrc/cuda/common.cuh
THREADS = 256
MIN_BLOCKS_PER_SM = 3
TARGET_BLOCKS = 256
MIN_COLS_PER_SPLIT = 2048
MIN_ROWS_PER_THREAD = 8
MAX_GRID_Y = 65535
ONE_BLOCK_MAX_NUMEL = 1 << 16
ELEMENTS_PER_THREAD = 8
MAX_LAMBDA_BLOCKS = 4 * THREADS
LAMBDA_ITEMS_PER_THREAD = 8
FUSED_MIN_ROWS_PER_BLOCK = 8
REDUCE_COLUMNS = 32
REDUCE_GROUPS = THREADS // REDUCE_COLUMNS
REDUCE_UNROLL = 4  # reduce_columns_block's `#pragma unroll 4`
RMATVEC_SCALAR_UNROLL = 4  # rmatvec_block_scalar's `#pragma unroll 4`
Y_CHUNK = 8 * THREADS
SPLIT_UNROLL = 4
GROUP_LAYERS = 12
ELEMENTWISE_THREADS_PER_SM = 2048  # elementwise_blocks: multiprocessor_count() * (2048 / kThreads)
PACKS_PER_STEP = 2  # for_each_pack: two 16-byte loads in flight per thread
FUSED_BYTES_PER_THREAD = {True: 64, False: 32}  # kFusedElements: packed rows, element-wise rows
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


def wide_unroll(itemsize: int) -> tuple[int, int]:
    """(y pass, z pass) unrolling of fused_round_block's wide-row loops (kWideYUnroll, kWideZUnroll)."""
    return (2, 4) if itemsize == 4 else (1, 1)


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


def fused_rows_per_block(rows: int) -> int:
    return max(FUSED_MIN_ROWS_PER_BLOCK, ceil_div(rows, TARGET_BLOCKS))


def fused_blocks(rows: int) -> int:
    """Blocks of the fused round (fused_blocks in common.cuh)."""
    return ceil_div(rows, fused_rows_per_block(rows))


def fused_elements(packed: bool, acc: int) -> int:
    """Elements of a row a thread holds in the fused round (kFusedElements)."""
    return FUSED_BYTES_PER_THREAD[packed] // acc


def fused_segment(itemsize: int, cols: int) -> int:
    """Columns a thread block holds in registers in the fused round (kFusedElements x kThreads): 64 bytes of sums per
    thread, halved on the element-wise path, taken when a row is not a whole number of 16-byte packs."""
    packed = cols % (16 // itemsize) == 0
    return fused_elements(packed, 8 if itemsize == 8 else 4) * THREADS


def fused_reduce_blocks(cols: int) -> int:
    return ceil_div(cols, REDUCE_COLUMNS)


def fused_y_chunks(rows: int) -> int:
    return ceil_div(rows, Y_CHUNK)


def fused_normalize_blocks(rows: int, cols: int) -> int:
    return ceil_div(rows, THREADS) + ceil_div(cols, THREADS)


def lambda_blocks(numel: int) -> int:
    return max(1, min(ceil_div(numel, THREADS * LAMBDA_ITEMS_PER_THREAD), MAX_LAMBDA_BLOCKS))


def elementwise_blocks(numel: int, sms: int) -> int:
    return max(1, min(ceil_div(numel, THREADS), sms * (ELEMENTWISE_THREADS_PER_SM // THREADS)))


def launch_blocks(numel: int, wanted: int, sms: int) -> int:
    """launch_blocks: one block up to ONE_BLOCK_MAX_NUMEL elements, else a grid sized by the work, at most resident."""
    if numel <= ONE_BLOCK_MAX_NUMEL:
        return 1
    return max(1, min(wanted, ceil_div(numel, THREADS * ELEMENTS_PER_THREAD), MIN_BLOCKS_PER_SM * sms))


# ---------------------------------------------------------------------------------------------------------------
# Chains: one row of term counts (device_model.TERMS) per virtual block of a phase, for one layer.

T = dm.terms


def _rows_of(total: int, per: int, index: int) -> int:
    """How many of `total` items piece `index` of `per` items each holds."""
    return max(0, min(total, (index + 1) * per) - index * per)


def fused_pass_chains(w: Weight, packed: bool, first: str) -> np.ndarray:
    """fused_round_block, per block of rows. One segment: x's segment into shared memory (an L2 round trip), then
    per row its loads (one round trip: a thread's whole segment in flight; rows narrower than a cache line share
    one) and a block_sum before the next row's loads issue. Wider rows: per row its segments,
    CUDA_WIDE_Y_PACKS_IN_FLIGHT at a time, and a block_sum; a __syncthreads; then per segment the block's rows
    again from L2, kWideZUnroll rows at a time."""
    rpb = fused_rows_per_block(w.rows)
    elements = fused_elements(packed, w.acc)
    out = []
    for b in range(fused_blocks(w.rows)):
        n = _rows_of(w.rows, rpb, b)
        if w.cols <= elements * THREADS:
            trips = n
            if w.outer == 1:  # contiguous rows: narrow ones share lines
                trips = min(n, ceil_div(n * w.cols * w.itemsize, dm.CACHE_LINE_BYTES) + 1)
            out.append(T(l2=1, block_sum=n) + T(**{first: trips}))
            continue
        per_segment = w.pack if packed else elements // 2
        segments = ceil_div(w.cols, per_segment * THREADS)
        y_unroll, z_unroll = wide_unroll(w.itemsize)
        y_trips = dm.round_trips(segments, min(y_unroll, dm.CUDA_WIDE_Y_PACKS_IN_FLIGHT))
        out.append(
            n * (y_trips * T(**{first: 1}) + T(block_sum=1)) + T(sync=1) + T(l2=segments * ceil_div(n, z_unroll))
        )
    return np.array(out)


def reduce_chains(w: Weight) -> np.ndarray:
    """reduce_columns_block: per column block, the fused blocks' partial rows (REDUCE_GROUPS threads per column,
    unrolled by 4), a __syncthreads and the tree (log2 REDUCE_GROUPS more), |y|^2 from every chunk (an
    ordered_sum_block each: its loads, a block_sum), then |W^T u|^2's share (a block_sum) and a __syncthreads; per
    |y|^2 chunk block, one ordered_sum_block."""
    chunks = [
        T(l2=dm.round_trips(ceil_div(_rows_of(w.rows, Y_CHUNK, k), THREADS), dm.COMPILER_UNROLL), block_sum=1)
        for k in range(fused_y_chunks(w.rows))
    ]
    partials = dm.round_trips(ceil_div(fused_blocks(w.rows), REDUCE_GROUPS), REDUCE_UNROLL)
    column = T(l2=partials, sync=2 + int(math.log2(REDUCE_GROUPS)), block_sum=1) + sum(chunks)
    return np.array([column] * fused_reduce_blocks(w.cols) + chunks)


def normalize_both_chains(w: Weight) -> np.ndarray:
    """fused_normalize_block, per block of u's or v's elements: |y|^2 from its chunk sums, |W^T u|^2 from the reduce
    blocks' shares (ordered_sum_block: loads, a block_sum), then its element (an L2 round trip)."""
    y_chunks = dm.round_trips(fused_y_chunks(w.rows), dm.COMPILER_UNROLL)
    shares = dm.round_trips(ceil_div(fused_reduce_blocks(w.cols), THREADS), dm.COMPILER_UNROLL)
    return np.array([T(l2=y_chunks + shares + 1, block_sum=1)] * fused_normalize_blocks(w.rows, w.cols))


def _streaming_chains(numel: int, pack: int, blocks: int, packed: bool, read: str, **extra: float) -> np.ndarray:
    """The element-wise passes' loops (divide_block, lambda_partial_block, backward_block) per virtual block:
    packed, for_each_pack's steps of PACKS_PER_STEP packs, one round trip each, and the tail; else one element per
    round trip. The slowest thread is thread 0."""
    stride = blocks * THREADS
    out = []
    for b in range(blocks):
        if packed:
            packs = numel // pack
            mine = ceil_div(packs - b * THREADS, stride) if packs > b * THREADS else 0
            tail = 1 if packs * pack + b * THREADS < numel else 0
            trips = dm.round_trips(mine, PACKS_PER_STEP) + tail
        else:
            trips = ceil_div(numel - b * THREADS, stride) if numel > b * THREADS else 0
        out.append(T(**{read: trips}) + T(**extra))
    return np.array(out)


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


def _phase(name, layers_chains, grid, nbytes, passes, per_layer: bool = False) -> dm.Phase:
    """A phase whose layers' virtual blocks (concatenated in layer order) the grid walks; `per_layer`: one block per
    layer (block l takes layers l, l + grid, ...)."""
    chains = np.vstack([np.asarray(c).reshape(-1, len(dm.TERMS)) for c in layers_chains])
    return dm.Phase(name, nbytes, passes, dm.walk(chains, grid), 1 if per_layer else len(chains))


def _finish_op(op: str, phases: list[dm.Phase], grid: int, launch: str) -> dm.Op:
    """launch_steps: one block (an ordinary launch, __syncthreads between phases), cooperative (grid barriers) or
    phased (one launch per phase)."""
    if grid == 1:
        return dm.Op(op, "one block", 1, phases, launches=1, syncs=len(phases) - 1)
    if launch == "cooperative":
        return dm.Op(op, "cooperative", grid, phases, launches=1, grid_barriers=len(phases) - 1)
    if launch == "phased":
        return dm.Op(op, "phased", grid, phases, launches=len(phases))
    raise ValueError(f"unknown launch mode {launch!r}: {', '.join(LAUNCH_MODES)}")


def forward(
    weights: list[Weight],
    gpu: dm.Gpu,
    n: int = 1,
    round_mode: str = "fused",
    v_first: bool = False,
    launch: str = "cooperative",
) -> dm.Op:
    """One launch of the forward kernel (run_forward) for up to GROUP_LAYERS layers: n rounds, then W / sigma."""
    if round_mode not in ROUND_MODES:
        raise ValueError(f"unknown round mode {round_mode!r}: {', '.join(ROUND_MODES)}")
    fused = n > 0 and not v_first and round_mode == "fused"
    packed = [round_mode != "split-scalar" and w.rows_packable for w in weights]
    mv = [plan_matvec(w, w.pack if p else 1) for w, p in zip(weights, packed)]
    rmv = [plan_rmatvec(w, w.pack if p else 1) for w, p in zip(weights, packed)]
    total = sum(w.nbytes for w in weights)
    # Where re-reads of W come from: rounds after the first and the split round's second product read W again
    # (L2 if the launch's weights fit), W / sigma reads W while writing W_sn (L2 if both fit).
    again = "l2" if total <= gpu.l2_bytes else "dram"
    divide_read = "l2" if 2 * total <= gpu.l2_bytes else "dram"
    divide_blocks = [elementwise_blocks(w.numel, gpu.sms) for w in weights]
    wanted = max(
        [
            0 if fused else sum(p.virtual_blocks for p in mv),
            0 if fused or n == 0 else sum(p.virtual_blocks for p in rmv),
            sum(fused_blocks(w.rows) for w in weights) if fused else 0,
            sum(fused_reduce_blocks(w.cols) + fused_y_chunks(w.rows) for w in weights) if fused else 0,
            sum(fused_normalize_blocks(w.rows, w.cols) for w in weights) if fused else 0,
            sum(divide_blocks),
            len(weights),
        ]
    )
    grid = launch_blocks(sum(w.numel for w in weights), wanted, gpu.sms)
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
        if fused:
            wide = [w.cols > fused_elements(k, w.acc) * THREADS for w, k in zip(weights, packed)]
            chains = [fused_pass_chains(w, k, read) for w, k in zip(weights, packed)]
            moved = sum(
                (2 if x else 1) * w.nbytes + w.acc * (fused_blocks(w.rows) * w.cols + w.rows)
                for w, x in zip(weights, wide)
            )
            phases.append(_phase("fused W v, W^T y", chains, grid, moved, sum(2 if x else 1 for x in wide)))
            moved = sum(
                w.acc * (fused_blocks(w.rows) * w.cols + w.rows * (fused_reduce_blocks(w.cols) + 1) + w.cols)
                for w in weights
            )
            phases.append(_phase("reduce z", [reduce_chains(w) for w in weights], grid, moved, 0))
            moved = sum((w.acc + 2 * w.itemsize) * (w.rows + w.cols) for w in weights)
            phases.append(_phase("normalize u, v", [normalize_both_chains(w) for w in weights], grid, moved, 0))
        elif v_first:
            phases += [rmatvec(read), normalize(False, False), matvec(again), normalize(True, last)]
        else:
            phases += [matvec(read), normalize(True, False), rmatvec(again), normalize(False, last)]
    chains = [_streaming_chains(w.numel, w.pack, b, True, divide_read) for w, b in zip(weights, divide_blocks)]
    phases.append(_phase("W / sigma", chains, grid, 2 * total, 2 * len(weights)))
    return _finish_op("spectral_normalize_", phases, grid, launch)


def backward(weights: list[Weight], gpu: dm.Gpu, launch: str = "cooperative") -> dm.Op:
    """One launch of the backward kernel (run_backward): <G, W_sn>'s partial sums | their totals, one block per
    layer | (G - lambda u v^T) / sigma."""
    total = sum(w.nbytes for w in weights)
    again = "l2" if 3 * total <= gpu.l2_bytes else "dram"  # G again, after G and W_sn, while grad_W is written
    lam = [lambda_blocks(w.numel) for w in weights]
    corr = [elementwise_blocks(w.numel, gpu.sms) for w in weights]
    grid = launch_blocks(sum(w.numel for w in weights), max(sum(lam), sum(corr), len(weights)), gpu.sms)
    first = dm.ONE_BLOCK_FIRST_READ if grid == 1 else "dram"
    phases = [
        _phase(
            "<G, W_sn> partials",
            [_streaming_chains(w.numel, w.pack, b, True, first, block_sum=1) for w, b in zip(weights, lam)],
            grid,
            sum(2 * w.nbytes + w.acc * b for w, b in zip(weights, lam)),
            2 * len(weights),
        ),
        _phase(
            "lambda totals",
            [T(l2=dm.round_trips(ceil_div(b, THREADS), dm.COMPILER_UNROLL), block_sum=1) for b in lam],
            grid,
            sum(w.acc * (b + 1) for w, b in zip(weights, lam)),
            0,
            per_layer=True,
        ),
        _phase(
            "(G - lambda u v^T) / sigma",
            [_streaming_chains(w.numel, w.pack, b, w.lines_packable, again) for w, b in zip(weights, corr)],
            grid,
            sum(2 * w.nbytes + w.itemsize * (w.rows + w.cols) for w in weights),
            2 * len(weights),
        ),
    ]
    return _finish_op("spectral_normalize_backward", phases, grid, launch)


def train_step(
    weights: list[Weight],
    gpu: dm.Gpu,
    n: int = 1,
    round_mode: str = "fused",
    v_first: bool = False,
    launch: str = "cooperative",
) -> list[dm.Op]:
    """A train step's ops for a layer (one weight) or a grouped model (up to GROUP_LAYERS layers per launch):
    the forward launches, then the backward ones."""
    groups = [weights[i : i + GROUP_LAYERS] for i in range(0, len(weights), GROUP_LAYERS)]
    ops = [forward(g, gpu, n, round_mode, v_first, launch) for g in groups]
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
