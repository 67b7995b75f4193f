"""The Triton backend's device-time model: each launch of the plan the Triton ops make (read from their own plan
functions, sn_ext/triton/spectral_normalize.py and spectral_normalize_backward.py, so the model follows the code),
its critical path (the chain of dependent round trips, block-wide sums and barriers of its slowest program, times
its waves) and its bytes, turned into device time by benchmarks/device_model.py. Needs triton installed (no GPU).

    python -m benchmarks.triton_model --shape 4096x4096 --gpu h100     # per launch: chain, bytes, modelled us

Paths (sn_ext/triton/spectral_normalize.py's module docstring): "one program" (weights up to
_host.FUSED_MAX_NUMEL elements: one launch per op), "gram" (u-first rounds on the grid: gram_kernel reads W once per
round, gram_reduce_kernel sums its partial rows, and divide_kernel takes the last round's v half-step: 3n launches)
and "grid" (v-first rounds, n = 0, and large weights with few row blocks: 4n + 1 forward launches, matvec |
normalize | rmatvec | normalize, then W / sigma); the backward is one program or 2 launches (lambda's partial sums |
the correction).

Each tile load of a loop without pipelining is one round trip; the grid's streaming loops (tl.range with
num_stages) keep PIPELINE_STAGES tiles in flight; loops that only load and add (normalize's sum over partial sums)
are unrolled by 4 (device_model.COMPILER_UNROLL); every tl.sum across a program's warps costs a block sum.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import cuda_plan
from . import device_model as dm

T = dm.terms
ceil_div = dm.ceil_div


def plans(shape: tuple[int, ...], dtype: str, n: int, v_first: bool, dim: int = 0):
    """(forward plan, backward plan, the knobs module) the Triton ops make for a contiguous weight."""
    import torch

    from sn_ext import triton as sn_triton

    loaded, reason = sn_triton.load()
    if not loaded:
        raise RuntimeError(f"the Triton model reads the Triton ops' plans: {reason}")
    from sn_ext.triton import _host, spectral_normalize, spectral_normalize_backward

    stride = torch.empty(shape, device="meta").stride()
    torch_dtype = getattr(torch, dtype)
    dim %= len(shape)
    knobs = _host.knobs()
    forward = spectral_normalize._plan(tuple(shape), stride, torch_dtype, dim, 1, 1, n, v_first, False, knobs)
    backward = spectral_normalize_backward._plan(tuple(shape), stride, stride, torch_dtype, dim, False, knobs)
    return forward, backward, _host


def path(forward_plan) -> str:
    if forward_plan.fused:
        return "one program"
    return "gram" if forward_plan.gram else "grid"


def _launch(name: str, chains, resident: int, nbytes: float, passes: float) -> dm.Phase:
    """A launch whose programs (one chain each, in launch order) run `resident` at a time."""
    chains = np.asarray(chains, dtype=float).reshape(-1, len(dm.TERMS))
    return dm.Phase(name, nbytes, passes, dm.walk(chains, min(resident, len(chains))), len(chains))


def _one_program_forward(plan, rows: int, cols: int, itemsize: int, acc: int, n: int) -> dm.Phase:
    """fused_forward_kernel: the vectors copied, n rounds (one pass: a strip's tile, two tl.sums; else matvec and
    rmatvec tile by tile), the norms, finish, then W / sigma tile by tile (a load and a store each); n = 0: sigma =
    u^T W v row block by row block."""
    meta = plan.fused.meta
    br, bc, bv = meta["BLOCK_ROWS"], meta["BLOCK_COLS"], meta["BLOCK_VEC"]
    read = dm.ONE_BLOCK_FIRST_READ
    chain = T(l2=ceil_div(rows, bv) + ceil_div(cols, bv), sync=1)
    passes = 2
    matvec = ceil_div(rows, br) * (T(**{read: ceil_div(cols, bc)}) + T(block_sum=1)) + T(block_sum=1)
    for _ in range(n):
        if meta["ONE_PASS"]:
            strip_dim, full_dim = (cols, rows) if meta["V_FIRST"] else (rows, cols)
            strips = ceil_div(strip_dim, meta["STRIP"])
            chain = chain + T(l2=1 + ceil_div(strip_dim, bv), block_sum=2 * strips + 2, sync=2) + T(**{read: strips})
            passes += 1
        else:
            rmatvec = ceil_div(cols, bc) * (T(**{read: ceil_div(rows, br)}) + T(block_sum=1)) + T(block_sum=1)
            normalize = T(l2=ceil_div(rows, bv) + ceil_div(cols, bv))
            chain = chain + matvec + rmatvec + normalize + T(sync=4)
            passes += 2
    if meta["N_ZERO"]:
        chain = chain + matvec
        passes += 1
    else:
        chain = chain + T(l2=ceil_div(rows, bv) + ceil_div(cols, bv))
    chain = chain + T(l2=ceil_div(rows, br) * ceil_div(cols, bc))
    nbytes = passes * rows * cols * itemsize + (acc + 2 * itemsize) * (rows + cols) * (n + 1)
    return _launch("fused_forward_kernel", [chain], 1, nbytes, passes)


def _normalize(name, length, splits, other, block, last, acc, itemsize) -> dm.Phase:
    """normalize_kernel, one program: the partial sums added twice (for the norm, then to normalize), a tl.sum
    between; the last half-step also finishes the other vector."""
    steps = ceil_div(length, block)
    sums = steps * dm.round_trips(splits, dm.COMPILER_UNROLL)
    chain = T(l2=2 * sums + (ceil_div(other, block) if last else 0), block_sum=1)
    nbytes = 2 * acc * splits * length + 2 * itemsize * length + (2 * itemsize * other if last else 0)
    return _launch(name, [chain], 1, nbytes, 0)


def forward(shape: tuple[int, ...], dtype: str, gpu: dm.Gpu, n: int = 1, v_first: bool = False, dim: int = 0):
    """The forward's launches (one dm.Op)."""
    plan, _, host = plans(shape, dtype, n, v_first, dim)
    m = plan.layout.matrix
    rows, cols = m.rows, m.cols
    itemsize = dm.ITEMSIZE[dtype]
    acc = 8 if itemsize == 8 else 4
    w = rows * cols * itemsize
    if plan.fused:
        phases = [_one_program_forward(plan, rows, cols, itemsize, acc, n)]
        return dm.Op("triton_spectral_normalize_", "triton", 1, phases, launches=1)
    stages = host.PIPELINE_STAGES
    pipelined = dm.TRITON_PIPELINED_PROGRAMS_PER_SM * gpu.sms
    elementwise = dm.TRITON_ELEMENTWISE_PROGRAMS_PER_SM * gpu.sms
    again = "l2" if w <= gpu.l2_bytes else "dram"
    mv, rmv, gram = plan.mv, plan.rmv, plan.gram
    vector_block = (plan.normalize or plan.sigma_dot).meta["BLOCK"]

    def product(kernel, split, reduced, length, read):
        """matvec_kernel (reduced: the columns, length: the rows) or rmatvec_kernel: per program, its split's
        tiles, STAGES in flight, then a tl.sum."""
        launch = split.first
        blocks = launch.grid[0]
        tile = launch.meta["BLOCK_COLS"] if kernel == "matvec_kernel" else launch.meta["BLOCK_ROWS"]
        chains = []
        for s in range(split.splits):
            tiles = ceil_div(cuda_plan._rows_of(reduced, split.chunk, s), tile)
            chains += [T(**{read: dm.round_trips(tiles, stages)}) + T(block_sum=1)] * blocks
        return _launch(kernel, chains, pipelined, w + acc * split.splits * length, 1)

    def matvec(read):
        return product("matvec_kernel", mv, cols, rows, read)

    def rmatvec(read):
        return product("rmatvec_kernel", rmv, rows, cols, read)

    def normalize(into_u, splits, last):
        length, other = (rows, cols) if into_u else (cols, rows)
        name = "normalize_kernel (u)" if into_u else "normalize_kernel (v)"
        return _normalize(name, length, splits, other, vector_block, last, acc, itemsize)

    def gram_round(read) -> list[dm.Phase]:
        """gram_kernel: each program's row blocks in turn, a block's y pass (its tiles, STAGES in flight, a tl.sum)
        and then its second pass (the same tiles again, a tl.sum per tile for its share of W^T y, added to the
        program's partial row), from L2 when the blocks the programs are on fit there; gram_reduce_kernel: per
        program, the |y|^2 partial sums, its share of u, and per 32-column block the partial rows in
        BLOCK_PARTS-row steps, STAGES in flight."""
        launch, reduce = gram.first, gram.reduce
        br, bc = launch.meta["BLOCK_ROWS"], launch.meta["BLOCK_COLS"]
        tiles = ceil_div(cols, bc)
        in_flight = gram.programs * br * cols * itemsize  # the blocks the programs are on: what a re-read finds
        second = "l2" if in_flight <= gpu.l2_bytes else "dram"
        block = T(**{read: dm.round_trips(tiles, stages)}) + T(block_sum=1, sync=1)
        block = block + T(**{second: dm.round_trips(tiles, stages)}) + T(block_sum=tiles)
        chains = [block * ceil_div(gram.row_blocks - p, gram.programs) for p in range(gram.programs)]
        parts = acc * gram.programs * cols
        reads = 1 if second == "l2" else 2  # weight-sized passes from DRAM
        gram_bytes = reads * w + acc * rows + parts * (2 if gram.row_blocks > gram.programs else 1)
        steps = dm.round_trips(ceil_div(gram.programs, reduce.meta["BLOCK_PARTS"]), stages)
        reduce_chain = T(l2=1 + ceil_div(rows, gram.reducers * reduce.meta["BLOCK"]), block_sum=1)
        reduce_chain = reduce_chain + ceil_div(gram.col_blocks, gram.reducers) * T(l2=steps, block_sum=1)
        reduce_bytes = parts + acc * cols + (acc + itemsize) * rows
        return [
            _launch("gram_kernel", chains, host.GRAM_PROGRAMS_PER_SM * gpu.sms, gram_bytes, reads),
            _launch("gram_reduce_kernel", [reduce_chain] * gram.reducers, pipelined, reduce_bytes, 0),
        ]

    phases = []
    if n == 0:
        phases.append(matvec("dram"))
        steps = ceil_div(rows, vector_block)
        chain = T(l2=steps * dm.round_trips(mv.splits, dm.COMPILER_UNROLL) + ceil_div(cols, vector_block))
        nbytes = acc * mv.splits * rows + 2 * itemsize * (rows + cols)
        phases.append(_launch("sigma_dot_kernel", [chain + T(block_sum=1)], 1, nbytes, 0))
    for r in range(n):
        read, last = ("dram" if r == 0 else again), r == n - 1
        if gram:
            phases += gram_round(read)
            if not last:  # the last round's v half-step is in divide_kernel
                phases.append(normalize(False, 1, False))
        elif v_first:
            phases += [
                rmatvec(read),
                normalize(False, rmv.splits, False),
                matvec(again),
                normalize(True, mv.splits, last),
            ]
        else:
            phases += [
                matvec(read),
                normalize(True, mv.splits, False),
                rmatvec(again),
                normalize(False, rmv.splits, last),
            ]
    divide_read = "l2" if 2 * w <= gpu.l2_bytes else "dram"
    divide = T(**{divide_read: 1})
    if gram:  # FINISH: every program adds the |z|^2 partial sums (a tl.sum); the first row and column of tiles
        # also write v or finish u (one more round trip)
        divide = divide + T(l2=2, block_sum=1)
    phases.append(_launch("divide_kernel", [divide] * plan.divide.grid[0], elementwise, 2 * w, 2))
    grid = max(p.virtual_blocks for p in phases)
    return dm.Op("triton_spectral_normalize_", "triton", grid, phases, launches=len(phases))


