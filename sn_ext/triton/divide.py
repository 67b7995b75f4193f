"""W_sn = W / sigma, elementwise over the matrix view (sigma read from the device: no host synchronisation).

Grid: one program per (BLOCK_ROWS x BLOCK_COLS) tile, tile t = (t // col_blocks, t % col_blocks).
"""

import triton
import triton.language as tl

from ._helpers import matrix_offsets, precise_div


@triton.jit
def divide_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    out_ptr,  # (outer, rows, inner) strided (its own strides): W_sn, weight dtype
    sigma_ptr,  # () accumulation dtype
    rows,
    cols,
    inner,
    s_outer,
    s_row,
    s_inner,
    o_outer,
    o_row,
    o_inner,
    col_blocks,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    tile = tl.program_id(0)
    row_idx = (tile // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_idx = (tile % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (row_idx < rows)[:, None] & (col_idx < cols)[None, :]
    sigma = tl.load(sigma_ptr)
    w = tl.load(w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner), mask=mask, other=0.0)
    out = precise_div(w.to(sigma.dtype), sigma).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)
