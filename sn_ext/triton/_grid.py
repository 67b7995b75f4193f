"""The grid forward's kernels shared by its rounds: the split W passes (matvec_kernel, rmatvec_kernel), the
one-program normalize (normalize_kernel), sigma for n == 0 (sigma_dot_kernel) and W / sigma (divide_kernel). A
u-first round may read W once instead (_gram.py). Sums are split by the shape only (never by timing or device), so
results are deterministic.
"""

import triton
import triton.language as tl

from ._helpers import (
    clamp_min_eps,
    finish,
    finish_block,
    kernel,
    matrix_offsets,
    precise_div,
    precise_sqrt,
    scaled_factors,
    sum_partials,
    usable,
    workspace,
)


@triton.jit
def _tile_rows_dot(
    w_ptr,
    x_ptr,
    x_stride,
    row_idx,
    row_mask,
    begin,
    end,
    inner,
    s_outer,
    s_row,
    s_inner,
    acc_dtype: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    STAGES: tl.constexpr,
):
    """sum over the columns c in [begin, end) of Wm[row_idx, c] x[c] ([BLOCK_ROWS], acc_dtype), pipelined."""
    acc = tl.zeros([row_idx.shape[0], BLOCK_COLS], acc_dtype)
    for start in tl.range(begin, end, BLOCK_COLS, num_stages=STAGES):
        col_idx = start + tl.arange(0, BLOCK_COLS)
        col_mask = col_idx < end
        offsets = matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner)
        w = tl.load(w_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(acc_dtype)
        x = tl.load(x_ptr + col_idx.to(tl.int64) * x_stride, mask=col_mask, other=0.0).to(acc_dtype)
        acc += w * x[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _tile_cols_dot(
    w_ptr,
    y_ptr,
    y_stride,
    col_idx,
    col_mask,
    begin,
    end,
    inner,
    s_outer,
    s_row,
    s_inner,
    acc_dtype: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    STAGES: tl.constexpr,
):
    """sum over the rows i in [begin, end) of y[i] Wm[i, col_idx] ([BLOCK_COLS], acc_dtype), pipelined."""
    acc = tl.zeros([BLOCK_ROWS, col_idx.shape[0]], acc_dtype)
    for start in tl.range(begin, end, BLOCK_ROWS, num_stages=STAGES):
        row_idx = start + tl.arange(0, BLOCK_ROWS)
        row_mask = row_idx < end
        offsets = matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner)
        w = tl.load(w_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(acc_dtype)
        y = tl.load(y_ptr + row_idx.to(tl.int64) * y_stride, mask=row_mask, other=0.0).to(acc_dtype)
        acc += w * y[:, None]
    return tl.sum(acc, axis=0)


# ---- matvec_kernel ----
# y = Wm x, split over the columns: phase 1 of a half-step that makes u (u-first: u = N(W v)).
#
# Grid (row_blocks, splits). Program (b, s) sums the columns of split s for rows [b * BLOCK_ROWS, ...) and writes
# one partial sum per row; normalize_kernel adds the splits in order (deterministic: the split depends on the shape
# only). Splitting the columns keeps a short-and-wide (1 x N) matrix from running on one program. The loop keeps
# STAGES tiles in flight (cp.async): with ~2 programs per SM, one tile at a time leaves the memory system idle.


@kernel
def matvec_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    x_ptr,  # (cols,) stride x_stride: the vector, weight dtype
    ws_ptr,  # the workspace (_helpers.workspace); its partial sums (splits, rows): split s's columns c of Wm[i, c] x[c]
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
    STAGES: tl.constexpr,
):
    acc_dtype = ws_ptr.dtype.element_ty
    _, _, _, _, part_ptr = workspace(ws_ptr, rows)
    block = tl.program_id(0)
    split = tl.program_id(1)
    row_idx = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_idx < rows
    begin = split * cols_per_split
    end = tl.minimum(begin + cols_per_split, cols)
    y = _tile_rows_dot(
        w_ptr,
        x_ptr,
        x_stride,
        row_idx,
        row_mask,
        begin,
        end,
        inner,
        s_outer,
        s_row,
        s_inner,
        acc_dtype,
        BLOCK_COLS,
        STAGES,
    )
    tl.store(part_ptr + split.to(tl.int64) * rows + row_idx, y, mask=row_mask)


# ---- rmatvec_kernel ----
# z = Wm^T y, split over the rows: phase 1 of a half-step that makes v (u-first: v = N(W^T u)).
#
# Grid (col_blocks, splits). Program (b, s) sums the rows of split s for columns [b * BLOCK_COLS, ...) and writes
# one partial sum per column; normalize_kernel adds the splits in order (deterministic). Pipelined as matvec_kernel.


@kernel
def rmatvec_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    y_ptr,  # (rows,) stride y_stride: the vector, weight dtype
    ws_ptr,  # the workspace (_helpers.workspace); its partial sums (splits, cols): split s's rows i of Wm[i, c] y[i]
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
    STAGES: tl.constexpr,
):
    acc_dtype = ws_ptr.dtype.element_ty
    _, _, _, _, part_ptr = workspace(ws_ptr, rows)
    block = tl.program_id(0)
    split = tl.program_id(1)
    col_idx = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = col_idx < cols
    begin = split * rows_per_split
    end = tl.minimum(begin + rows_per_split, rows)
    z = _tile_cols_dot(
        w_ptr,
        y_ptr,
        y_stride,
        col_idx,
        col_mask,
        begin,
        end,
        inner,
        s_outer,
        s_row,
        s_inner,
        acc_dtype,
        BLOCK_ROWS,
        STAGES,
    )
    tl.store(part_ptr + split.to(tl.int64) * cols + col_idx, z, mask=col_mask)


