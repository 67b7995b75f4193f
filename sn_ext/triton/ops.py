"""The Triton backend's operators: sn_ext::triton_spectral_normalize and sn_ext::triton_spectral_normalize_backward.

Same schemas, checks, outputs and semantics as sn_ext::spectral_normalize / spectral_normalize_backward (see
sn_ext/ops.py); sn_ext/ops.py registers their fake kernels and autograd. They are torch.library.triton_op's: in
eager mode they launch the kernels directly; torch.compile traces through them (every launch goes through
torch.library.wrap_triton), so Inductor sees, schedules and fuses around the Triton kernels, no graph break.

Launches (all asynchronous: sigma, lambda and the "degenerate round" flag stay on the device, nothing is read back):
- weights with at most FUSED_MAX_NUMEL elements: one program does everything, forward 1 launch, backward 1;
- larger: forward 4n + 1 (per half-step a split matvec over the grid, then a one-program normalize; then
  W / sigma), n == 0: 3; backward 2 (partial sums of lambda; then every program adds them itself and writes its
  tile). The one-pass u-first round (W^T W v) is used by the one-program kernel, where W stays in cache between
  strips; on the grid its per-row-block partial sums of W^T y would need a grid-wide reduction (one more launch
  and rows/strip x cols of traffic), which buys nothing over the second, split pass.
Sums are split by the shape only (never by timing or device), so results are deterministic.
"""

import dataclasses
import math

import torch
import triton
from torch.library import triton_op, wrap_triton

from .. import _checks, _matrix, _schemas
from .. import ops as _sn_ext_ops
from .backward import backward_kernel
from .divide import divide_kernel
from .fused_backward import fused_backward_kernel
from .fused_forward import fused_forward_kernel
from .lambda_partial import lambda_partial_kernel
from .matvec import matvec_kernel
from .normalize import normalize_kernel
from .rmatvec import rmatvec_kernel
from .sigma_dot import sigma_dot_kernel

FORWARD = "sn_ext::triton_spectral_normalize"
BACKWARD = "sn_ext::triton_spectral_normalize_backward"

