"""Triton device functions shared by the kernels: indexing a weight's matrix view, IEEE division and square root,
and the "usable norm" test (inlined into every kernel that calls them); and `kernel`, how the launched kernels are
jitted.

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
    "rows_per_part",
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
def usable(norm):
    """1 (int32) if the norm is finite and non-zero, else 0: a round that meets such a norm is degenerate."""
    return ((norm > 0) & (norm < float("inf"))).to(tl.int32)
