"""sn_ext::triton_spectral_normalize_: the forward's Triton kernels, their launch plan and the op (the twin of
sn_ext::spectral_normalize_, u and v updated in place by the kernels; see sn_ext/ops.py for the schemas, fake kernels
and autograd shared by every backend).

It is a torch.library.triton_op: torch.compile traces through it (every launch goes through
torch.library.wrap_triton), so Inductor sees, schedules and fuses around the kernels. Eager calls take eager(),
registered as the op's kernel for real tensors, which launches the same kernels without those wrappers.

Launches (all asynchronous: sigma and the "degenerate round" flag stay on the device, nothing is read back):
- weights with at most _host.FUSED_MAX_NUMEL elements: one program does everything (fused_forward_kernel);
- larger: 4n + 1 (per half-step a split matvec over the grid, then a one-program normalize; then W / sigma),
  n == 0: 3. u-first rounds on weights with enough rows for _host.GRAM_MIN_PARTS parts read W once instead
  (gram_kernel: y = W v and per-part partial rows of W^T y, then the two normalizes): 3n + 1, one pass over W per
  round instead of two. v-first rounds keep the split passes.
Sums are split by the shape only (never by timing or device), so results are deterministic.
"""

import dataclasses

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _checks, _matrix, _schemas
from . import _host
from ._helpers import clamp_min_eps, kernel, matrix_offsets, precise_div, precise_sqrt, usable

FORWARD = "sn_ext::triton_spectral_normalize_"

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
def _finish(in_ptr, in_stride, new_ptr, n, ok, BLOCK: tl.constexpr):
    """After n > 0 rounds: the caller's vector (in) <- the new one if every round was usable (ok), else the new one
    <- the input (a degenerate round changes nothing). Each element is read and written by one thread."""
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n
        in_offsets = idx.to(tl.int64) * in_stride
        if ok != 0:  # a branch, not two masked copies: the one-program forward spilled with both (triton 3.8)
            tl.store(in_ptr + in_offsets, tl.load(new_ptr + idx, mask=mask, other=0.0), mask=mask)
        else:
            tl.store(new_ptr + idx, tl.load(in_ptr + in_offsets, mask=mask, other=0.0), mask=mask)


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
    y_ptr,  # (rows,) contiguous, accumulation dtype: scratch, the raw W v of a round
    z_ptr,  # (cols,) contiguous, accumulation dtype: scratch, the raw W^T u of a round
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
    eps,
    V_FIRST: tl.constexpr,
    ONE_PASS: tl.constexpr,
    N_ZERO: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_VEC: tl.constexpr,
    FULL: tl.constexpr,
    STRIP: tl.constexpr,
):
    acc_dtype = y_ptr.dtype.element_ty
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
        # sigma = u^T W v for the input vectors (already copied to u_new, v_new).
        _matvec(w_ptr, v_new_ptr, y_ptr, rows, cols, inner, s_outer, s_row, s_inner, BLOCK_ROWS, BLOCK_COLS)
        tl.debug_barrier()
        total = tl.zeros([BLOCK_VEC], acc_dtype)
        for start in range(0, rows, BLOCK_VEC):
            idx = start + tl.arange(0, BLOCK_VEC)
            mask = idx < rows
            total += tl.load(u_new_ptr + idx, mask=mask, other=0.0).to(acc_dtype) * tl.load(
                y_ptr + idx, mask=mask, other=0.0
            )
        sigma = tl.sum(total, axis=0)
    else:
        sigma = precise_div(last * last, clamp_min_eps(last, eps))
        _finish(u_ptr, u_stride, u_new_ptr, rows, ok, BLOCK_VEC)
        _finish(v_ptr, v_stride, v_new_ptr, cols, ok, BLOCK_VEC)
    tl.store(sigma_ptr, sigma)
    for row_start in range(0, rows, BLOCK_ROWS):
        row_idx = row_start + tl.arange(0, BLOCK_ROWS)
        for col_start in range(0, cols, BLOCK_COLS):
            col_idx = col_start + tl.arange(0, BLOCK_COLS)
            mask = (row_idx < rows)[:, None] & (col_idx < cols)[None, :]
            w = tl.load(w_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner), mask=mask, other=0.0)
            out = precise_div(w.to(acc_dtype), sigma).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)


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
    STAGES: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
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
    tl.store(part_ptr + split * rows + row_idx, y, mask=row_mask)


