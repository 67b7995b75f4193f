"""What the CUDA kernels do per op and weight shape, modelled from their launch plan without a GPU: size class
(one block, or a grid and its size), launches (cooperative; phased), grid-wide barriers, and the bytes each op moves
against the minimum a fused spectral norm must move.

    python -m benchmarks.cuda_plan                 # the baseline shapes, float32, one power iteration, an H100/H200
    python -m benchmarks.cuda_plan --sms 132 --dtype bfloat16 --shape 300x200x3x3
    python -m benchmarks.cuda_plan --round split   # the split u-first round (SN_EXT_CUDA_ROUND=split; or split-scalar)

The minimum, in weight-sized passes: the forward reads W twice (power iteration, then W / sigma: W v and W^T (W v)
in one pass) and writes W_sn once; the backward reads G twice (<G, W_sn>, then the correction) and W_sn once and
writes grad_W once; 7 passes per train step. "passes" counts what the kernels do: the fused round (the default,
SN_EXT_CUDA_ROUND=fused) reads W once, or twice for rows wider than one register-held segment (the second read from
L2); the split round reads W for W v and again for W^T u, in 16-byte packs where the rows are (a contiguous weight
whose rows are a whole number of packs; its plans then count threads in packs), else, and under
SN_EXT_CUDA_ROUND=split-scalar, one element at a time.
Bytes are what the kernels read and write (MB), wherever it is served from: a weight that fits in the GPU's L2
(50-60 MB on an H100/H200) is read again from there, not from device memory.

The plan's constants and split rules are those of csrc/cuda/common.cuh (tests/test_benchmarks.py checks the
constants against it).
"""

from __future__ import annotations

import argparse
import math

from .records import markdown_table

# csrc/cuda/common.cuh
THREADS = 256
MIN_BLOCKS_PER_SM = 3
TARGET_BLOCKS = 256
MIN_COLS_PER_SPLIT = 2048
MIN_ROWS_PER_THREAD = 8
ONE_BLOCK_MAX_NUMEL = 1 << 16
ELEMENTS_PER_THREAD = 8
MAX_LAMBDA_BLOCKS = 4 * THREADS
LAMBDA_ITEMS_PER_THREAD = 8
FUSED_MIN_ROWS_PER_BLOCK = 8
REDUCE_COLUMNS = 32
Y_CHUNK = 8 * THREADS
SPLIT_UNROLL = 4
MIN_PASSES = {"forward": 3, "backward": 4}

SHAPES = ["64x3x3x3", "128x128x3x3", "256x256x3x3", "512x512x3x3", "1024x1024", "1024x1024x3x3", "4096x4096"]
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _pow2_at_least(n: int, cap: int) -> int:
    p = 1
    while p < n and p < cap:
        p <<= 1
    return p


def _split(reduced: int, wanted: int, max_splits: int, align: int = 1) -> int:
    splits = max(1, min(wanted, max_splits, 65535))
    chunk = math.ceil(math.ceil(reduced / splits) / align) * align
    return math.ceil(reduced / chunk)