# ---- normalize_kernel ----
# Phase 2 of a half-step, one program: add the splits of matvec/rmatvec (or take gram_reduce's z, one split),
# normalize, track degenerate rounds, and on the last half-step write sigma and restore the input vectors if any round
# was degenerate.
#
#     x = sum_s part[s]       out = round_to_weight_dtype(x / max(|x|, eps))
#     flag = 1 while every norm so far was finite and non-zero (read from the previous half-step, unless `first`)
#     last: sigma = |x|^2 / max(|x|, eps); if flag is 1, out_in <- out and other_in <- other (the caller's u and v
#     updated in place), else out <- out_in and other <- other_in (the input vectors come back)
#
# `first` and `last` are arguments, not constexprs: one compiled variant serves every half-step. The raw vector is
# summed twice (once for its norm, once to normalize) rather than written and read back, so no element is ever read
# by a thread other than the one that wrote it.


@triton.jit
def _raw(part_ptr, idx, mask, n, splits, acc_dtype: tl.constexpr, BLOCK: tl.constexpr):
    x = tl.zeros([BLOCK], acc_dtype)
    for s in range(0, splits):
        x += tl.load(part_ptr + s * n + idx, mask=mask, other=0.0)
    return x


@kernel
def normalize_kernel(
    ws_ptr,  # the workspace (_helpers.workspace): its flag, and the partial sums (splits, n) of the raw vector x
    out_ptr,  # (n,) contiguous, weight dtype: the new vector (u_new or v_new)
    out_in_ptr,  # (n,) stride out_in_stride, weight dtype: the caller's vector of the same name (last only)
    other_ptr,  # (other_n,) contiguous, weight dtype: the other new vector, written earlier (last only)
    other_in_ptr,  # (other_n,) stride other_in_stride, weight dtype: the caller's other vector (last only)
    sigma_ptr,  # () accumulation dtype: sigma, written on the last half-step
    rows,
    n,
    splits,
    other_n,
    out_in_stride,
    other_in_stride,
    eps: tl.float64,  # float64 (a Python float would be float32), rounded to the accumulation dtype below
    first,
    last,
    BLOCK: tl.constexpr,
):
    acc_dtype = ws_ptr.dtype.element_ty
    eps = tl.full([], eps, acc_dtype)
    flag_ptr, _, _, _, part_ptr = workspace(ws_ptr, rows)
    offs = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, n, BLOCK):
        idx = start + offs
        x = _raw(part_ptr, idx, idx < n, n, splits, acc_dtype, BLOCK)
        squares += x * x
    norm = precise_sqrt(tl.sum(squares, axis=0))
    denom = clamp_min_eps(norm, eps)
    ok = usable(norm)
    if first == 0:
        ok = ok & (tl.load(flag_ptr) != 0).to(tl.int32)
    if last != 0:
        tl.store(sigma_ptr, precise_div(norm * norm, denom))
    else:
        tl.store(flag_ptr, ok.to(acc_dtype))
    for start in range(0, n, BLOCK):
        idx = start + offs
        mask = idx < n
        x = _raw(part_ptr, idx, mask, n, splits, acc_dtype, BLOCK)
        y = precise_div(x, denom).to(out_ptr.dtype.element_ty)
        if last != 0:
            in_offsets = idx.to(tl.int64) * out_in_stride
            y = tl.where(ok != 0, y, tl.load(out_in_ptr + in_offsets, mask=mask, other=0.0))
            tl.store(out_in_ptr + in_offsets, y, mask=mask & (ok != 0))
        tl.store(out_ptr + idx, y, mask=mask)
    if last != 0:
        finish(other_in_ptr, other_in_stride, other_ptr, other_n, ok, BLOCK)


# ---- sigma_dot_kernel ----
# n_power_iterations == 0, one program: sigma = u^T (W v) from matvec_kernel's partial sums of W v, and
# u_new, v_new = copies of the input vectors.


