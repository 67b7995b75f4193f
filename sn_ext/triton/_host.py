"""Host-side helpers shared by the Triton ops (spectral_normalize.py, spectral_normalize_backward.py): the launch-plan
knobs, the weight's (outer, rows, inner) matrix view and layout as the kernels index it (the twin of
csrc/matrix_view.h's WeightShapedOutput), and tile sizes. Device-side helpers are in _helpers.py."""

import dataclasses
import functools
import math
import operator

import torch

# Launch plan knobs, read at every call (tests lower them to run every path on tiny weights). The values marked
# "model" come from a bytes-and-latency model of an H100 (../shared/reference/triton_desk_review_2.md), not from a GPU
# run; docs/design.md lists what a GPU run must confirm.
# One program (one launch per op) up to this size (model): its serial 16 KB tiles cost ~1 us each, a grid launch
# ~3 us plus ~3 us per extra launch, so the grid wins past a few tiles per pass.
FUSED_MAX_NUMEL = 1 << 14
ONE_PASS_MAX = 2048  # a one-pass round keeps a whole row (u-first) or column (v-first) of up to this many in registers
TILE = 4096  # elements per tile of W
GRID_TILE_COLS = 128  # the grid's tiles are at most this wide: narrower tiles, more programs, the same 16-byte loads
VECTOR_BLOCK = 1024  # elements per step of the one-program vector loops
TARGET_PROGRAMS = 256  # about how many programs a split matvec should have (a constant: results depend on shape only)
MIN_COLS_PER_SPLIT = 1024  # smallest piece of a row worth its own program in matvec
MIN_ROWS_PER_SPLIT = 256  # smallest piece of a column worth its own program in rmatvec
# Partial sums of lambda, about two per SM (model): every backward program adds them all, so more only costs reads.
MAX_LAMBDA_PARTS = 256
# Warps of the one-program kernels: one program is all the SM has, so it should fill it (model). Triton 3.6 (the GPU
# machines') spills the one-pass fused forward at 16 warps (24 B at 64 registers) and the fused backward at 8 (24 B
# at 128): each gets the most that compiles without spills on 3.6 and 3.8 (tests/triton_compile_check.py).
FUSED_WARPS = 16
FUSED_FORWARD_WARPS = 8
# u-first rounds on the grid read W once (gram_kernel, _gram.py) unless the weight has fewer than GRAM_MIN_BLOCKS row
# blocks and more than twice as many column tiles: a few programs would then each stream long rows tile by tile,
# where the split passes spread the columns over ~256 programs. The device-time model (benchmarks/triton_model.py,
# an H100) puts the crossover there: 1x18432, 16x16384, 128x32768 and 32x1048576 take 10-60% less time split, 4x8192
# and 256x16384 tie, 32x4096 and every sngan layer but 1x18432 take 10-30% less with the one read.
# The gram tiles are at most GRAM_TILE_COLS wide (8 rows of a wide weight: the x and partial-row traffic per tile stay
# an eighth of W's and a 512-row layer still gets 64 programs); GRAM_PROGRAMS programs at most, each adding its row
# blocks' shares of W^T y into one partial row, so that the rows a program re-reads (its current block, ~150 KB) are
# still in L2 whatever W's size.
GRAM_TILE_COLS = 512
GRAM_MIN_BLOCKS = 64
GRAM_ROUNDS = True  # False: every grid round takes the split passes (tests)
GRAM_PROGRAMS = 256
GRAM_WARPS = 8  # at 4, a tile of 4096 float32 per 128 threads and the partial row's loads spilled on triton 3.8
GRAM_PROGRAMS_PER_SM = 2  # registers for two programs per SM (GRAM_PROGRAMS is about two per SM of an H100)
# backward_kernel's warps: at 4 (Triton's default), 32 IEEE divisions per thread made ptxas keep one on the stack in
# bfloat16 (tests/triton_compile_check.py); 8 halve them at no cost to an elementwise kernel.
BACKWARD_WARPS = 8
PIPELINE_STAGES = 3  # loads in flight per loop of the grid's streaming kernels (cp.async on sm_80+; model)

# The grid forward's workspace, one tensor of the accumulation dtype per call (laid out by _helpers.workspace):
# a header of WORKSPACE_HEADER elements (the round's flag, per-program partial sums of |y|^2 and |z|^2, at most
# MAX_PARTS each), then y (the raw W v of a gram round, `rows` rounded up to 16), then the partial sums.
WORKSPACE_HEADER = 1024
MAX_PARTS = 256