def backward(shape: tuple[int, ...], dtype: str, gpu: dm.Gpu, dim: int = 0) -> dm.Op:
    """The backward's launches: fused_backward_kernel (one program), or lambda_partial_kernel | backward_kernel."""
    _, plan, host = plans(shape, dtype, 1, False, dim)
    m = plan.layout.matrix
    rows, cols = m.rows, m.cols
    itemsize = dm.ITEMSIZE[dtype]
    acc = 8 if itemsize == 8 else 4
    w = rows * cols * itemsize
    op = "triton_spectral_normalize_backward"
    if plan.fused:
        br, bc = plan.fused.meta["BLOCK_ROWS"], plan.fused.meta["BLOCK_COLS"]
        tiles = ceil_div(rows, br) * ceil_div(cols, bc)
        chain = T(**{dm.ONE_BLOCK_FIRST_READ: tiles}) + T(block_sum=1, l2=tiles)
        nbytes = 4 * w + itemsize * (rows + cols)
        return dm.Op(op, "triton", 1, [_launch("fused_backward_kernel", [chain], 1, nbytes, 4)], launches=1)
    _, tiles, parts = plan.grid_args
    stages = host.PIPELINE_STAGES
    again = "l2" if 3 * w <= gpu.l2_bytes else "dram"
    lam = [T(dram=dm.round_trips(ceil_div(tiles - p, parts), stages), block_sum=1) for p in range(parts)]
    phases = [
        _launch("lambda_partial_kernel", lam, dm.TRITON_PIPELINED_PROGRAMS_PER_SM * gpu.sms, 2 * w + acc * parts, 2),
        _launch(
            "backward_kernel",
            [T(**{again: 1}) + T(block_sum=1)] * tiles,
            dm.TRITON_ELEMENTWISE_PROGRAMS_PER_SM * gpu.sms,
            2 * w + acc * parts * tiles + itemsize * (rows + cols),
            2,
        ),
    ]
    return dm.Op(op, "triton", tiles, phases, launches=2)


