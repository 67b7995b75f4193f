"""sn_ext::triton_spectral_normalize_: the forward's launch plan and the op (the twin of sn_ext::spectral_normalize_,
u and v updated in place by the kernels; see sn_ext/ops.py for the schemas, fake kernels and autograd shared by every
backend). The kernels are in one module per launch path: _one_program.py, _grid.py and _gram.py.

It is a torch.library.triton_op: torch.compile traces through it (every launch goes through
torch.library.wrap_triton), so Inductor sees, schedules and fuses around the kernels. Eager calls take eager(),
registered as the op's kernel for real tensors, which launches the same kernels directly (_launch.py).

Launches (all asynchronous: sigma and the "degenerate round" flag stay on the device, nothing is read back):
- weights with at most _host.FUSED_MAX_NUMEL elements: one program does everything (fused_forward_kernel);
- larger, u-first rounds (n >= 1): 3n, one pass over W per round (gram_kernel, gram_reduce_kernel, then for the
  last round divide_kernel with the v half-step in it, for an earlier one normalize_kernel), unless a few programs
  would stream long rows (_host.GRAM_MIN_BLOCKS), then the split passes;
- the split passes, v-first rounds: 4n + 1 (per half-step a split matvec over the grid, then a one-program
  normalize; then W / sigma); n == 0: 3 (matvec, sigma_dot, divide).
Sums are split by the shape only (never by timing or device), so results are deterministic.
"""

import dataclasses

import torch
from torch.library import triton_op

from .. import _checks, _matrix, _schemas
from . import _gram, _grid, _host, _launch, _one_program
from ._launch import Launch

FORWARD = "sn_ext::triton_spectral_normalize_"


# ---- the host plan ----
# A forward's launches depend on the weight's shape, strides and dtype, the vectors' strides, dim, n, v_first and the
# knobs only: _plan computes them once per such key (plain integers, cached) and every call replays them.


@dataclasses.dataclass(frozen=True)
class _Split:
    """A split matvec (W v over the columns) or rmatvec (W^T u over the rows): `splits` partial sums of the vector
    (`chunk` of the summed dimension each) and its launches: `first` on the caller's vector, `later` on the op's
    own (each Launch keeps the compiled variants for one set of tensor alignments: _launch.call_key)."""

    splits: int
    chunk: int
    first: Launch
    later: Launch

    def launch(self, caller_vector: bool) -> Launch:
        return self.first if caller_vector else self.later


def _splits(length: int, block: int, other_blocks: int, min_per_split: int) -> tuple[int, int]:
    """(splits, chunk) of a summed dimension of `length`, chunks a multiple of `block`, no piece empty."""
    wanted = max(1, min(_host.cdiv(_host.TARGET_PROGRAMS, other_blocks), _host.cdiv(length, min_per_split)))
    chunk = _host.cdiv(_host.cdiv(length, wanted), block) * block
    return _host.cdiv(length, chunk), chunk


def _plan_matvec(m: _host.Matrix, tile: int) -> _Split:
    block_rows, block_cols = _host.tile_shape(m.cols, _host.GRID_TILE_COLS, tile)
    blocks = _host.cdiv(m.rows, block_rows)
    splits, chunk = _splits(m.cols, block_cols, blocks, _host.MIN_COLS_PER_SPLIT)
    tile = dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, STAGES=_host.PIPELINE_STAGES)
    return _Split(splits, chunk, *(Launch(_grid.matvec_kernel, (blocks, splits), **tile) for _ in range(2)))


def _plan_rmatvec(m: _host.Matrix, tile: int) -> _Split:
    block_rows, block_cols = _host.tile_shape(m.cols, _host.GRID_TILE_COLS, tile)
    blocks = _host.cdiv(m.cols, block_cols)
    splits, chunk = _splits(m.rows, block_rows, blocks, _host.MIN_ROWS_PER_SPLIT)
    tile = dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, STAGES=_host.PIPELINE_STAGES)
    return _Split(splits, chunk, *(Launch(_grid.rmatvec_kernel, (blocks, splits), **tile) for _ in range(2)))


