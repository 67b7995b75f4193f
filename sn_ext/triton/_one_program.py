"""The one-program forward (fused_forward_kernel): for weights of at most _host.FUSED_MAX_NUMEL elements, one launch
does every round of power iteration, sigma and W / sigma (or a scaled form's W g / max(sigma, f))."""

import triton
import triton.language as tl

from ._helpers import (
    clamp_min_eps,
    finish,
    kernel,
    matrix_offsets,
    precise_div,
    precise_sqrt,
    scaled_factors,
    usable,
)

# ---- fused_forward_kernel ----
# The whole forward in one program, for small weights (one launch): n rounds of power iteration, sigma, W / sigma.
#
# Semantics of the CPU kernels (csrc/cpu). Each round rounds the new vector to the weight's dtype (it lives in
# u_new / v_new, the outputs, between half-steps, as torch's buffers do); sums, norms and sigma are in the
# accumulation dtype (float32, float64 for float64 weights).
#
# ONE_PASS rounds read W once instead of twice (the C++ kernel's matvec_and_gram): for u-first, each strip of
# STRIP rows is loaded once and gives both y = W v for its rows and its share y_i W[i, :] of W^T y, so
# u = N(y) and v = N(W^T y / max(|y|, eps)) (W^T of u before its rounding to the weight's dtype, as the C++ kernel).
# v-first is the transpose: strips of columns give z = W^T u and W z. The host enables it when the whole row
# (u-first) or column (v-first) fits in registers (FULL elements).
#
# Vectors written by one phase are read by other threads in the next, so phases are separated by barriers; the
# scratch vectors y, z hold raw (unnormalized) products.


@triton.jit
def _copy(src_ptr, src_stride, dst_ptr, n, BLOCK: tl.constexpr):
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n
        tl.store(dst_ptr + idx, tl.load(src_ptr + idx.to(tl.int64) * src_stride, mask=mask, other=0.0), mask=mask)


