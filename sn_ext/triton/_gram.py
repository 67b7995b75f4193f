"""A u-first round on the grid that reads W once (the C++ kernels' matvec_and_gram, csrc/cpu/power_iteration.h):
y = W v and W^T y from one pass, u = N(y) and v = N(W^T y / max(|y|, eps)) (W^T of u before its rounding to the
weight's dtype, as the C++ and one-program kernels). Two launches, both over the grid:

- gram_kernel: each program takes row blocks p, p + programs, ... in turn; for a block it computes y for its rows
  (a pipelined pass over the columns: y stays in registers) and then, reading the block's rows again right away
  (pipelined, from L2: only the blocks the programs are on are in flight), adds the block's share y_i W[i, :] to
  the program's partial row of W^T y;
- gram_reduce_kernel: every program adds the gram programs' partial sums of |y|^2 (the same order in all, so the
  same |y| in all), writes its share of u = N(y), and sums the partial rows for its columns in a fixed order,
  z = (sum_p part[p]) / max(|y|, eps), with one partial sum of |z|^2 per program.

The half-step that makes v follows: the last round's is spread over divide_kernel's tiles (FINISH, _grid.py), an
earlier round's is normalize_kernel on z. Every sum is split by the shape only, so results are deterministic.
"""

import triton.language as tl

from ._grid import _tile_rows_dot
from ._helpers import clamp_min_eps, kernel, matrix_offsets, precise_div, precise_sqrt, sum_partials, usable
from ._helpers import workspace as _workspace


@kernel
def gram_kernel(
    w_ptr,  # (outer, rows, inner) strided: the weight's matrix view, weight dtype
    x_ptr,  # (cols,) stride x_stride: the vector v, weight dtype
    ws_ptr,  # the workspace (_helpers.workspace): writes y, |y|^2 partials and the partial rows (programs, cols)
    rows,
    cols,
    inner,
    s_outer,
    s_row,
    s_inner,
    x_stride,
    row_blocks,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    STAGES: tl.constexpr,
):
    acc_dtype = ws_ptr.dtype.element_ty
    _, y_squares_ptr, _, y_ptr, part_ptr = _workspace(ws_ptr, rows)
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    part_row = part_ptr + program.to(tl.int64) * cols
    squares = tl.zeros([BLOCK_ROWS], acc_dtype)
    for block in range(program, row_blocks, programs):
        row_idx = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = row_idx < rows
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
        squares += y * y
        added = block != program  # the program's first block writes its partial row, the others add to it
        for start in tl.range(0, cols, BLOCK_COLS, num_stages=STAGES):
            col_idx = start + tl.arange(0, BLOCK_COLS)
            col_mask = col_idx < cols
            offsets = matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner)
            w = tl.load(w_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(acc_dtype)
            z = tl.sum(w * y[:, None], axis=0) + tl.load(part_row + col_idx, mask=col_mask & added, other=0.0)
            tl.store(part_row + col_idx, z, mask=col_mask)
        tl.debug_barrier()  # the next block reads the partial row back, in threads that may not have written it
    tl.store(y_squares_ptr + program, tl.sum(squares, axis=0))


@kernel
def gram_reduce_kernel(
    ws_ptr,  # the workspace (_helpers.workspace): reads gram_kernel's, writes z (row 0 of the partial rows), the flag
    # and one |z|^2 partial sum per program
    u_new_ptr,  # (rows,) contiguous, weight dtype: receives u = N(y)
    rows,
    cols,
    programs,  # gram_kernel's programs: its partial rows and |y|^2 partial sums
    col_blocks,
    eps: tl.float64,  # float64 (a Python float would be float32), rounded to the accumulation dtype below
    first,
    BLOCK_PARTS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    acc_dtype = ws_ptr.dtype.element_ty
    flag_ptr, y_squares_ptr, z_squares_ptr, y_ptr, part_ptr = _workspace(ws_ptr, rows)
    program = tl.program_id(0)
    reducers = tl.num_programs(0)
    norm = precise_sqrt(sum_partials(y_squares_ptr, programs))
    denom = clamp_min_eps(norm, tl.full([], eps, acc_dtype))
    if program == 0:
        ok = usable(norm)
        if first == 0:
            ok = ok & (tl.load(flag_ptr) != 0).to(tl.int32)
        tl.store(flag_ptr, ok.to(acc_dtype))
    for start in range(program * BLOCK, rows, reducers * BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < rows
        y = tl.load(y_ptr + idx, mask=mask, other=0.0)
        tl.store(u_new_ptr + idx, precise_div(y, denom).to(u_new_ptr.dtype.element_ty), mask=mask)
    squares = tl.zeros([BLOCK_COLS], acc_dtype)
    for col_block in range(program, col_blocks, reducers):
        col_idx = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_mask = col_idx < cols
        acc = tl.zeros([BLOCK_PARTS, BLOCK_COLS], acc_dtype)
        for start in tl.range(0, programs, BLOCK_PARTS, num_stages=STAGES):
            part_idx = start + tl.arange(0, BLOCK_PARTS)
            offsets = part_idx.to(tl.int64)[:, None] * cols + col_idx[None, :]
            acc += tl.load(part_ptr + offsets, mask=(part_idx < programs)[:, None] & col_mask[None, :], other=0.0)
        # Row 0 of the partial rows becomes z: this program read its columns of every row just above.
        z = precise_div(tl.sum(acc, axis=0), denom)
        tl.store(part_ptr + col_idx, z, mask=col_mask)
        squares += z * z
    tl.store(z_squares_ptr + program, tl.sum(squares, axis=0))