@dataclasses.dataclass(frozen=True)
class _Gram:
    """A one-pass u-first round: gram_kernel's `programs` over `row_blocks` (its launches on the caller's v and on
    the op's own, as _Split's), gram_reduce_kernel's `reducers` over `col_blocks` of the partial rows."""

    row_blocks: int
    programs: int
    col_blocks: int
    reducers: int
    first: Launch
    later: Launch
    reduce: Launch

    def launch(self, caller_vector: bool) -> Launch:
        return self.first if caller_vector else self.later


REDUCE_COLS = 32  # columns per gram_reduce tile: each row of the tile is one 128-byte line of float32 partial sums


def _plan_gram(m: _host.Matrix, dtype: torch.dtype) -> _Gram | None:
    """gram_kernel's and gram_reduce_kernel's launches, or None where the split passes win (see _host)."""
    tile = _host.grid_tile(dtype)
    block_rows, block_cols = _host.tile_shape(m.cols, _host.GRAM_TILE_COLS, tile)
    row_blocks = _host.cdiv(m.rows, block_rows)
    col_tiles = _host.cdiv(m.cols, block_cols)
    if not _host.GRAM_ROUNDS or row_blocks < _host.GRAM_MIN_BLOCKS and col_tiles > 2 * row_blocks:
        return None
    programs = min(row_blocks, _host.GRAM_PROGRAMS, _host.MAX_PARTS)
    col_blocks = _host.cdiv(m.cols, REDUCE_COLS)
    reducers = min(col_blocks, _host.MAX_PARTS)
    meta = dict(
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        STAGES=_host.PIPELINE_STAGES,
        # float64's values take two registers each: one program per SM's registers (it spilled with two's)
        **_host.warps_and_registers(_host.GRAM_WARPS, 1 if dtype == torch.float64 else _host.GRAM_PROGRAMS_PER_SM),
    )
    first, later = (Launch(_gram.gram_kernel, (programs,), **meta) for _ in range(2))
    reduce = Launch(
        _gram.gram_reduce_kernel,
        (reducers,),
        BLOCK_PARTS=max(1, tile // REDUCE_COLS),
        BLOCK_COLS=REDUCE_COLS,
        BLOCK=_host.VECTOR_BLOCK,
        STAGES=_host.PIPELINE_STAGES,
        num_warps=_host.GRAM_WARPS,  # at 4, unaligned partial rows took all 255 registers
    )
    return _Gram(row_blocks, programs, col_blocks, reducers, first, later, reduce)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A forward's launches: the one-program kernel's, or the grid's (its splits or gram round, the normalize,
    sigma dot and divide launches) and the size of its workspace."""

    layout: _host.Layout
    acc: torch.dtype  # sigma's and the workspace's dtype
    matrix_args: tuple  # rows, cols, inner and W's view strides
    fused: Launch | None = None
    fused_args: tuple = ()  # fused_forward_kernel's integer arguments after the matrix's
    # Its scratch vectors (rows + cols of the accumulation dtype) fit in the output's memory; else the scratch's size
    # in the weight's dtype (the kernel's scratch pointer has the output's type either way: one variant, not two).
    scratch_fits: bool = False
    scratch_size: int = 0
    mv: _Split | None = None
    rmv: _Split | None = None
    gram: _Gram | None = None  # u-first rounds read W once (_gram.py), else the split matvec and rmatvec
    normalize: Launch | None = None
    sigma_dot: Launch | None = None
    divide: Launch | None = None
    divide_args: tuple = ()  # divide_kernel's out strides, col_blocks and reducers
    workspace: int = 0  # elements of the workspace (_host.workspace_size)


@_host.cached_plan
def _plan(shape, stride, dtype, dim, u_stride, v_stride, n, v_first, scaled, knobs) -> _Plan:
    """The launches of a forward (see the module docstring); `scaled`: a scaled form's last pass (W g / max(sigma, f));
    `knobs` (_host.knobs()) only keys the cache."""
    layout = _host.Layout.of(shape, (stride,), dim)
    m = layout.matrix
    acc = _matrix.accumulate_dtype(dtype)
    matrix_args = (m.rows, m.cols, m.inner, *layout.strides[0])
    if m.rows * m.cols <= _host.FUSED_MAX_NUMEL:
        full_dim = m.rows if v_first else m.cols
        one_pass = n > 0 and full_dim <= _host.ONE_PASS_MAX
        full = _host.pow2(full_dim) if one_pass else 1
        block_rows, block_cols = _host.tile_shape(m.cols, _host.TILE)
        fused = Launch(
            _one_program.fused_forward_kernel,
            (1,),
            V_FIRST=v_first,
            ONE_PASS=one_pass,
            N_ZERO=n == 0,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            BLOCK_VEC=_host.VECTOR_BLOCK,
            FULL=full,
            STRIP=max(1, _host.TILE // full) if one_pass else 1,
            SCALED=scaled,
            **_host.warps_and_registers(_host.FUSED_FORWARD_WARPS),
        )
        scratch = _host.cdiv((m.rows + m.cols) * acc.itemsize, dtype.itemsize)
        fits = m.rows * m.cols >= scratch
        return _Plan(layout, acc, matrix_args, fused, (*layout.out_strides, u_stride, v_stride, n), fits, scratch)
    tile = _host.grid_tile(dtype)
    gram = None if v_first or n == 0 else _plan_gram(m, dtype)
    mv = _plan_matvec(m, tile) if gram is None or n == 0 else None
    rmv = _plan_rmatvec(m, tile) if gram is None and n > 0 else None
    parts = max(
        mv.splits * m.rows if mv else 0, rmv.splits * m.cols if rmv else 0, gram.programs * m.cols if gram else 0
    )
    block_rows, block_cols = _host.tile_shape(m.cols, _host.GRID_TILE_COLS, tile)
    col_blocks = _host.cdiv(m.cols, block_cols)
    vector = dict(BLOCK=_host.VECTOR_BLOCK, **_host.warps_and_registers(_host.FUSED_WARPS))
    return _Plan(
        layout,
        acc,
        matrix_args,
        mv=mv,
        rmv=rmv,
        gram=gram,
        normalize=Launch(_grid.normalize_kernel, (1,), **vector) if n > 0 else None,
        sigma_dot=Launch(_grid.sigma_dot_kernel, (1,), **vector) if n == 0 else None,
        divide=Launch(
            _grid.divide_kernel,
            (_host.cdiv(m.rows, block_rows) * col_blocks,),
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            FINISH=gram is not None,
            SCALED=scaled,
        ),
        divide_args=(*layout.out_strides, col_blocks, gram.reducers if gram else 0),
        workspace=_host.workspace_size(m.rows, parts),
    )


def forget_plans() -> None:
    """Empties the plan cache (the dry run does, so that no plan keeps its stand-ins for compiled kernels)."""
    _plan.cache_clear()


def _forward_fused(launch, plan, key, w3, u, v, out3, sigma, u_new, v_new, eps, scaling, scratch_in_out):
    scratch = out3 if scratch_in_out and plan.scratch_fits else out3.new_empty(plan.scratch_size)
    args = (*plan.matrix_args, *plan.fused_args, eps, *scaling)
    launch(plan.fused, key, w3, u, v, out3, sigma, u_new, v_new, scratch, *args)


def _forward_grid(launch, plan, key, w3, u, v, out3, sigma, u_new, v_new, eps, scaling, n, v_first):
    m = plan.layout.matrix
    ws = sigma.new_empty(plan.workspace)
    u_stride, v_stride = u.stride(0), v.stride(0)

    def normalize(length, splits, out, out_in, other, other_in, first, last):
        launch(
            plan.normalize,
            key,
            ws,
            out,
            out_in,
            other,
            other_in,
            sigma,
            m.rows,
            length,
            splits,
            other.shape[0],
            out_in.stride(0),
            other_in.stride(0),
            eps,
            int(first),
            int(last),
        )

    mv, rmv, gram = plan.mv, plan.rmv, plan.gram
    if n == 0:
        launch(mv.first, key, w3, v, ws, *plan.matrix_args, v_stride, mv.chunk)
        launch(plan.sigma_dot, key, ws, u, v, u_new, v_new, sigma, m.rows, m.cols, mv.splits, u_stride, v_stride)
    for k in range(n):
        first, last = k == 0, k == n - 1
        if gram:
            x, x_stride = (v, v_stride) if first else (v_new, 1)
            launch(gram.launch(first), key, w3, x, ws, *plan.matrix_args, x_stride, gram.row_blocks)
            launch(gram.reduce, key, ws, u_new, m.rows, m.cols, gram.programs, gram.col_blocks, eps, int(first))
            if not last:  # the last round's v half-step is divide_kernel's (FINISH)
                normalize(m.cols, 1, v_new, v, u_new, u, False, False)
        elif v_first:
            y, y_stride = (u, u_stride) if first else (u_new, 1)
            launch(rmv.launch(first), key, w3, y, ws, *plan.matrix_args, y_stride, rmv.chunk)
            normalize(m.cols, rmv.splits, v_new, v, u_new, u, first, False)
            launch(mv.later, key, w3, v_new, ws, *plan.matrix_args, 1, mv.chunk)
            normalize(m.rows, mv.splits, u_new, u, v_new, v, False, last)
        else:
            x, x_stride = (v, v_stride) if first else (v_new, 1)
            launch(mv.launch(first), key, w3, x, ws, *plan.matrix_args, x_stride, mv.chunk)
            normalize(m.rows, mv.splits, u_new, u, v_new, v, first, False)
            launch(rmv.later, key, w3, u_new, ws, *plan.matrix_args, 1, rmv.chunk)
            normalize(m.cols, rmv.splits, v_new, v, u_new, u, False, last)
    launch(
        plan.divide,
        key,
        w3,
        out3,
        sigma,
        ws,
        u,
        v,
        u_new,
        v_new,
        *plan.matrix_args,
        *plan.divide_args,
        u_stride,
        v_stride,
        eps,
        *scaling,
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
    coeff: float | None = None,
    gamma: torch.Tensor | None = None,
    sigma_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What torch.compile traces: every launch through wrap_triton. Eager calls take eager() instead."""
    return _forward(
        _launch.traced_launch, weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, eager=False
    )