@triton.jit
def _matvec(
    w_ptr, x_ptr, y_ptr, rows, cols, inner, s_outer, s_row, s_inner, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """y = Wm x (x contiguous, weight dtype; y raw, accumulation dtype); returns |y|^2."""
    acc_dtype = y_ptr.dtype.element_ty
    squares = tl.zeros([BLOCK_ROWS], acc_dtype)
    for row_start in range(0, rows, BLOCK_ROWS):
        row_idx = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = row_idx < rows
        acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
        for col_start in range(0, cols, BLOCK_COLS):
            col_idx = col_start + tl.arange(0, BLOCK_COLS)
            col_mask = col_idx < cols
            w = tl.load(
                w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner),
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(acc_dtype)
            x = tl.load(x_ptr + col_idx, mask=col_mask, other=0.0).to(acc_dtype)
            acc += w * x[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + row_idx, y, mask=row_mask)
        squares += y * y
    return tl.sum(squares, axis=0)


@triton.jit
def _rmatvec(
    w_ptr, y_ptr, z_ptr, rows, cols, inner, s_outer, s_row, s_inner, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """z = Wm^T y (y contiguous, weight dtype; z raw, accumulation dtype); returns |z|^2."""
    acc_dtype = z_ptr.dtype.element_ty
    squares = tl.zeros([BLOCK_COLS], acc_dtype)
    for col_start in range(0, cols, BLOCK_COLS):
        col_idx = col_start + tl.arange(0, BLOCK_COLS)
        col_mask = col_idx < cols
        acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
        for row_start in range(0, rows, BLOCK_ROWS):
            row_idx = row_start + tl.arange(0, BLOCK_ROWS)
            row_mask = row_idx < rows
            w = tl.load(
                w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner),
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(acc_dtype)
            y = tl.load(y_ptr + row_idx, mask=row_mask, other=0.0).to(acc_dtype)
            acc += w * y[:, None]
        z = tl.sum(acc, axis=0)
        tl.store(z_ptr + col_idx, z, mask=col_mask)
        squares += z * z
    return tl.sum(squares, axis=0)


@triton.jit
def _normalize_into(raw_ptr, out_ptr, n, denom, BLOCK: tl.constexpr):
    """out = round_to_weight_dtype(raw / denom)."""
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n
        raw = tl.load(raw_ptr + idx, mask=mask, other=0.0)
        tl.store(out_ptr + idx, precise_div(raw, denom).to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def fused_forward_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    u_ptr,  # (rows,) stride u_stride, weight dtype: the input u, updated in place (not when n == 0 or degenerate)
    v_ptr,  # (cols,) stride v_stride, weight dtype: the input v, likewise
    out_ptr,  # (outer, rows, inner) strided (its own strides): W_sn, weight dtype
    sigma_ptr,  # () accumulation dtype
    u_new_ptr,  # (rows,) contiguous, weight dtype: u after n rounds (the input u if a round was degenerate)
    v_new_ptr,  # (cols,) contiguous, weight dtype: v after n rounds (likewise)
    # weight dtype, read as (rows + cols,) of the accumulation dtype: y, the raw W v of a round, then z, the raw W^T u.
    # May be out's memory (the host passes out where it is large enough: one allocation less): every read of it
    # precedes the barrier that ends the last round, before out is written.
    scratch_ptr,
    rows,
    cols,
    inner,
    s_outer,
    s_row,
    s_inner,
    o_outer,
    o_row,
    o_inner,
    u_stride,
    v_stride,
    n_iters,
    eps: tl.float64,  # float64 (a Python float would be float32), rounded to the accumulation dtype below
    gamma_ptr,  # SCALED: () any float dtype: gamma (has_gamma 1); else unread
    coeff: tl.float64,  # SCALED: the bound (has_coeff 1)
    has_coeff,
    has_gamma,
    V_FIRST: tl.constexpr,
    ONE_PASS: tl.constexpr,
    N_ZERO: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_VEC: tl.constexpr,
    FULL: tl.constexpr,
    STRIP: tl.constexpr,
    SCALED: tl.constexpr,  # W g / max(sigma, f) (scaled_factors) instead of W / sigma
):
    acc_dtype = sigma_ptr.dtype.element_ty
    eps = tl.full([], eps, acc_dtype)
    y_ptr = scratch_ptr.to(tl.pointer_type(acc_dtype))
    z_ptr = y_ptr + rows
    _copy(u_ptr, u_stride, u_new_ptr, rows, BLOCK_VEC)
    _copy(v_ptr, v_stride, v_new_ptr, cols, BLOCK_VEC)
    tl.debug_barrier()
    ok = tl.full([], 1, tl.int32)
    last = tl.full([], 0.0, acc_dtype)
    for _ in range(0, n_iters):
        if ONE_PASS:
            if V_FIRST:
                # z = W^T u strip by strip of columns, and y = W z, reading each strip once.
                row_idx = tl.arange(0, FULL)
                row_mask = row_idx < rows
                u = tl.load(u_new_ptr + row_idx, mask=row_mask, other=0.0).to(acc_dtype)
                y = tl.zeros([FULL], acc_dtype)
                z_squares = tl.zeros([STRIP], acc_dtype)
                for col_start in range(0, cols, STRIP):
                    col_idx = col_start + tl.arange(0, STRIP)
                    col_mask = col_idx < cols
                    w = tl.load(
                        w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner),
                        mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0,
                    ).to(acc_dtype)
                    z = tl.sum(w * u[:, None], axis=0)
                    tl.store(z_ptr + col_idx, z, mask=col_mask)
                    z_squares += z * z
                    y += tl.sum(w * z[None, :], axis=1)
                tl.debug_barrier()
                norm_v = precise_sqrt(tl.sum(z_squares, axis=0))
                denom_v = clamp_min_eps(norm_v, eps)
                _normalize_into(z_ptr, v_new_ptr, cols, denom_v, BLOCK_VEC)
                y = precise_div(y, denom_v)
                norm_u = precise_sqrt(tl.sum(y * y, axis=0))
                denom_u = clamp_min_eps(norm_u, eps)
                tl.store(u_new_ptr + row_idx, precise_div(y, denom_u).to(u_new_ptr.dtype.element_ty), mask=row_mask)
                ok = ok & usable(norm_v) & usable(norm_u)
                last = norm_u
            else:
                # y = W v strip by strip of rows, and W^T y, reading each strip once.
                col_idx = tl.arange(0, FULL)
                col_mask = col_idx < cols
                v = tl.load(v_new_ptr + col_idx, mask=col_mask, other=0.0).to(acc_dtype)
                z = tl.zeros([FULL], acc_dtype)
                y_squares = tl.zeros([STRIP], acc_dtype)
                for row_start in range(0, rows, STRIP):
                    row_idx = row_start + tl.arange(0, STRIP)
                    row_mask = row_idx < rows
                    w = tl.load(
                        w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner),
                        mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0,
                    ).to(acc_dtype)
                    y = tl.sum(w * v[None, :], axis=1)
                    tl.store(y_ptr + row_idx, y, mask=row_mask)
                    y_squares += y * y
                    z += tl.sum(w * y[:, None], axis=0)
                tl.debug_barrier()
                norm_u = precise_sqrt(tl.sum(y_squares, axis=0))
                denom_u = clamp_min_eps(norm_u, eps)
                _normalize_into(y_ptr, u_new_ptr, rows, denom_u, BLOCK_VEC)
                z = precise_div(z, denom_u)
                norm_v = precise_sqrt(tl.sum(z * z, axis=0))
                denom_v = clamp_min_eps(norm_v, eps)
                tl.store(v_new_ptr + col_idx, precise_div(z, denom_v).to(v_new_ptr.dtype.element_ty), mask=col_mask)
                ok = ok & usable(norm_u) & usable(norm_v)
                last = norm_v
            tl.debug_barrier()
        else:
            if V_FIRST:
                norm_v = precise_sqrt(
                    _rmatvec(
                        w_ptr, u_new_ptr, z_ptr, rows, cols, inner, s_outer, s_row, s_inner, BLOCK_ROWS, BLOCK_COLS
                    )
                )
                tl.debug_barrier()
                _normalize_into(z_ptr, v_new_ptr, cols, clamp_min_eps(norm_v, eps), BLOCK_VEC)
                tl.debug_barrier()
                norm_u = precise_sqrt(
                    _matvec(w_ptr, v_new_ptr, y_ptr, rows, cols, inner, s_outer, s_row, s_inner, BLOCK_ROWS, BLOCK_COLS)
                )
                tl.debug_barrier()
                _normalize_into(y_ptr, u_new_ptr, rows, clamp_min_eps(norm_u, eps), BLOCK_VEC)
                ok = ok & usable(norm_v) & usable(norm_u)
                last = norm_u
            else:
                norm_u = precise_sqrt(
                    _matvec(w_ptr, v_new_ptr, y_ptr, rows, cols, inner, s_outer, s_row, s_inner, BLOCK_ROWS, BLOCK_COLS)
                )
                tl.debug_barrier()
                _normalize_into(y_ptr, u_new_ptr, rows, clamp_min_eps(norm_u, eps), BLOCK_VEC)
                tl.debug_barrier()
                norm_v = precise_sqrt(
                    _rmatvec(
                        w_ptr, u_new_ptr, z_ptr, rows, cols, inner, s_outer, s_row, s_inner, BLOCK_ROWS, BLOCK_COLS
                    )
                )
                tl.debug_barrier()
                _normalize_into(z_ptr, v_new_ptr, cols, clamp_min_eps(norm_v, eps), BLOCK_VEC)
                ok = ok & usable(norm_u) & usable(norm_v)
                last = norm_v
            tl.debug_barrier()
    if N_ZERO:
        # sigma = u^T W v for the input vectors (already copied to u_new, v_new), a row block at a time: W v is
        # never stored (storing it and summing u_i y_i after a barrier made ptxas spill).
        total = tl.zeros([BLOCK_ROWS], acc_dtype)
        for row_start in range(0, rows, BLOCK_ROWS):
            row_idx = row_start + tl.arange(0, BLOCK_ROWS)
            row_mask = row_idx < rows
            acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
            for col_start in range(0, cols, BLOCK_COLS):
                col_idx = col_start + tl.arange(0, BLOCK_COLS)
                col_mask = col_idx < cols
                w = tl.load(
                    w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner),
                    mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0,
                ).to(acc_dtype)
                acc += w * tl.load(v_new_ptr + col_idx, mask=col_mask, other=0.0).to(acc_dtype)[None, :]
            u = tl.load(u_new_ptr + row_idx, mask=row_mask, other=0.0).to(acc_dtype)
            total += u * tl.sum(acc, axis=1)
        sigma = tl.sum(total, axis=0)
    else:
        sigma = precise_div(last * last, clamp_min_eps(last, eps))
        finish(u_ptr, u_stride, u_new_ptr, rows, ok, BLOCK_VEC)
        finish(v_ptr, v_stride, v_new_ptr, cols, ok, BLOCK_VEC)
    tl.store(sigma_ptr, sigma)
    scale = sigma
    if SCALED:
        divisor, numerator = scaled_factors(sigma, coeff, has_coeff, gamma_ptr, has_gamma)
        scale = precise_div(numerator, divisor)
    for row_start in range(0, rows, BLOCK_ROWS):
        row_idx = row_start + tl.arange(0, BLOCK_ROWS)
        for col_start in range(0, cols, BLOCK_COLS):
            col_idx = col_start + tl.arange(0, BLOCK_COLS)
            mask = (row_idx < rows)[:, None] & (col_idx < cols)[None, :]
            w = tl.load(w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner), mask=mask, other=0.0)
            if SCALED:
                out = (w.to(acc_dtype) * scale).to(out_ptr.dtype.element_ty)
            else:
                out = precise_div(w.to(acc_dtype), sigma).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)