# Plain integer arithmetic for the launch plans: triton.cdiv and triton.next_power_of_2 are constexpr functions that
# cost ~7 us a call on the host (measured here, triton 3.8), and a grid forward makes about twenty such calls.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << (max(1, int(n)) - 1).bit_length()


KNOBS = (
    "FUSED_MAX_NUMEL",
    "ONE_PASS_MAX",
    "TILE",
    "GRID_TILE_COLS",
    "VECTOR_BLOCK",
    "TARGET_PROGRAMS",
    "MIN_COLS_PER_SPLIT",
    "MIN_ROWS_PER_SPLIT",
    "MAX_LAMBDA_PARTS",
    "FUSED_WARPS",
    "FUSED_FORWARD_WARPS",
    "GRAM_TILE_COLS",
    "GRAM_MIN_BLOCKS",
    "GRAM_ROUNDS",
    "GRAM_PROGRAMS",
    "GRAM_WARPS",
    "GRAM_PROGRAMS_PER_SM",
    "BACKWARD_WARPS",
    "PIPELINE_STAGES",
)
_knob_values = operator.itemgetter(*KNOBS)


def cached_plan(make):
    """make(*key), memoized per key (up to 1024 keys). A key with symbolic sizes (torch.compile tracing with dynamic
    shapes: SymInts are not hashable) gets a fresh plan each call instead."""
    cache = functools.lru_cache(maxsize=1024)(make)

    @functools.wraps(make)
    def plan(*key):
        try:
            return cache(*key)
        except TypeError:
            return make(*key)

    plan.cache_info = cache.cache_info
    plan.cache_clear = cache.cache_clear
    return plan


def knobs() -> tuple:
    """The knobs' current values: part of every launch plan's cache key, so a plan never outlives a knob's value."""
    return _knob_values(globals())