# ---- rmatvec_kernel ----
# z = Wm^T y, split over the rows: phase 1 of a half-step that makes v (u-first: v = N(W^T u)).
#
# Grid (col_blocks, splits). Program (b, s) sums the rows of split s for columns [b * BLOCK_COLS, ...) and writes
# one partial sum per column; normalize_kernel adds the splits in order (deterministic). Pipelined as matvec_kernel.


@kernel
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
    STAGES: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
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
    tl.store(part_ptr + split * cols + col_idx, z, mask=col_mask)


# ---- gram_kernel ----
# A u-first round's W pass on the grid, reading W once instead of twice (matvec_and_gram in
# csrc/cpu/power_iteration.h): y = Wm x and the partial rows of z = Wm^T y, u = N(y), v = N(z / max(|y|, eps)) (W^T of
# u before its rounding to the weight's dtype, as the C++ and one-program kernels).
#
# Grid (parts,). Program p owns rows [p * rows_per_part, ...): it writes y (raw) for them, then its partial row
# part[p, :] = sum over its rows i of y_i Wm[i, :], reading its rows' tiles a second time right after the first (from
# L2: the host keeps a part to a few rows). normalize_kernel adds the parts in order (deterministic). The host bounds
# the parts (at least _host.GRAM_ROWS_PER_PART rows each), so the workspace stays a small fraction of W.


