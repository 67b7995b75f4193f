"""Backward, stage 1: lambda = <grad, W_sn>, one partial sum per program over a fixed share of the tiles.

Grid (programs,): program p sums tiles p, p + programs, ... (a share fixed by the shape: deterministic).
backward_kernel adds the partial sums in order.
"""

import triton
import triton.language as tl

from ._helpers import matrix_offsets


@triton.jit
def lambda_partial_kernel(
    g_ptr,  # (outer, rows, inner) strided: the incoming gradient's matrix view, weight dtype
    s_ptr,  # (outer, rows, inner) strided (its own strides): W_sn's matrix view, weight dtype
    part_ptr,  # (programs,) accumulation dtype: part[p] = program p's share of <grad, W_sn>
    rows,
    cols,
    inner,
    g_outer,
    g_row,
    g_inner,
    s_outer,
    s_row,
    s_inner,
    col_blocks,
    tiles,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    program = tl.program_id(0)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
    for tile in range(program, tiles, tl.num_programs(0)):
        row_idx = (tile // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col_idx = (tile % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (row_idx < rows)[:, None] & (col_idx < cols)[None, :]
        g = tl.load(g_ptr + matrix_offsets(row_idx, col_idx, inner, g_outer, g_row, g_inner), mask=mask, other=0.0)
        s = tl.load(s_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner), mask=mask, other=0.0)
        acc += g.to(acc_dtype) * s.to(acc_dtype)
    tl.store(part_ptr + program, tl.sum(tl.sum(acc, axis=1), axis=0))
