"""Triton device functions shared by the kernels: indexing a weight's matrix view, the grid forward's workspace,
IEEE division and square root, the "usable norm" test and the restoring of degenerate rounds (inlined into every
kernel that calls them); and `kernel`, how the launched kernels are jitted.

The matrix view (csrc/matrix_view.h): a weight W of any rank is seen, for `dim`, as a 3-D strided tensor
W3 = (outer, rows, inner) with outer = prod(sizes[:dim]) and inner = prod(sizes[dim+1:]), and
Wm[i, o * inner + r] = W3[o, i, r]: torch's ``W.permute(dim, *others).flatten(1)`` without a copy. Column c of Wm
is (o, r) = divmod(c, inner). The host may split the columns otherwise (any outer * inner = cols whose strides
address every tensor of the call: _host.Layout), e.g. inner = 1 for contiguous columns. Offsets are 64-bit, so any
size works.
"""

import inspect

import triton
import triton.language as tl

from . import _host

# Integer arguments Triton would otherwise specialize on (equal to 1, divisible by 16): the matrix's row count and
# the vectors' strides and lengths, which do not change how W is loaded. Specialized, each layer shape compiled
# kernels of its own (664 variants for the CUDA test grid: 3-6 minutes cold; ../shared/reference/triton_desk_review.md).
# The weight's inner size and strides stay specialized, and so does `cols`: 16-byte loads need contiguous columns
# (inner and the column stride 1) and a column mask known to be constant over 4 elements (cols divisible by 16).
NOT_SPECIALIZED = (
    "rows",
    "n_iters",
    "u_stride",
    "v_stride",
    "x_stride",
    "y_stride",
    "out_in_stride",
    "other_in_stride",
    "n",
    "other_n",
    "splits",
    "col_blocks",
    "tiles",
    "parts",
    "row_blocks",
    "programs",
    "reducers",
    "first",
    "last",
    "has_coeff",
    "has_gamma",
    "sigma_grad",
)


def kernel(fn):
    """triton.jit for a launched kernel: not specialized on the arguments of NOT_SPECIALIZED it has."""
    names = inspect.signature(fn).parameters
    return triton.jit(do_not_specialize=[name for name in NOT_SPECIALIZED if name in names])(fn)


@triton.jit
def matrix_offsets(rows, cols, inner, s_outer, s_row, s_inner):
    """Element offsets ([len(rows), len(cols)], int64) of the tile rows x cols of the matrix view."""
    o = cols // inner
    r = cols - o * inner
    col_offsets = o.to(tl.int64) * s_outer + r.to(tl.int64) * s_inner
    return rows.to(tl.int64)[:, None] * s_row + col_offsets[None, :]


# IEEE-rounded division and square root where Triton's defaults are approximate (float32), so that the kernels
# round as torch and the C++ kernels do. float64 operations are IEEE already. Triton versions without div_rn /
# sqrt_rn get the defaults (a few units in the last place).
if hasattr(tl, "div_rn") and hasattr(tl, "sqrt_rn"):

    @triton.jit
    def precise_div(x, y):
        if x.dtype == tl.float32:
            return tl.div_rn(x, y)
        else:
            return x / y

    @triton.jit
    def precise_sqrt(x):
        if x.dtype == tl.float32:
            return tl.sqrt_rn(x)
        else:
            return tl.sqrt(x)
else:  # pragma: no cover - old Triton

    @triton.jit
    def precise_div(x, y):
        return x / y

    @triton.jit
    def precise_sqrt(x):
        return tl.sqrt(x)


@triton.jit
def clamp_min_eps(norm, eps):
    """max(norm, eps) that keeps a NaN norm NaN (as torch's clamp_min and the C++ kernels; tl.maximum would not)."""
    return tl.where(norm < eps, eps, norm)


@triton.jit
def scaled_factors(sigma, coeff, has_coeff, gamma_ptr, has_gamma):
    """A scaled form's (divisor, numerator) in sigma's dtype (csrc/sn_ext.cpp): d = max(sigma, coeff) (a NaN sigma
    stays NaN) or sigma without a coeff (has_coeff 0), g = gamma coeff, gamma read from the device (has_gamma 0: 1)
    and coeff 1 without one."""
    c = tl.full([], coeff, sigma.dtype)
    divisor = sigma
    numerator = tl.full([], 1.0, sigma.dtype)
    if has_coeff != 0:
        divisor = tl.where(sigma < c, c, sigma)
        numerator = c
    if has_gamma != 0:
        numerator = numerator * tl.load(gamma_ptr).to(sigma.dtype)
    return divisor, numerator


@triton.jit
def usable(norm):
    """1 (int32) if the norm is finite and non-zero, else 0: a round that meets such a norm is degenerate."""
    return ((norm > 0) & (norm < float("inf"))).to(tl.int32)


@triton.jit
def finish_block(in_ptr, in_stride, new_ptr, idx, mask, ok):
    """After a forward's rounds, for the elements idx of a vector: the caller's vector (in) <- the new one if every
    round was usable (ok), else the new one <- the input (a degenerate round changes nothing)."""
    in_offsets = idx.to(tl.int64) * in_stride
    if ok != 0:  # a branch, not two masked copies: the one-program forward spilled with both (triton 3.8)
        tl.store(in_ptr + in_offsets, tl.load(new_ptr + idx, mask=mask, other=0.0), mask=mask)
    else:
        tl.store(new_ptr + idx, tl.load(in_ptr + in_offsets, mask=mask, other=0.0), mask=mask)


@triton.jit
def finish(in_ptr, in_stride, new_ptr, n, ok, BLOCK: tl.constexpr):
    """finish_block over a whole vector of n elements. Each element is read and written by one thread."""
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        finish_block(in_ptr, in_stride, new_ptr, idx, idx < n, ok)


# ---- the grid forward's workspace ----
# One tensor of the accumulation dtype per grid forward (_host.workspace_size), so that a call allocates once:
#   [0]                                  flag: 1 while every norm so far was usable (0 after a degenerate one)
#   [16, 16 + MAX_PARTS)                 |y|^2, one partial sum per gram program
#   [16 + MAX_PARTS, 16 + 2 MAX_PARTS)   |z|^2, one partial sum per gram_reduce program
#   [HEADER, HEADER + rows)              y: the raw W v of a gram round
#   from HEADER + rows rounded up to 16: the partial sums (matvec, rmatvec: splits x n; gram: parts x cols, whose
#                                        row 0 gram_reduce overwrites with z, the summed and scaled W^T y)
MAX_PARTS = tl.constexpr(_host.MAX_PARTS)
HEADER = tl.constexpr(_host.WORKSPACE_HEADER)


@triton.jit
def workspace(ws_ptr, rows):
    """(flag, |y|^2 partials, |z|^2 partials, y, partial sums) pointers into a grid forward's workspace."""
    squares_ptr = ws_ptr + 16
    y_ptr = ws_ptr + HEADER
    return ws_ptr, squares_ptr, squares_ptr + MAX_PARTS, y_ptr, y_ptr + ((rows + 15) // 16) * 16


@triton.jit
def sum_partials(ptr, count):
    """The sum of count (<= MAX_PARTS) partial sums, in one fixed order: every program that adds them gets the same."""
    idx = tl.arange(0, MAX_PARTS)
    return tl.sum(tl.load(ptr + idx, mask=idx < count, other=0.0), axis=0)