# Launch plan knobs, read at every call (tests lower them to run every path on tiny weights).
FUSED_MAX_NUMEL = 1 << 16  # weights up to this size run in one program (one launch per op)
ONE_PASS_MAX = 2048  # a one-pass round keeps a whole row (u-first) or column (v-first) of up to this many in registers
TILE = 4096  # elements per tile of W
VECTOR_BLOCK = 1024  # elements per step of the one-program vector loops
TARGET_PROGRAMS = 256  # about how many programs a split matvec should have (a constant: results depend on shape only)
MIN_COLS_PER_SPLIT = 1024  # smallest piece of a row worth its own program in matvec
MIN_ROWS_PER_SPLIT = 256  # smallest piece of a column worth its own program in rmatvec
MAX_LAMBDA_PARTS = 1024  # partial sums of lambda (each backward program adds them all)
FUSED_WARPS = 8  # warps of the one-program kernels


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@dataclasses.dataclass(frozen=True)
class _Matrix:
    """A weight-shaped tensor as the (outer, rows, inner) matrix view, and the tensor kernels index through."""

    outer: int
    rows: int
    inner: int

    @property
    def cols(self) -> int:
        return self.outer * self.inner

    @staticmethod
    def of(weight: torch.Tensor, dim: int) -> "_Matrix":
        dim = dim % weight.dim()
        shape = weight.shape
        return _Matrix(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """t as (outer, rows, inner): a view for every layout that has one (all contiguous ones), else a copy."""
        return t.reshape(self.outer, self.rows, self.inner)

    def output(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """A new tensor in `like`'s layout (as the other backends and the fake kernel), the (outer, rows, inner)
        view the kernels write through, and whether that is contiguous scratch instead (a layout without such a
        view: channels_last with dim=0), which finish() copies back."""
        out = torch.empty_like(like)
        try:
            return out, out.view(self.outer, self.rows, self.inner), False
        except RuntimeError:
            return out, torch.empty((self.outer, self.rows, self.inner), dtype=like.dtype, device=like.device), True

    @staticmethod
    def finish(out: torch.Tensor, view3d: torch.Tensor, scratch: bool) -> torch.Tensor:
        if scratch:
            out.copy_(view3d.view(out.shape))
        return out


def _tile(rows: int, cols: int, tile: int = 0) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of about `tile` elements: up to 128 columns wide, no wider than the matrix."""
    tile = tile or TILE
    block_cols = min(128, _pow2(cols))
    return max(1, min(_pow2(rows), tile // block_cols)), block_cols


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
    wanted = max(1, min(triton.cdiv(TARGET_PROGRAMS, other_blocks), triton.cdiv(length, min_per_split)))
    chunk = triton.cdiv(triton.cdiv(length, wanted), block) * block
    return triton.cdiv(length, chunk), chunk


def _plan_matvec(m: _Matrix) -> _Split:
    block_rows, block_cols = _tile(m.rows, m.cols)
    blocks = triton.cdiv(m.rows, block_rows)
    splits, chunk = _split(m.cols, block_cols, blocks, MIN_COLS_PER_SPLIT)
    return _Split(blocks, splits, chunk, block_rows, block_cols)


def _plan_rmatvec(m: _Matrix) -> _Split:
    block_rows, block_cols = _tile(m.rows, m.cols)
    blocks = triton.cdiv(m.cols, block_cols)
    splits, chunk = _split(m.rows, block_rows, blocks, MIN_ROWS_PER_SPLIT)
    return _Split(blocks, splits, chunk, block_rows, block_cols)


# ---------------------------------------------------------------------------------------------------------------
# Forward


def _forward_fused(m, w3, u, v, out3, sigma, u_new, v_new, n, eps, v_first):
    acc = sigma.dtype
    y = torch.empty(m.rows, dtype=acc, device=w3.device)
    z = torch.empty(m.cols, dtype=acc, device=w3.device)
    full_dim, strip_dim = (m.rows, m.cols) if v_first else (m.cols, m.rows)
    one_pass = n > 0 and full_dim <= ONE_PASS_MAX
    full = _pow2(full_dim) if one_pass else 1
    strip = max(1, min(_pow2(strip_dim), TILE // full)) if one_pass else 1
    block_rows, block_cols = _tile(m.rows, m.cols)
    wrap_triton(fused_forward_kernel)[(1,)](
        w3,
        u,
        v,
        out3,
        sigma,
        u_new,
        v_new,
        y,
        z,
        m.rows,
        m.cols,
        m.inner,
        *w3.stride(),
        *out3.stride(),
        u.stride(0),
        v.stride(0),
        n,
        eps,
        V_FIRST=v_first,
        ONE_PASS=one_pass,
        N_ZERO=n == 0,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        BLOCK_VEC=min(VECTOR_BLOCK, _pow2(max(m.rows, m.cols))),
        FULL=full,
        STRIP=strip,
        num_warps=FUSED_WARPS,
    )


def _forward_split(m, w3, u, v, out3, sigma, u_new, v_new, n, eps, v_first):
    acc = sigma.dtype
    mv, rmv = _plan_matvec(m), _plan_rmatvec(m)
    part = torch.empty(max(mv.splits * m.rows, rmv.splits * m.cols), dtype=acc, device=w3.device)
    flag = torch.empty(1, dtype=torch.int32, device=w3.device)
    vector_block = min(VECTOR_BLOCK, _pow2(max(m.rows, m.cols)))

    def matvec(x, x_stride):
        wrap_triton(matvec_kernel)[(mv.blocks, mv.splits)](
            w3,
            x,
            part,
            m.rows,
            m.cols,
            m.inner,
            *w3.stride(),
            x_stride,
            mv.chunk,
            BLOCK_ROWS=mv.block_rows,
            BLOCK_COLS=mv.block_cols,
        )

    def rmatvec(y, y_stride):
        wrap_triton(rmatvec_kernel)[(rmv.blocks, rmv.splits)](
            w3,
            y,
            part,
            m.rows,
            m.cols,
            m.inner,
            *w3.stride(),
            y_stride,
            rmv.chunk,
            BLOCK_ROWS=rmv.block_rows,
            BLOCK_COLS=rmv.block_cols,
        )

    def normalize(length, splits, out, out_in, other, other_in, first, last):
        wrap_triton(normalize_kernel)[(1,)](
            part,
            out,
            out_in,
            other,
            other_in,
            flag,
            sigma,
            length,
            splits,
            other.numel(),
            out_in.stride(0),
            other_in.stride(0),
            eps,
            FIRST=first,
            LAST=last,
            BLOCK=vector_block,
            num_warps=FUSED_WARPS,
        )

    if n == 0:
        matvec(v, v.stride(0))
        wrap_triton(sigma_dot_kernel)[(1,)](
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
            BLOCK=vector_block,
            num_warps=FUSED_WARPS,
        )
    for k in range(n):
        first, last = k == 0, k == n - 1
        if v_first:
            rmatvec(*((u, u.stride(0)) if first else (u_new, 1)))
            normalize(m.cols, rmv.splits, v_new, v, u_new, u, first, False)
            matvec(v_new, 1)
            normalize(m.rows, mv.splits, u_new, u, v_new, v, False, last)
        else:
            matvec(*((v, v.stride(0)) if first else (v_new, 1)))
            normalize(m.rows, mv.splits, u_new, u, v_new, v, first, False)
            rmatvec(u_new, 1)
            normalize(m.cols, rmv.splits, v_new, v, u_new, u, False, last)
    block_rows, block_cols = _tile(m.rows, m.cols)
    col_blocks = triton.cdiv(m.cols, block_cols)
    wrap_triton(divide_kernel)[(triton.cdiv(m.rows, block_rows) * col_blocks,)](
        w3,
        out3,
        sigma,
        m.rows,
        m.cols,
        m.inner,
        *w3.stride(),
        *out3.stride(),
        col_blocks,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )


# torch 2.14 registers `schema`; torch 2.6-2.11 accept it but infer the schema from the annotations instead (int
# becomes SymInt, the outputs are unnamed): both are the same call (tests/test_triton.py compares them).
@triton_op(FORWARD, mutates_args=(), schema=_schemas.SCHEMAS["spectral_normalize"])
def triton_spectral_normalize(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = FORWARD
    _checks.check_forward_args(op, weight, u, v, dim, n_power_iterations, eps)
    m = _Matrix.of(weight, dim)
    w3 = m.view(weight)
    out, out3, scratch = m.output(weight)
    sigma = weight.new_empty((), dtype=_matrix.accumulate_dtype(weight.dtype))
    u_new = torch.empty_like(u, memory_format=torch.contiguous_format)
    v_new = torch.empty_like(v, memory_format=torch.contiguous_format)
    run = _forward_fused if weight.numel() <= FUSED_MAX_NUMEL else _forward_split
    run(m, w3, u, v, out3, sigma, u_new, v_new, n_power_iterations, eps, v_first)
    return _Matrix.finish(out, out3, scratch), sigma, u_new, v_new


# ---------------------------------------------------------------------------------------------------------------
# Backward


@triton_op(BACKWARD, mutates_args=(), schema=_schemas.SCHEMAS["spectral_normalize_backward"])
def triton_spectral_normalize_backward(
    grad: torch.Tensor, weight_sn: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, dim: int
) -> torch.Tensor:
    op = BACKWARD
    _checks.check_backward_args(op, grad, weight_sn, u, v, sigma, dim)
    m = _Matrix.of(weight_sn, dim)
    # The kernels read sigma from the device, in the accumulation dtype (a no-op for the forward's own sigma).
    sig = sigma.to(device=weight_sn.device, dtype=_matrix.accumulate_dtype(weight_sn.dtype)).reshape(())
    g3, s3 = m.view(grad), m.view(weight_sn)
    out, out3, scratch = m.output(weight_sn)
    block_rows, block_cols = _tile(m.rows, m.cols)
    if weight_sn.numel() <= FUSED_MAX_NUMEL:
        wrap_triton(fused_backward_kernel)[(1,)](
            g3,
            s3,
            out3,
            u,
            v,
            sig,
            m.rows,
            m.cols,
            m.inner,
            *g3.stride(),
            *s3.stride(),
            *out3.stride(),
            u.stride(0),
            v.stride(0),
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=FUSED_WARPS,
        )
    else:
        col_blocks = triton.cdiv(m.cols, block_cols)
        tiles = triton.cdiv(m.rows, block_rows) * col_blocks
        parts = min(tiles, MAX_LAMBDA_PARTS)
        part = torch.empty(parts, dtype=sig.dtype, device=weight_sn.device)
        wrap_triton(lambda_partial_kernel)[(parts,)](
            g3,
            s3,
            part,
            m.rows,
            m.cols,
            m.inner,
            *g3.stride(),
            *s3.stride(),
            col_blocks,
            tiles,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
        )
        wrap_triton(backward_kernel)[(tiles,)](
            g3,
            out3,
            u,
            v,
            part,
            sig,
            m.rows,
            m.cols,
            m.inner,
            *g3.stride(),
            *out3.stride(),
            u.stride(0),
            v.stride(0),
            col_blocks,
            parts,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            BLOCK_PARTS=_pow2(parts),
        )
    return _Matrix.finish(out, out3, scratch)


# The shared fake kernels (the same metadata as every backend's) and autograd formulas, calling the Triton backward.
# No autocast exclusion is needed: the kernels run in the inputs' dtype whatever autocast says.
_sn_ext_ops.register_backend_ops("triton_spectral_normalize", "triton_spectral_normalize_backward", autocast=False)