def matvec_blocks(rows: int, cols: int, pack: int = 1) -> tuple[int, int]:
    """(virtual blocks, splits) of W v (plan_matvec; `pack`: elements per 16-byte pack on the packed path, else 1)."""
    splits = max(1, min(math.ceil(TARGET_BLOCKS / rows), math.ceil(cols / MIN_COLS_PER_SPLIT), 65535))
    per_thread = 1 if pack == 1 else pack * (SPLIT_UNROLL // 2 if pack == 8 else SPLIT_UNROLL)  # matvec_unroll
    lanes = _pow2_at_least(math.ceil(math.ceil(cols / splits) / per_thread), THREADS)
    splits = _split(cols, splits, splits, pack)
    return math.ceil(rows / (THREADS // lanes)) * splits, splits


def rmatvec_blocks(rows: int, cols: int, pack: int = 1) -> tuple[int, int]:
    """(virtual blocks, splits) of W^T u (plan_rmatvec)."""
    lanes = _pow2_at_least(cols // pack, THREADS)
    col_blocks = math.ceil(cols // pack / lanes)
    row_lanes = THREADS // lanes
    splits = _split(rows, math.ceil(TARGET_BLOCKS / col_blocks), math.ceil(rows / (row_lanes * MIN_ROWS_PER_THREAD)))
    return col_blocks * splits, splits


def fused_blocks(rows: int) -> int:
    """Blocks of the fused round (fused_blocks in common.cuh)."""
    return math.ceil(rows / max(FUSED_MIN_ROWS_PER_BLOCK, math.ceil(rows / TARGET_BLOCKS)))


def fused_segment(itemsize: int, cols: int) -> int:
    """Columns a thread block holds in registers in the fused round (kFusedElements x kThreads): 64 bytes of sums per
    thread, halved on the element-wise path, taken when a row is not a whole number of 16-byte packs."""
    acc = 8 if itemsize == 8 else 4
    packed = cols % (16 // itemsize) == 0
    return (64 if packed else 32) // acc * THREADS


def forward_round(rows: int, cols: int, itemsize: int, fused: bool, scalar: bool = False) -> tuple[int, int, int, int]:
    """One u-first round: (phases, the largest phase's virtual blocks, reads of W, other bytes: vectors and sums);
    `scalar`: the split round's scalar loops (split-scalar)."""
    acc = 8 if itemsize == 8 else 4
    vectors = itemsize * 2 * (rows + cols)
    if fused:
        blocks = fused_blocks(rows)
        reads = 1 if cols <= fused_segment(itemsize, cols) else 2
        # the fused pass; the column sums (REDUCE_COLUMNS per block) and |y|^2's chunk sums; the normalization, u's
        # and v's elements a thread each
        reduce_blocks = math.ceil(cols / REDUCE_COLUMNS)
        phase_blocks = [
            blocks,
            reduce_blocks + math.ceil(rows / Y_CHUNK),
            math.ceil(rows / THREADS) + math.ceil(cols / THREADS),
        ]
        # the partial z rows and z written once and read once; y written, read by every column-sum block (for |y|),
        # the chunk sums and the normalization
        other = acc * (2 * cols * (blocks + 1) + rows * (3 + reduce_blocks)) + vectors
        return 3, max(phase_blocks), reads, other
    pack = 16 // itemsize
    pack = 1 if scalar or cols % pack else pack  # a contiguous weight: aligned, its rows packs when cols is
    mv, mv_splits = matvec_blocks(rows, cols, pack)
    rmv, rmv_splits = rmatvec_blocks(rows, cols, pack)
    return 4, max(mv, rmv), 2, acc * (mv_splits * rows + rmv_splits * cols) * 2 + vectors


def plan(
    shape: tuple[int, ...], itemsize: int, sms: int, n: int = 1, fused: bool = True, scalar: bool = False
) -> list[dict]:
    """One row per op: spectral_normalize_ (u-first, n rounds, fused or split) and spectral_normalize_backward, for
    dim 0."""
    rows, numel = shape[0], math.prod(shape)
    cols = numel // rows
    elementwise = max(1, min(math.ceil(numel / THREADS), sms * (2048 // THREADS)))
    resident = MIN_BLOCKS_PER_SM * sms
    round_phases, round_blocks, round_reads, round_other = forward_round(rows, cols, itemsize, fused, scalar)
    lam = max(1, min(math.ceil(numel / (THREADS * LAMBDA_ITEMS_PER_THREAD)), MAX_LAMBDA_BLOCKS))
    acc = 8 if itemsize == 8 else 4
    w = numel * itemsize
    ops = {
        # phases, the largest phase's virtual blocks, weight-sized passes, other bytes (vectors and partial sums)
        "forward": (round_phases * n + 1, max(round_blocks, elementwise), round_reads * n + 2, n * round_other),
        "backward": (3, max(lam, elementwise), 4, acc * (lam + 1) + itemsize * (rows + cols)),
    }
    out = []
    for op, (phases, wanted, passes, other) in ops.items():
        one_block = numel <= ONE_BLOCK_MAX_NUMEL
        blocks = 1 if one_block else min(wanted, math.ceil(numel / (THREADS * ELEMENTS_PER_THREAD)), resident)
        out.append(
            {
                "op": "spectral_normalize_" if op == "forward" else "spectral_normalize_backward",
                "blocks": "1 (one block)" if one_block else str(blocks),
                "launches": "1" if one_block else f"1 (phased: {phases})",
                "grid barriers": 0 if one_block else phases - 1,
                "passes": passes,
                "minimum passes": MIN_PASSES[op],
                "bytes": passes * w + other,
                "minimum bytes": MIN_PASSES[op] * w,
            }
        )
    return out


def table(shapes: list[str], dtype: str, sms: int, fused: bool = True, scalar: bool = False) -> str:
    rows = []
    for text in shapes:
        shape = tuple(int(s) for s in text.split("x"))
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_plan", description=__doc__)
    p.add_argument("--shape", action="append", help="weight shape, e.g. 300x200x3x3 (default: the baseline shapes)")
    p.add_argument("--dtype", default="float32", choices=list(ITEMSIZE))
    p.add_argument("--sms", type=int, default=132, help="the GPU's SM count (H100/H200 SXM: 132)")
    p.add_argument(
        "--round",
        default="fused",
        choices=["fused", "split", "split-scalar"],
        help="the round mode (SN_EXT_CUDA_ROUND)",
    )
    args = p.parse_args(argv)
    print(f"{args.dtype}, one power iteration (u-first, {args.round} round), dim 0, {args.sms} SMs:\n")
    print(
        table(
            args.shape or SHAPES, args.dtype, args.sms, fused=args.round == "fused", scalar=args.round == "split-scalar"
        )
    )


if __name__ == "__main__":
    main()
