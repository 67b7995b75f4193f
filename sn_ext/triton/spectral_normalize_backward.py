"""sn_ext::triton_spectral_normalize_backward and triton_spectral_normalize_scaled_backward: the backwards' Triton
kernels, their launch plan and the ops (the twins of sn_ext::spectral_normalize_backward, grad_W = (G - <G, W_sn>
u v^T) / sigma, and of spectral_normalize_scaled_backward, grad_W = s (G - k mu u v^T) with mu = <G, W> / max(sigma,
f), and grad_gamma = mu c: the same kernels, SCALED, reading W where the plain form reads W_sn).

Launches: weights with at most _host.FUSED_MAX_NUMEL elements, one program (fused_backward_kernel); larger, 2
(lambda_partial_kernel: partial sums of lambda = <G, W_sn> (or <G, W>); backward_kernel: every program adds them
itself and writes its tile). Sums are split by the shape only, so results are deterministic.
"""

import dataclasses

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import _checks, _matrix, _schemas
from . import _host, _launch
from ._helpers import kernel, matrix_offsets, precise_div, scaled_factors
from ._launch import Launch

BACKWARD = "sn_ext::triton_spectral_normalize_backward"
SCALED_BACKWARD = "sn_ext::triton_spectral_normalize_scaled_backward"


@triton.jit
def _scaled_lambda(lam, sigma, coeff, has_coeff, gamma_ptr, has_gamma, sigma_grad, grad_gamma_ptr, store):
    """A scaled form's correction factor and scale from lam = <G, W>: (k mu, g / max(sigma, f)), mu = lam / max(sigma,
    f); stores grad_gamma = mu c where `store`."""
    divisor, numerator = scaled_factors(sigma, coeff, has_coeff, gamma_ptr, has_gamma)
    mu = precise_div(lam, divisor)
    c = tl.full([], coeff, sigma.dtype)
    if store:
        tl.store(grad_gamma_ptr, (mu * tl.where(has_coeff != 0, c, 1.0)).to(grad_gamma_ptr.dtype.element_ty))
    counts = (sigma_grad != 0) & ((has_coeff == 0) | (sigma > c))
    return tl.where(counts, mu, 0.0), precise_div(numerator, divisor)


# ---- fused_backward_kernel ----
# The whole backward in one program, for small weights (one launch instead of two):
# lambda = <grad, W_sn>, then grad_W = (grad - lambda u v^T) / sigma, as lambda_partial_kernel + backward_kernel
# (SCALED: lambda = <grad, W>, then grad_W = (grad - k mu u v^T) s and grad_gamma: _scaled_lambda).


@kernel
def fused_backward_kernel(
    g_ptr,  # (outer, rows, inner) strided: the incoming gradient's matrix view, weight dtype
    s_ptr,  # (outer, rows, inner) strided (its own strides): W_sn's (SCALED: W's) matrix view, weight dtype
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
    gamma_ptr,  # SCALED: () any float dtype: gamma (has_gamma 1); else unread
    grad_gamma_ptr,  # SCALED: () receives mu c; else unwritten
    coeff: tl.float64,
    has_coeff,
    has_gamma,
    sigma_grad,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    SCALED: tl.constexpr,
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
    scale = sigma
    if SCALED:
        lam, scale = _scaled_lambda(
            lam, sigma, coeff, has_coeff, gamma_ptr, has_gamma, sigma_grad, grad_gamma_ptr, True
        )
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
            corrected = g.to(acc_dtype) - lam_u[:, None] * v[None, :]
            if SCALED:
                out = (corrected * scale).to(out_ptr.dtype.element_ty)
            else:
                out = precise_div(corrected, sigma).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)


# ---- lambda_partial_kernel ----
# Backward, stage 1: lambda = <grad, W_sn>, one partial sum per program over a fixed share of the tiles.
#
# Grid (programs,): program p sums tiles p, p + programs, ... (a share fixed by the shape: deterministic), STAGES
# tiles in flight. backward_kernel adds the partial sums in order.


