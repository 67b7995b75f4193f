"""Backward, stage 2: grad_W = (grad - lambda u v^T) / sigma, elementwise over the matrix view.

Every program adds lambda_partial_kernel's partial sums itself, in the same order (so all get the same lambda,
and no one-program launch is needed in between), then writes its tile. The operation order is the C++ kernels':
(g - (lambda u_i) v_c) / sigma.
"""

import triton
import triton.language as tl

from ._helpers import matrix_offsets, precise_div


@triton.jit
def backward_kernel(
    g_ptr,  # (outer, rows, inner) strided: the incoming gradient's matrix view, weight dtype
    out_ptr,  # (outer, rows, inner) strided (its own strides): grad_W, weight dtype
    u_ptr,  # (rows,) stride u_stride, weight dtype
    v_ptr,  # (cols,) stride v_stride, weight dtype
    part_ptr,  # (parts,) accumulation dtype: the partial sums of lambda = <grad, W_sn>
    sigma_ptr,  # () accumulation dtype
    rows,
    cols,
    inner,
    g_outer,
    g_row,
    g_inner,
    o_outer,
    o_row,
    o_inner,
    u_stride,
    v_stride,
    col_blocks,
    parts,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_PARTS: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    part_idx = tl.arange(0, BLOCK_PARTS)
    lam = tl.sum(tl.load(part_ptr + part_idx, mask=part_idx < parts, other=0.0), axis=0)
    sigma = tl.load(sigma_ptr)
    tile = tl.program_id(0)
    row_idx = (tile // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_idx = (tile % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = row_idx < rows
    col_mask = col_idx < cols
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(g_ptr + matrix_offsets(row_idx, col_idx, inner, g_outer, g_row, g_inner), mask=mask, other=0.0)
    u = tl.load(u_ptr + row_idx.to(tl.int64) * u_stride, mask=row_mask, other=0.0).to(acc_dtype)
    v = tl.load(v_ptr + col_idx.to(tl.int64) * v_stride, mask=col_mask, other=0.0).to(acc_dtype)
    corrected = g.to(acc_dtype) - (lam * u)[:, None] * v[None, :]
    out = precise_div(corrected, sigma).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)
