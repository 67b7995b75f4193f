"""n_power_iterations == 0, one program: sigma = u^T (W v) from matvec_kernel's partial sums of W v, and
u_new, v_new = copies of the input vectors."""

import triton
import triton.language as tl


@triton.jit
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