@kernel
def lambda_partial_kernel(
    g_ptr,  # (outer, rows, inner) strided: the incoming gradient's matrix view, weight dtype
    s_ptr,  # (outer, rows, inner) strided (its own strides): W_sn's matrix view, weight dtype
    part_ptr,  # (programs,) accumulation dtype: part[p] = program p's share of <grad, W_sn>
    rows,
    cols,
    inner,
    g_outer,
    g_row,
    g_inner,
    s_outer,
    s_row,
    s_inner,
    col_blocks,
    tiles,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    STAGES: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    program = tl.program_id(0)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], acc_dtype)
    for tile in tl.range(program, tiles, tl.num_programs(0), num_stages=STAGES):
        row_idx = (tile // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col_idx = (tile % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (row_idx < rows)[:, None] & (col_idx < cols)[None, :]
        g = tl.load(g_ptr + matrix_offsets(row_idx, col_idx, inner, g_outer, g_row, g_inner), mask=mask, other=0.0)
        s = tl.load(s_ptr + matrix_offsets(row_idx, col_idx, inner, s_outer, s_row, s_inner), mask=mask, other=0.0)
        acc += g.to(acc_dtype) * s.to(acc_dtype)
    tl.store(part_ptr + program, tl.sum(tl.sum(acc, axis=1), axis=0))


# ---- backward_kernel ----
# Backward, stage 2: grad_W = (grad - lambda u v^T) / sigma, elementwise over the matrix view (SCALED:
# (grad - k mu u v^T) s, program 0 writing grad_gamma: _scaled_lambda).
#
# Every program adds lambda_partial_kernel's partial sums itself, in the same order (so all get the same lambda,
# and no one-program launch is needed in between), then writes its tile. The operation order is the C++ kernels':
# (g - (lambda u_i) v_c) / sigma.


@kernel
def backward_kernel(
    g_ptr,  # (outer, rows, inner) strided: the incoming gradient's matrix view, weight dtype
    out_ptr,  # (outer, rows, inner) strided (its own strides): grad_W, weight dtype
    u_ptr,  # (rows,) stride u_stride, weight dtype
    v_ptr,  # (cols,) stride v_stride, weight dtype
    part_ptr,  # (parts,) accumulation dtype: the partial sums of lambda = <grad, W_sn> (SCALED: <grad, W>)
    sigma_ptr,  # () accumulation dtype
    rows,
    cols,
    inner,
    g_outer,
    g_row,
    g_inner,
    o_outer,
    o_row,
    o_inner,
    u_stride,
    v_stride,
    col_blocks,
    parts,
    gamma_ptr,  # SCALED: () any float dtype: gamma (has_gamma 1); else unread
    grad_gamma_ptr,  # SCALED: () receives mu c (program 0); else unwritten
    coeff: tl.float64,
    has_coeff,
    has_gamma,
    sigma_grad,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_PARTS: tl.constexpr,
    SCALED: tl.constexpr,
):
    acc_dtype = part_ptr.dtype.element_ty
    part_idx = tl.arange(0, BLOCK_PARTS)
    lam = tl.sum(tl.load(part_ptr + part_idx, mask=part_idx < parts, other=0.0), axis=0)
    sigma = tl.load(sigma_ptr)
    tile = tl.program_id(0)
    scale = sigma
    if SCALED:
        lam, scale = _scaled_lambda(
            lam, sigma, coeff, has_coeff, gamma_ptr, has_gamma, sigma_grad, grad_gamma_ptr, tile == 0
        )
    row_idx = (tile // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_idx = (tile % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = row_idx < rows
    col_mask = col_idx < cols
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(g_ptr + matrix_offsets(row_idx, col_idx, inner, g_outer, g_row, g_inner), mask=mask, other=0.0)
    u = tl.load(u_ptr + row_idx.to(tl.int64) * u_stride, mask=row_mask, other=0.0).to(acc_dtype)
    v = tl.load(v_ptr + col_idx.to(tl.int64) * v_stride, mask=col_mask, other=0.0).to(acc_dtype)
    corrected = g.to(acc_dtype) - (lam * u)[:, None] * v[None, :]
    if SCALED:
        out = (corrected * scale).to(out_ptr.dtype.element_ty)
    else:
        out = precise_div(corrected, sigma).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + matrix_offsets(row_idx, col_idx, inner, o_outer, o_row, o_inner), out, mask=mask)


# ---- the host plan and the op ----


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A backward's launches, computed once per (shapes, strides, dtype, dim, scaled, knobs)."""

    layout: _host.Layout  # of weight_sn (whose layout the output takes) and grad
    acc: torch.dtype
    fused: Launch | None = None
    lambda_partial: Launch | None = None
    backward: Launch | None = None
    grid_args: tuple = ()  # col_blocks, tiles; parts


@_host.cached_plan
def _plan(shape, g_stride, s_stride, dtype, dim, scaled, knobs) -> _Plan:
    """`scaled`: the scaled backward's launches; `knobs` (_host.knobs()) only keys the cache."""
    layout = _host.Layout.of(shape, (s_stride, g_stride), dim)
    m = layout.matrix
    acc = _matrix.accumulate_dtype(dtype)
    if m.rows * m.cols <= _host.FUSED_MAX_NUMEL:
        block_rows, block_cols = _host.tile_shape(m.cols, _host.TILE)
        fused = Launch(
            fused_backward_kernel,
            (1,),
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            SCALED=scaled,
            **_host.warps_and_registers(_host.FUSED_WARPS),
        )
        return _Plan(layout, acc, fused)
    block_rows, block_cols = _host.tile_shape(m.cols, _host.GRID_TILE_COLS, _host.grid_tile(dtype))
    col_blocks = _host.cdiv(m.cols, block_cols)
    tiles = _host.cdiv(m.rows, block_rows) * col_blocks
    tile = dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    parts = min(tiles, _host.MAX_LAMBDA_PARTS)
    return _Plan(
        layout,
        acc,
        lambda_partial=Launch(lambda_partial_kernel, (parts,), **tile, STAGES=_host.PIPELINE_STAGES),
        # BLOCK_PARTS from the knob, not from `parts`: one compiled variant of backward_kernel for every weight size.
        backward=Launch(
            backward_kernel,
            (tiles,),
            **tile,
            BLOCK_PARTS=_host.pow2(_host.MAX_LAMBDA_PARTS),
            SCALED=scaled,
            num_warps=_host.BACKWARD_WARPS,
        ),
        grid_args=(col_blocks, tiles, parts),
    )


def forget_plans() -> None:
    """Empties the plan cache (see spectral_normalize.forget_plans)."""
    _plan.cache_clear()


@triton_op(BACKWARD, mutates_args=(), schema=_schemas.SCHEMAS["spectral_normalize_backward"])
def triton_spectral_normalize_backward(
    grad: torch.Tensor, weight_sn: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, dim: int
) -> torch.Tensor:
    """What torch.compile traces: every launch through wrap_triton. Eager calls take eager() instead."""
    return _backward(_launch.traced_launch, grad, weight_sn, u, v, sigma, dim, eager=False)[0]


def eager(grad, weight_sn, u, v, sigma, dim):
    """The op's kernel for real tensors (see spectral_normalize.eager)."""
    return _eager_backward(grad, weight_sn, u, v, sigma, dim)[0]


@triton_op(SCALED_BACKWARD, mutates_args=(), schema=_schemas.SCHEMAS["spectral_normalize_scaled_backward"])
def triton_spectral_normalize_scaled_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    dim: int,
    coeff: float | None = None,
    gamma: torch.Tensor | None = None,
    sigma_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What torch.compile traces: every launch through wrap_triton. Eager calls take eager_scaled() instead."""
    return _backward(_launch.traced_launch, grad, weight, u, v, sigma, dim, (coeff, gamma, sigma_grad), eager=False)


def eager_scaled(grad, weight, u, v, sigma, dim, coeff=None, gamma=None, sigma_grad=True):
    """The scaled op's kernel for real tensors (see spectral_normalize.eager)."""
    return _eager_backward(grad, weight, u, v, sigma, dim, (coeff, gamma, sigma_grad))


def _eager_backward(grad, weight_sn, u, v, sigma, dim, scaled=None):
    guard = _launch.device_guard(weight_sn.device)
    if guard is None:
        return _backward(_launch.eager_launch, grad, weight_sn, u, v, sigma, dim, scaled)
    with guard:
        return _backward(_launch.eager_launch, grad, weight_sn, u, v, sigma, dim, scaled)


def _backward(launch, grad, weight_sn, u, v, sigma, dim, scaled=None, eager=True):
    """The backward, its launches through `launch`: the plain form's (scaled None; weight_sn is W_sn) or a scaled
    form's (scaled = (coeff, gamma, sigma_grad); weight_sn is W). Returns (grad_W, grad_gamma), grad_gamma None for
    the plain form. `eager`: on real tensors (not traced by torch.compile)."""
    if scaled is None:
        _checks.check_backward_args(BACKWARD, grad, weight_sn, u, v, sigma, dim)
    else:
        _checks.check_scaled_backward_args(SCALED_BACKWARD, grad, weight_sn, u, v, sigma, dim, *scaled[:2])
    plan = _plan(
        weight_sn.shape,
        grad.stride(),
        weight_sn.stride(),
        weight_sn.dtype,
        dim % weight_sn.dim(),
        scaled is not None,
        _host.knobs(),
    )
    layout = plan.layout
    m = layout.matrix
    matrix_args = (m.rows, m.cols, m.inner)
    # The kernels read sigma from the device, in the accumulation dtype: the forward's own sigma is that already.
    sig = sigma
    if sigma.dtype != plan.acc or sigma.dim() != 0 or sigma.device != weight_sn.device:
        sig = sigma.to(device=weight_sn.device, dtype=plan.acc).reshape(())
    if layout.in_place:  # the kernels index both inputs and a new output as they are (the common case)
        g3, s3, out = grad, weight_sn, torch.empty_like(weight_sn)
        out3 = out
    else:
        g3, s3 = layout.view(grad), layout.view(weight_sn)
        out, out3 = layout.output(weight_sn)
    coeff, gamma, sigma_grad = (None, None, True) if scaled is None else scaled
    grad_gamma = None
    if scaled is not None:
        grad_gamma = sig.new_empty(()) if gamma is None else gamma.new_empty(gamma.shape)
    gamma_arg, *scalars = _host.scaling_args(coeff, gamma, sig)
    # The plain form's kernels read none of these: sigma stands in for the pointers.
    scaling = (gamma_arg, sig if grad_gamma is None else grad_gamma, *scalars, int(sigma_grad))
    key = _launch.call_key(weight_sn.device.index, g3, s3, u, v, sig, scaling[0]) if eager else None  # fakes: no data
    g_strides, s_strides = layout.strides[1], layout.strides[0]
    if plan.fused:
        launch(
            plan.fused,
            key,
            g3,
            s3,
            out3,
            u,
            v,
            sig,
            *matrix_args,
            *g_strides,
            *s_strides,
            *layout.out_strides,
            u.stride(0),
            v.stride(0),
            *scaling,
        )
    else:
        col_blocks, tiles, parts = plan.grid_args
        part = sig.new_empty(parts)
        launch(plan.lambda_partial, key, g3, s3, part, *matrix_args, *g_strides, *s_strides, col_blocks, tiles)
        launch(
            plan.backward,
            key,
            g3,
            out3,
            u,
            v,
            part,
            sig,
            *matrix_args,
            *g_strides,
            *layout.out_strides,
            u.stride(0),
            v.stride(0),
            col_blocks,
            parts,
            *scaling,
        )
    return layout.finish(out, out3), grad_gamma