@kernel
def gram_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    x_ptr,  # (cols,) stride x_stride: the vector v, weight dtype
    y_ptr,  # (rows,) contiguous, accumulation dtype: y = Wm x, raw
    part_ptr,  # (parts, cols) contiguous, accumulation dtype: part[p, c] = sum over part p's rows i of y_i Wm[i, c]
    rows,
    cols,
    inner,
    s_outer,
    s_row,
    s_inner,
    x_stride,
    rows_per_part,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    STAGES: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    part = tl.program_id(0)
    begin = part * rows_per_part
    end = tl.minimum(begin + rows_per_part, rows)
    for row_start in range(begin, end, BLOCK_ROWS):
        row_idx = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = row_idx < end
        y = _tile_rows_dot(
            w_ptr,
            x_ptr,
            x_stride,
            row_idx,
            row_mask,
            0,
            cols,
            inner,
            s_outer,
            s_row,
            s_inner,
            acc_dtype,
            BLOCK_COLS,
            STAGES,
        )
        tl.store(y_ptr + row_idx, y, mask=row_mask)
    tl.debug_barrier()  # y of the part's rows, written above by other threads, is read below
    for col_start in range(0, cols, BLOCK_COLS):
        col_idx = col_start + tl.arange(0, BLOCK_COLS)
        col_mask = col_idx < cols
        z = _tile_cols_dot(
            w_ptr,
            y_ptr,
            1,
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
        tl.store(part_ptr + part * cols + col_idx, z, mask=col_mask)


# ---- normalize_kernel ----
# Phase 2 of a half-step, one program: add the splits of matvec/rmatvec, normalize, track degenerate rounds,
# and on the last half-step write sigma and restore the input vectors if any round was degenerate.
#
#     x = sum_s part[s]       out = round_to_weight_dtype(x / max(|x|, eps))
#     SCALED (gram_kernel's v): x = sum_s part[s] / denom, denom = max(|y|, eps) of the half-step before
#     flag = 1 while every norm so far was finite and non-zero (read from the previous half-step, unless FIRST)
#     LAST: sigma = |x|^2 / max(|x|, eps); if flag is 1, out_in <- out and other_in <- other (the caller's u and v
#     updated in place), else out <- out_in and other <- other_in (the input vectors come back)
#
# The raw vector is summed twice (once for its norm, once to normalize) rather than written and read back, so no
# element is ever read by a thread other than the one that wrote it.


@triton.jit
def _raw(part_ptr, idx, mask, n, splits, scale, SCALED: tl.constexpr, acc_dtype: tl.constexpr, BLOCK: tl.constexpr):
    x = tl.zeros([BLOCK], acc_dtype)
    for s in range(0, splits):
        x += tl.load(part_ptr + s * n + idx, mask=mask, other=0.0)
    if SCALED:
        x = precise_div(x, scale)
    return x


@kernel
def normalize_kernel(
    part_ptr,  # (splits, n) contiguous, accumulation dtype: partial sums of the raw vector x
    out_ptr,  # (n,) contiguous, weight dtype: the new vector (u_new or v_new)
    out_in_ptr,  # (n,) stride out_in_stride, weight dtype: the caller's vector of the same name (LAST only)
    other_ptr,  # (other_n,) contiguous, weight dtype: the other new vector, written earlier (LAST only)
    other_in_ptr,  # (other_n,) stride other_in_stride, weight dtype: the caller's other vector (LAST only)
    flag_ptr,  # (1,) int32: 1 while every round so far met only finite, non-zero norms
    denom_ptr,  # (1,) accumulation dtype: max(|x|, eps), written unless LAST, read before that when SCALED
    sigma_ptr,  # () accumulation dtype: sigma, written on the LAST half-step
    n,
    splits,
    other_n,
    out_in_stride,
    other_in_stride,
    eps,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    scale = tl.load(denom_ptr) if SCALED else tl.full([], 1.0, acc_dtype)
    squares = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, n, BLOCK):
        idx = start + offs
        x = _raw(part_ptr, idx, idx < n, n, splits, scale, SCALED, acc_dtype, BLOCK)
        squares += x * x
    norm = precise_sqrt(tl.sum(squares, axis=0))
    denom = clamp_min_eps(norm, eps)
    ok = usable(norm)
    if not FIRST:
        ok = ok & tl.load(flag_ptr)
    if LAST:
        tl.store(sigma_ptr, precise_div(norm * norm, denom))
    else:
        tl.store(flag_ptr, ok)
        tl.store(denom_ptr, denom)
    for start in range(0, n, BLOCK):
        idx = start + offs
        mask = idx < n
        x = _raw(part_ptr, idx, mask, n, splits, scale, SCALED, acc_dtype, BLOCK)
        y = precise_div(x, denom).to(out_ptr.dtype.element_ty)
        if LAST:
            in_offsets = idx.to(tl.int64) * out_in_stride
            y = tl.where(ok != 0, y, tl.load(out_in_ptr + in_offsets, mask=mask, other=0.0))
            tl.store(out_in_ptr + in_offsets, y, mask=mask & (ok != 0))
        tl.store(out_ptr + idx, y, mask=mask)
    if LAST:
        _finish(other_in_ptr, other_in_stride, other_ptr, other_n, ok, BLOCK)


# ---- sigma_dot_kernel ----
# n_power_iterations == 0, one program: sigma = u^T (W v) from matvec_kernel's partial sums of W v, and
# u_new, v_new = copies of the input vectors.


@kernel
def sigma_dot_kernel(
    part_ptr,  # (splits, rows) contiguous, accumulation dtype: partial sums of W v
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
    acc_dtype = part_ptr.dtype.element_ty
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
# W_sn = W / sigma, elementwise over the matrix view (sigma read from the device: no host synchronisation).
#
# Grid: one program per (BLOCK_ROWS x BLOCK_COLS) tile, tile t = (t // col_blocks, t % col_blocks).


@kernel
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


# ---- the host plan and the op ----
# A forward's launches depend on the weight's shape, strides and dtype, the vectors' strides, dim, n, v_first and the
# knobs only: _plan computes them once per such key (plain integers, cached) and every call replays them.


@dataclasses.dataclass(frozen=True)
class _Split:
    """A split matvec: grid (blocks, splits), each split a `chunk` of the summed dimension."""

    blocks: int
    splits: int
    chunk: int
    block_rows: int
    block_cols: int


def _split(length: int, block: int, other_blocks: int, min_per_split: int) -> tuple[int, int]:
    """(splits, chunk) of a summed dimension of `length`, chunks a multiple of `block`, no piece empty."""
    wanted = max(1, min(_host.cdiv(_host.TARGET_PROGRAMS, other_blocks), _host.cdiv(length, min_per_split)))
    chunk = _host.cdiv(_host.cdiv(length, wanted), block) * block
    return _host.cdiv(length, chunk), chunk


def _plan_matvec(m: _host.Matrix) -> _Split:
    block_rows, block_cols = _host.tile_shape(m.rows, m.cols, _host.GRID_TILE_COLS)
    blocks = _host.cdiv(m.rows, block_rows)
    splits, chunk = _split(m.cols, block_cols, blocks, _host.MIN_COLS_PER_SPLIT)
    return _Split(blocks, splits, chunk, block_rows, block_cols)


def _plan_rmatvec(m: _host.Matrix) -> _Split:
    block_rows, block_cols = _host.tile_shape(m.rows, m.cols, _host.GRID_TILE_COLS)
    blocks = _host.cdiv(m.cols, block_cols)
    splits, chunk = _split(m.rows, block_rows, blocks, _host.MIN_ROWS_PER_SPLIT)
    return _Split(blocks, splits, chunk, block_rows, block_cols)


def _plan_gram(m: _host.Matrix) -> _Split | None:
    """gram_kernel's parts (grid (blocks,), `chunk` rows each), or None where the weight gives too few of them."""
    block_rows, block_cols = _host.tile_shape(m.rows, m.cols, _host.GRID_TILE_COLS)
    parts, chunk = _split(m.rows, block_rows, 1, _host.GRAM_ROWS_PER_PART)
    return _Split(parts, 1, chunk, block_rows, block_cols) if parts >= _host.GRAM_MIN_PARTS else None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A forward's launches: the one-program kernel's arguments, or the grid's splits, grids and arguments."""

    layout: _host.Layout
    acc: torch.dtype  # sigma's and the scratch vectors' dtype
    fused: bool
    matrix_args: tuple  # rows, cols, inner and W's view strides
    fused_args: tuple = ()  # fused_forward_kernel's integer arguments after the matrix's
    fused_meta: dict = dataclasses.field(default_factory=dict)  # its constexprs and warps
    mv: _Split | None = None
    rmv: _Split | None = None
    gram: _Split | None = None  # u-first rounds read W once (gram_kernel), else the split matvec and rmatvec
    vector_block: int = 0
    divide_grid: int = 0
    divide_args: tuple = ()  # divide_kernel's out strides and col_blocks
    divide_meta: dict = dataclasses.field(default_factory=dict)


@_host.cached_plan
def _plan(shape, stride, dtype, dim, u_stride, v_stride, n, v_first, knobs) -> _Plan:
    """The launches of a forward (see the module docstring); `knobs` (_host.knobs()) only keys the cache."""
    layout = _host.Layout.of(shape, (stride,), dim)
    m = layout.matrix
    acc = _matrix.accumulate_dtype(dtype)
    matrix_args = (m.rows, m.cols, m.inner, *layout.strides[0])
    vector_block = min(_host.VECTOR_BLOCK, _host.pow2(max(m.rows, m.cols)))
    if m.rows * m.cols <= _host.FUSED_MAX_NUMEL:
        full_dim, strip_dim = (m.rows, m.cols) if v_first else (m.cols, m.rows)
        one_pass = n > 0 and full_dim <= _host.ONE_PASS_MAX
        full = _host.pow2(full_dim) if one_pass else 1
        block_rows, block_cols = _host.tile_shape(m.rows, m.cols, _host.TILE)
        meta = dict(
            V_FIRST=v_first,
            ONE_PASS=one_pass,
            N_ZERO=n == 0,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            BLOCK_VEC=vector_block,
            FULL=full,
            STRIP=max(1, min(_host.pow2(strip_dim), _host.TILE // full)) if one_pass else 1,
            num_warps=_host.FUSED_FORWARD_WARPS,
        )
        return _Plan(layout, acc, True, matrix_args, (*layout.out_strides, u_stride, v_stride, n), meta)
    block_rows, block_cols = _host.tile_shape(m.rows, m.cols, _host.GRID_TILE_COLS)
    col_blocks = _host.cdiv(m.cols, block_cols)
    return _Plan(
        layout,
        acc,
        False,
        matrix_args,
        mv=_plan_matvec(m),
        rmv=_plan_rmatvec(m),
        gram=None if v_first or n == 0 else _plan_gram(m),
        vector_block=vector_block,
        divide_grid=_host.cdiv(m.rows, block_rows) * col_blocks,
        divide_args=(*layout.out_strides, col_blocks),
        divide_meta=dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols),
    )


def _forward_fused(launch, plan, w3, u, v, out3, sigma, u_new, v_new, eps):
    m = plan.layout.matrix
    y = torch.empty(m.rows, dtype=plan.acc, device=w3.device)
    z = torch.empty(m.cols, dtype=plan.acc, device=w3.device)
    launch(fused_forward_kernel)[(1,)](
        w3, u, v, out3, sigma, u_new, v_new, y, z, *plan.matrix_args, *plan.fused_args, eps, **plan.fused_meta
    )


def _forward_split(launch, plan, w3, u, v, out3, sigma, u_new, v_new, eps, n, v_first):
    m, mv, rmv, gram = plan.layout.matrix, plan.mv, plan.rmv, plan.gram
    part = torch.empty(
        max(mv.splits * m.rows, rmv.splits * m.cols, gram.blocks * m.cols if gram else 0),
        dtype=plan.acc,
        device=w3.device,
    )
    flag = torch.empty(1, dtype=torch.int32, device=w3.device)
    denom = torch.empty(1, dtype=plan.acc, device=w3.device)
    y = torch.empty(m.rows, dtype=plan.acc, device=w3.device) if gram else None
    stages = _host.PIPELINE_STAGES

    def matvec(x, x_stride):
        launch(matvec_kernel)[(mv.blocks, mv.splits)](
            w3,
            x,
            part,
            *plan.matrix_args,
            x_stride,
            mv.chunk,
            BLOCK_ROWS=mv.block_rows,
            BLOCK_COLS=mv.block_cols,
            STAGES=stages,
        )

    def rmatvec(y, y_stride):
        launch(rmatvec_kernel)[(rmv.blocks, rmv.splits)](
            w3,
            y,
            part,
            *plan.matrix_args,
            y_stride,
            rmv.chunk,
            BLOCK_ROWS=rmv.block_rows,
            BLOCK_COLS=rmv.block_cols,
            STAGES=stages,
        )

    def normalize(length, splits, out, out_in, other, other_in, first, last, raw=part, scaled=False):
        launch(normalize_kernel)[(1,)](
            raw,
            out,
            out_in,
            other,
            other_in,
            flag,
            denom,
            sigma,
            length,
            splits,
            other.numel(),
            out_in.stride(0),
            other_in.stride(0),
            eps,
            FIRST=first,
            LAST=last,
            SCALED=scaled,
            BLOCK=plan.vector_block,
            num_warps=_host.FUSED_WARPS,
        )

    if n == 0:
        matvec(v, v.stride(0))
        launch(sigma_dot_kernel)[(1,)](
            part,
            u,
            v,
            u_new,
            v_new,
            sigma,
            m.rows,
            m.cols,
            mv.splits,
            u.stride(0),
            v.stride(0),
            BLOCK=plan.vector_block,
            num_warps=_host.FUSED_WARPS,
        )
    for k in range(n):
        first, last = k == 0, k == n - 1
        if v_first:
            rmatvec(*((u, u.stride(0)) if first else (u_new, 1)))
            normalize(m.cols, rmv.splits, v_new, v, u_new, u, first, False)
            matvec(v_new, 1)
            normalize(m.rows, mv.splits, u_new, u, v_new, v, False, last)
        elif gram:
            x, x_stride = (v, v.stride(0)) if first else (v_new, 1)
            launch(gram_kernel)[(gram.blocks,)](
                w3,
                x,
                y,
                part,
                *plan.matrix_args,
                x_stride,
                gram.chunk,
                BLOCK_ROWS=gram.block_rows,
                BLOCK_COLS=gram.block_cols,
                STAGES=stages,
            )
            normalize(m.rows, 1, u_new, u, v_new, v, first, False, raw=y)
            normalize(m.cols, gram.blocks, v_new, v, u_new, u, False, last, scaled=True)
        else:
            matvec(*((v, v.stride(0)) if first else (v_new, 1)))
            normalize(m.rows, mv.splits, u_new, u, v_new, v, first, False)
            rmatvec(u_new, 1)
            normalize(m.cols, rmv.splits, v_new, v, u_new, u, False, last)
    launch(divide_kernel)[(plan.divide_grid,)](
        w3, out3, sigma, *plan.matrix_args, *plan.divide_args, **plan.divide_meta
    )


# torch 2.14 registers `schema`; torch 2.6-2.11 accept it but infer the schema from the annotations and mutates_args
# instead (int becomes SymInt, the outputs are unnamed): both are the same call (tests/test_triton.py compares them).
# The kernels write u and v (the launch's last normalize, or the one program, after every read of them).
@triton_op(FORWARD, mutates_args=("u", "v"), schema=_schemas.SCHEMAS["spectral_normalize_"])
def triton_spectral_normalize_(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What torch.compile traces: every launch through wrap_triton. Eager calls take eager() instead."""
    return _forward(wrap_triton, weight, u, v, dim, n_power_iterations, eps, v_first)


def eager(weight, u, v, dim, n_power_iterations, eps, v_first=False):
    """The op's kernel for real tensors (sn_ext/triton/__init__.py registers it): the launches without wrap_triton
    and without the triton_op's Python wrappers, ~20-25 us less host time per call (measured on the CPU with the
    launches stubbed)."""
    return _forward(_host.eager_launch, weight, u, v, dim, n_power_iterations, eps, v_first)


def _forward(launch, weight, u, v, dim, n_power_iterations, eps, v_first):
    op = FORWARD
    _checks.check_forward_args(op, weight, u, v, dim, n_power_iterations, eps)
    plan = _plan(
        weight.shape,
        weight.stride(),
        weight.dtype,
        dim % weight.dim(),
        u.stride(0),
        v.stride(0),
        n_power_iterations,
        v_first,
        _host.knobs(),
    )
    w3 = plan.layout.view(weight)
    out, out3 = plan.layout.output(weight)
    sigma = weight.new_empty((), dtype=plan.acc)
    u_new = torch.empty_like(u, memory_format=torch.contiguous_format)
    v_new = torch.empty_like(v, memory_format=torch.contiguous_format)
    if plan.fused:
        _forward_fused(launch, plan, w3, u, v, out3, sigma, u_new, v_new, eps)
    else:
        _forward_split(launch, plan, w3, u, v, out3, sigma, u_new, v_new, eps, n_power_iterations, v_first)
    return plan.layout.finish(out, out3), sigma, u_new, v_new
