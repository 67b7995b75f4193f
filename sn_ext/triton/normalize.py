"""Phase 2 of a half-step, one program: add the splits of matvec/rmatvec, normalize, track degenerate rounds,
and on the last half-step write sigma and restore the input vectors if any round was degenerate.

    x = sum_s part[s]       out = round_to_weight_dtype(x / max(|x|, eps))
    flag = 1 while every norm so far was finite and non-zero (read from the previous half-step, unless FIRST)
    LAST: sigma = |x|^2 / max(|x|, eps); if flag is 0, out <- out_in and other <- other_in (the input vectors)

The raw vector is summed twice (once for its norm, once to normalize) rather than written and read back, so no
element is ever read by a thread other than the one that wrote it.
"""

import triton
import triton.language as tl

from ._helpers import clamp_min_eps, precise_div, precise_sqrt, usable


@triton.jit
def _raw(part_ptr, idx, mask, n, splits, acc_dtype: tl.constexpr, BLOCK: tl.constexpr):
    x = tl.zeros([BLOCK], acc_dtype)
    for s in range(0, splits):
        x += tl.load(part_ptr + s * n + idx, mask=mask, other=0.0)
    return x


@triton.jit
def normalize_kernel(
    part_ptr,  # (splits, n) contiguous, accumulation dtype: partial sums of the raw vector x
    out_ptr,  # (n,) contiguous, weight dtype: the new vector (u_new or v_new)
    out_in_ptr,  # (n,) stride out_in_stride, weight dtype: the caller's input vector of the same name (LAST only)
    other_ptr,  # (other_n,) contiguous, weight dtype: the other new vector, written earlier (LAST only)
    other_in_ptr,  # (other_n,) stride other_in_stride, weight dtype: the other input vector (LAST only)
    flag_ptr,  # (1,) int32: 1 while every round so far met only finite, non-zero norms
    sigma_ptr,  # () accumulation dtype: sigma, written on the LAST half-step
    n,
    splits,
    other_n,
    out_in_stride,
    other_in_stride,
    eps,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, n, BLOCK):
        idx = start + offs
        x = _raw(part_ptr, idx, idx < n, n, splits, acc_dtype, BLOCK)
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
    for start in range(0, n, BLOCK):
        idx = start + offs
        mask = idx < n
        x = _raw(part_ptr, idx, mask, n, splits, acc_dtype, BLOCK)
        y = precise_div(x, denom).to(out_ptr.dtype.element_ty)
        if LAST:
            y = tl.where(ok != 0, y, tl.load(out_in_ptr + idx.to(tl.int64) * out_in_stride, mask=mask, other=0.0))
        tl.store(out_ptr + idx, y, mask=mask)
    if LAST:
        for start in range(0, other_n, BLOCK):
            idx = start + offs
            restore = (idx < other_n) & (ok == 0)
            value = tl.load(other_in_ptr + idx.to(tl.int64) * other_in_stride, mask=restore, other=0.0)
            tl.store(other_ptr + idx, value, mask=restore)