def train_step(shape, dtype: str, gpu: dm.Gpu, n: int = 1, v_first: bool = False, dim: int = 0) -> list[dm.Op]:
    return [forward(tuple(shape), dtype, gpu, n, v_first, dim), backward(tuple(shape), dtype, gpu, dim)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_model", description=__doc__)
    p.add_argument("--shape", action="append", help="weight shape (default: 64x3x3x3, 512x512x3x3, 4096x4096)")
    p.add_argument("--dtype", default="float32", choices=list(dm.ITEMSIZE))
    p.add_argument("--gpu", default="h100", choices=list(dm.GPUS))
    p.add_argument("--v-first", action="store_true")
    p.add_argument("--n", type=int, default=1)
    args = p.parse_args(argv)
    gpu = dm.GPUS[args.gpu]
    for text in args.shape or ["64x3x3x3", "512x512x3x3", "4096x4096"]:
        shape = cuda_plan.parse_shape(text)
        ops = train_step(shape, args.dtype, gpu, args.n, args.v_first)
        forward_plan = plans(shape, args.dtype, args.n, args.v_first)[0]
        print(f"\n{text} {args.dtype}, n = {args.n}, {path(forward_plan)} path, {gpu.name} (model):\n")
        print(cuda_plan.phase_table(ops, gpu))
        print(f"\ntrain step: {cuda_plan.us(dm.step_us(ops, gpu))} us; {dm.dominant(ops, gpu)}")


if __name__ == "__main__":
    main()