@kernel
def sigma_dot_kernel(
    ws_ptr,  # the workspace (_helpers.workspace): its partial sums (splits, rows) of W v
    u_ptr,  # (rows,) stride u_stride, weight dtype: the input u
    v_ptr,  # (cols,) stride v_stride, weight dtype: the input v
    u_new_ptr,  # (rows,) contiguous, weight dtype: receives a copy of u
    v_new_ptr,  # (cols,) contiguous, weight dtype: receives a copy of v
    sigma_ptr,  # () accumulation dtype: u^T W v
    rows,
    cols,
    splits,
    u_stride,
    v_stride,
    BLOCK: tl.constexpr,
):
    acc_dtype = ws_ptr.dtype.element_ty
    _, _, _, _, part_ptr = workspace(ws_ptr, rows)
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, rows, BLOCK):
        idx = start + offs
        mask = idx < rows
        y = tl.zeros([BLOCK], acc_dtype)
        for s in range(0, splits):
            y += tl.load(part_ptr + s * rows + idx, mask=mask, other=0.0)
        u = tl.load(u_ptr + idx.to(tl.int64) * u_stride, mask=mask, other=0.0)
        tl.store(u_new_ptr + idx, u, mask=mask)
        total += u.to(acc_dtype) * y
    tl.store(sigma_ptr, tl.sum(total, axis=0))
    for start in range(0, cols, BLOCK):
        idx = start + offs
        mask = idx < cols
        tl.store(v_new_ptr + idx, tl.load(v_ptr + idx.to(tl.int64) * v_stride, mask=mask, other=0.0), mask=mask)


# ---- divide_kernel ----
# W_sn = W / sigma, elementwise over the matrix view (sigma read from the device: no host synchronisation); SCALED,
# a scaled form's W g / max(sigma, f) (gamma read from the device too).
#
# Grid: one program per (BLOCK_ROWS x BLOCK_COLS) tile, tile t = (t // col_blocks, t % col_blocks).
#
# FINISH (after a gram round: _gram.py): the round's last half-step too, spread over the tiles instead of one more
# one-program launch. Every program adds gram_reduce's partial sums of |z|^2 (the same order: the same value in all),
# so |z|, sigma = |z|^2 / max(|z|, eps) and the round's flag; the programs of the first row of tiles write
# v = round_to_weight_dtype(z / max(|z|, eps)) for their columns and those of the first column of tiles finish u
# for their rows (as normalize_kernel's last half-step: the caller's vectors updated, or the inputs restored).


@kernel
def divide_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    out_ptr,  # (outer, rows, inner) strided (its own strides): W_sn, weight dtype
    sigma_ptr,  # () accumulation dtype: read, or with FINISH written
    ws_ptr,  # FINISH: the workspace (_helpers.workspace): flag, |z|^2 partials, z (the first row of the partial sums)
    u_ptr,  # FINISH: (rows,) stride u_stride, weight dtype: the caller's u
    v_ptr,  # FINISH: (cols,) stride v_stride, weight dtype: the caller's v
    u_new_ptr,  # FINISH: (rows,) contiguous, weight dtype: the new u (gram_reduce wrote it)
    v_new_ptr,  # FINISH: (cols,) contiguous, weight dtype: receives the new v
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
    reducers,
    u_stride,
    v_stride,
    eps: tl.float64,
    gamma_ptr,  # SCALED: () any float dtype: gamma (has_gamma 1); else unread
    coeff: tl.float64,  # SCALED: the bound (has_coeff 1)
    has_coeff,
    has_gamma,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    FINISH: tl.constexpr,
    SCALED: tl.constexpr,  # W g / max(sigma, f) (scaled_factors) instead of W / sigma
):
    tile = tl.program_id(0)
    row_block = tile // col_blocks
    col_block = tile % col_blocks
    row_idx = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_idx = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = row_idx < rows
    col_mask = col_idx < cols
    if FINISH:
        acc_dtype = ws_ptr.dtype.element_ty
        flag_ptr, _, z_squares_ptr, _, z_ptr = workspace(ws_ptr, rows)
        norm = precise_sqrt(sum_partials(z_squares_ptr, reducers))
        denom = clamp_min_eps(norm, tl.full([], eps, acc_dtype))
        sigma = precise_div(norm * norm, denom)
        ok = usable(norm) & (tl.load(flag_ptr) != 0).to(tl.int32)
        if tile == 0:
            tl.store(sigma_ptr, sigma)
        if row_block == 0:
            v = precise_div(tl.load(z_ptr + col_idx, mask=col_mask, other=0.0), denom).to(v_new_ptr.dtype.element_ty)
            in_offsets = col_idx.to(tl.int64) * v_stride
            v = tl.where(ok != 0, v, tl.load(v_ptr + in_offsets, mask=col_mask, other=0.0))
            tl.store(v_ptr + in_offsets, v, mask=col_mask & (ok != 0))
            tl.store(v_new_ptr + col_idx, v, mask=col_mask)
        if col_block == 0:
            finish_block(u_ptr, u_stride, u_new_ptr, row_idx, row_mask, ok)
    else:
        sigma = tl.load(sigma_ptr)
    mask = row_mask[:, None] & col_mask[None, :]
    w = tl.load(w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner), mask=mask, other=0.0)
    if SCALED:
        divisor, numerator = scaled_factors(sigma, coeff, has_coeff, gamma_ptr, has_gamma)
        out = (w.to(sigma.dtype) * precise_div(numerator, divisor)).to(out_ptr.dtype.element_ty)
    else:
        out = precise_div(w.to(sigma.dtype), sigma).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)