def eager(weight, u, v, dim, n_power_iterations, eps, v_first=False, coeff=None, gamma=None, sigma_grad=True):
    """The op's kernel for real tensors (sn_ext/triton/__init__.py registers it): the launches direct (_launch.py)
    and without the triton_op's Python wrappers, on the weight's device. `sigma_grad` is autograd's."""
    guard = _launch.device_guard(weight.device)
    if guard is None:
        return _forward(_launch.eager_launch, weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma)
    with guard:
        return _forward(_launch.eager_launch, weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma)


def _forward(launch, weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, eager=True):
    """The forward, its launches through `launch`; `eager`: on real tensors (not traced by torch.compile, where
    the one-program kernel gets scratch of its own rather than its output's memory)."""
    _checks.check_forward_args(FORWARD, weight, u, v, dim, n_power_iterations, eps)
    _checks.check_scaling(FORWARD, weight, coeff, gamma)
    plan = _plan(
        weight.shape,
        weight.stride(),
        weight.dtype,
        dim % weight.dim(),
        u.stride(0),
        v.stride(0),
        n_power_iterations,
        v_first,
        coeff is not None or gamma is not None,
        _host.knobs(),
    )
    layout = plan.layout
    if layout.in_place:  # the kernels index W and a new output as they are (the common case, checked first)
        w3, out = weight, torch.empty_like(weight)
        out3 = out
    else:
        w3 = layout.view(weight)
        out, out3 = layout.output(weight)
    sigma = weight.new_empty((), dtype=plan.acc)
    u_new = torch.empty_like(u)  # contiguous: a 1-D tensor with gaps is not dense, so empty_like does not keep them
    v_new = torch.empty_like(v)
    scaling = _host.scaling_args(coeff, gamma, sigma)
    key = _launch.call_key(weight.device.index, w3, u, v, scaling[0]) if eager else None  # fakes have no data
    if plan.fused:
        _forward_fused(launch, plan, key, w3, u, v, out3, sigma, u_new, v_new, eps, scaling, eager)
    else:
        _forward_grid(launch, plan, key, w3, u, v, out3, sigma, u_new, v_new, eps, scaling, n_power_iterations, v_first)
    return layout.finish(out, out3), sigma, u_new, v_new
