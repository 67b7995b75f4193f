"""y = Wm x, split over the columns: phase 1 of a half-step that makes u (u-first: u = N(W v)).

Grid (row_blocks, splits). Program (b, s) sums the columns of split s for rows [b * BLOCK_ROWS, ...) and writes
one partial sum per row; normalize_kernel adds the splits in order (deterministic: the split depends on the shape
only). Splitting the columns keeps a short-and-wide (1 x N) matrix from running on one program.
"""

import triton
import triton.language as tl

from ._helpers import matrix_offsets


@triton.jit
def matvec_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    x_ptr,  # (cols,) stride x_stride: the vector, weight dtype
    # (splits, rows) contiguous, accumulation dtype: part[s, i] = sum over split s's columns c of Wm[i, c] x[c]
    part_ptr,
    rows,
    cols,
    inner,
    s_outer,
    s_row,
    s_inner,
    x_stride,
    cols_per_split,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    block = tl.program_id(0)
    split = tl.program_id(1)
    row_idx = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_idx < rows
    begin = split * cols_per_split
    end = tl.minimum(begin + cols_per_split, cols)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
    for start in range(begin, end, BLOCK_COLS):
        col_idx = start + tl.arange(0, BLOCK_COLS)
        col_mask = col_idx < end
        offsets = matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner)
        w = tl.load(w_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(acc_dtype)
        x = tl.load(x_ptr + col_idx.to(tl.int64) * x_stride, mask=col_mask, other=0.0).to(acc_dtype)
        acc += w * x[None, :]
    tl.store(part_ptr + split * rows + row_idx, tl.sum(acc, axis=1), mask=row_mask)
