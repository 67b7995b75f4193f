"""The whole backward in one program, for small weights (one launch instead of two):
lambda = <grad, W_sn>, then grad_W = (grad - lambda u v^T) / sigma, as lambda_partial_kernel + backward_kernel."""

import triton
import triton.language as tl

from ._helpers import matrix_offsets, precise_div


@triton.jit
def fused_backward_kernel(
    g_ptr,  # (outer, rows, inner) strided: the incoming gradient's matrix view, weight dtype
    s_ptr,  # (outer, rows, inner) strided (its own strides): W_sn's matrix view, weight dtype
    out_ptr,  # (outer, rows, inner) strided (its own strides): grad_W, weight dtype
    u_ptr,  # (rows,) stride u_stride, weight dtype
    v_ptr,  # (cols,) stride v_stride, weight dtype
    sigma_ptr,  # () accumulation dtype
    rows,
    cols,
    inner,
    g_outer,
    g_row,
    g_inner,
    s_outer,
    s_row,
    s_inner,
    o_outer,
    o_row,
    o_inner,
    u_stride,
    v_stride,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    sigma = tl.load(sigma_ptr)
    acc_dtype = sigma.dtype
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
    for row_start in range(0, rows, BLOCK_ROWS):
        row_idx = row_start + tl.arange(0, BLOCK_ROWS)
        for col_start in range(0, cols, BLOCK_COLS):
            col_idx = col_start + tl.arange(0, BLOCK_COLS)
            mask = (row_idx < rows)[:, None] & (col_idx < cols)[None, :]
            g = tl.load(g_ptr + matrix_offsets(row_idx, col_idx, inner, g_outer, g_row, g_inner), mask=mask, other=0.0)
            s = tl.load(s_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner), mask=mask, other=0.0)
            acc += g.to(acc_dtype) * s.to(acc_dtype)
    lam = tl.sum(tl.sum(acc, axis=1), axis=0)
    for row_start in range(0, rows, BLOCK_ROWS):
        row_idx = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = row_idx < rows
        lam_u = lam * tl.load(u_ptr + row_idx.to(tl.int64) * u_stride, mask=row_mask, other=0.0).to(acc_dtype)
        for col_start in range(0, cols, BLOCK_COLS):
            col_idx = col_start + tl.arange(0, BLOCK_COLS)
            col_mask = col_idx < cols
            mask = row_mask[:, None] & col_mask[None, :]
            g = tl.load(g_ptr + matrix_offsets(row_idx, col_idx, inner, g_outer, g_row, g_inner), mask=mask, other=0.0)
            v = tl.load(v_ptr + col_idx.to(tl.int64) * v_stride, mask=col_mask, other=0.0).to(acc_dtype)
            out = precise_div(g.to(acc_dtype) - lam_u[:, None] * v[None, :], sigma).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)