def warps_and_registers(warps: int, programs_per_sm: int = 1) -> dict:
    """Launch options: `warps` warps and the registers an SM has for `programs_per_sm` such programs (.maxnreg). A
    one-program kernel, alone on its SM, loses nothing to them; without the bound ptxas kept 8- and 16-warp programs
    to 128 and 64 registers (80 for gram_kernel on triton 3.6) and spilled (tests/triton_compile_check.py)."""
    return dict(num_warps=warps, maxnreg=min(255, 65536 // (32 * warps * programs_per_sm)))


def scaling_args(coeff: float | None, gamma: torch.Tensor | None, stand_in: torch.Tensor) -> tuple:
    """A scaled form's kernel arguments (gamma_ptr, coeff, has_coeff, has_gamma; _helpers.scaled_factors): gamma, or
    `stand_in` (a tensor of the call, never read) for the pointer when there is none."""
    return (
        stand_in if gamma is None else gamma,
        1.0 if coeff is None else float(coeff),
        int(coeff is not None),
        int(gamma is not None),
    )


def workspace_size(rows: int, parts: int) -> int:
    """Elements of a grid forward's workspace (see WORKSPACE_HEADER) with `parts` partial-sum elements."""
    return WORKSPACE_HEADER + cdiv(rows, 16) * 16 + parts


@dataclasses.dataclass(frozen=True)
class Matrix:
    """A weight's (outer, rows, inner) matrix view."""

    outer: int
    rows: int
    inner: int

    @property
    def cols(self) -> int:
        return self.outer * self.inner


def _column_groups(shape: tuple, stride: tuple, dim: int) -> list[tuple[int, int]]:
    """A tensor's column dimensions (all but `dim`, in order, size-1 ones dropped) as (size, stride) groups, adjacent
    ones merged where they are one strided run."""
    groups: list[tuple[int, int]] = []
    for d, (size, step) in enumerate(zip(shape, stride)):
        if d == dim or size == 1:
            continue
        if groups and groups[-1][1] == step * size:
            groups[-1] = (groups[-1][0] * size, step)
        else:
            groups.append((size, step))
    return groups


def _split_strides(groups: list[tuple[int, int]], inner: int) -> tuple[int, int] | None:
    """(s_outer, s_inner) that address column c = o * inner + r of a tensor whose columns are `groups`, or None if
    no such pair exists. With inner == 1 only s_outer is used (r is 0): s_inner is 1, one specialization less."""
    if not groups:
        return (1, 1)
    if len(groups) == 1:
        step = groups[0][1]
        return (step, 1) if inner == 1 else (inner * step, step)
    if len(groups) == 2 and groups[1][0] == inner:
        return (groups[0][1], groups[1][1])
    return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the kernels see the weight-shaped tensors of one call (inputs, then a new output in the first input's
    layout): one matrix view (outer, rows, inner) and each tensor's (s_outer, s_row, s_inner) in it. Computed once
    per layout from shapes and strides (meta tensors: no data).

    The split of the columns into (outer, inner) is free (the kernels only use c = o * inner + r), so it is chosen to
    fit every tensor as it is: inner = 1 when each tensor's columns are one strided run (every contiguous weight
    with dim=0: Triton then specializes inner and, for unit strides, the column stride to 1, which gives contiguous
    columns and 16-byte loads), else the size of the inner run a tensor has (channels_last with dim=0: (C, H*W)).
    Only tensors with no such split are copied (inputs: `reshape`) or written through contiguous scratch (the
    output: `scratch`, copied back by finish())."""

    matrix: Matrix
    strides: tuple[tuple[int, int, int], ...]  # per input
    out_strides: tuple[int, int, int]
    reshape: bool
    scratch: bool

    @staticmethod
    def of(shape: tuple, strides: tuple[tuple, ...], dim: int) -> "Layout":
        out_stride = torch.empty_like(torch.empty_strided(shape, strides[0], device="meta")).stride()
        every = (*strides, out_stride)
        rows, cols = shape[dim], math.prod(shape) // shape[dim]
        groups = [_column_groups(shape, stride, dim) for stride in every]
        inners = {g[1][0] for g in groups if len(g) == 2}
        inner = min(inners, default=1)
        found = [_split_strides(g, inner) for g in groups]
        if all(found):
            split = [(s_outer, stride[dim], s_inner) for (s_outer, s_inner), stride in zip(found, every)]
            return Layout(Matrix(cols // inner, rows, inner), tuple(split[:-1]), split[-1], False, False)
        return Layout._reshaped(shape, strides, out_stride, dim)

    @staticmethod
    def _reshaped(shape: tuple, strides: tuple[tuple, ...], out_stride: tuple, dim: int) -> "Layout":
        """The layout of torch's (prod(shape[:dim]), rows, prod(shape[dim+1:])) reshape: views where they exist."""
        m = Matrix(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))
        views = tuple(
            torch.empty_strided(shape, s, device="meta").reshape(m.outer, m.rows, m.inner).stride() for s in strides
        )
        try:
            out = torch.empty_strided(shape, out_stride, device="meta").view(m.outer, m.rows, m.inner).stride()
            return Layout(m, views, out, True, False)
        except RuntimeError:
            return Layout(m, views, (m.rows * m.inner, m.inner, 1), True, True)

    @property
    def in_place(self) -> bool:
        """Whether the kernels take every tensor as it is: no copy of an input, no scratch output."""
        return not (self.reshape or self.scratch)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor the kernels index for input t: t itself, or (outer, rows, inner) as torch reshapes it."""
        if not self.reshape:
            return t
        m = self.matrix
        return t.reshape(m.outer, m.rows, m.inner)

    def output(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A new tensor in `like`'s layout (as the other backends and the fake kernel), and the tensor the kernels
        write: itself, or the scratch."""
        out = torch.empty_like(like)
        if self.scratch:
            m = self.matrix
            return out, torch.empty((m.outer, m.rows, m.inner), dtype=like.dtype, device=like.device)
        return out, out

    def finish(self, out: torch.Tensor, out3: torch.Tensor) -> torch.Tensor:
        if self.scratch:
            out.copy_(out3.view(out.shape))
        return out


def tile_shape(cols: int, max_cols: int, elements: int | None = None) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of `elements` (default TILE) elements, no wider than the matrix (rounded up to a power
    of 2) nor than `max_cols`. The rows are not capped by the matrix's: a tile depends on the column count's power of
    2 only, so weights with the same one share compiled kernels (a short matrix masks the rows it lacks). The
    one-program kernels pass TILE (a 1 x 8192 weight gets [1, 4096] tiles, 16-byte loads, instead of [32, 128])."""
    elements = elements or TILE
    block_cols = min(max_cols, elements, pow2(cols))
    return max(1, elements // block_cols), block_cols


def grid_tile(dtype: torch.dtype) -> int:
    """Elements per tile of the grid's kernels (4 warps): TILE, halved for float64, whose sums and loaded values take
    two registers each (a whole tile spilled hundreds of bytes: tests/triton_compile_check.py)."""
    return TILE // 2 if dtype == torch.float64 else TILE
