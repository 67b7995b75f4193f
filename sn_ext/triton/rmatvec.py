"""z = Wm^T y, split over the rows: phase 1 of a half-step that makes v (u-first: v = N(W^T u)).

Grid (col_blocks, splits). Program (b, s) sums the rows of split s for columns [b * BLOCK_COLS, ...) and writes
one partial sum per column; normalize_kernel adds the splits in order (deterministic).
"""

import triton
import triton.language as tl

from ._helpers import matrix_offsets


@triton.jit
def rmatvec_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    y_ptr,  # (rows,) stride y_stride: the vector, weight dtype
    part_ptr,  # (splits, cols) contiguous, accumulation dtype: part[s, c] = sum over split s's rows i of Wm[i, c] y[i]
    rows,
    cols,
    inner,
    s_outer,
    s_row,
    s_inner,
    y_stride,
    rows_per_split,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    block = tl.program_id(0)
    split = tl.program_id(1)
    col_idx = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = col_idx < cols
    begin = split * rows_per_split
    end = tl.minimum(begin + rows_per_split, rows)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
    for start in range(begin, end, BLOCK_ROWS):
        row_idx = start + tl.arange(0, BLOCK_ROWS)
        row_mask = row_idx < end
        offsets = matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner)
        w = tl.load(w_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(acc_dtype)
        y = tl.load(y_ptr + row_idx.to(tl.int64) * y_stride, mask=row_mask, other=0.0).to(acc_dtype)
        acc += w * y[:, None]
    tl.store(part_ptr + split * cols + col_idx, tl.sum(acc, axis=0), mask=col_mask)
