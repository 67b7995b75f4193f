"""Host-side helpers shared by the Triton ops (spectral_normalize.py, spectral_normalize_backward.py): the launch-plan
knobs, the weight's (outer, rows, inner) matrix view and layout as the kernels index it (the twin of
csrc/matrix_view.h's WeightShapedOutput), and tile sizes. Device-side helpers are in _helpers.py."""

import dataclasses
import math

import torch

# Launch plan knobs, read at every call (tests lower them to run every path on tiny weights). The values marked
# "model" come from a bytes-and-latency model of an H100 (../shared/reference/triton_desk_review.md), not from a GPU
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
FUSED_WARPS = 16  # warps of the one-program kernels: one program is all the SM has, so it should fill it (model)
PIPELINE_STAGES = 3  # loads in flight per loop of the grid's streaming kernels (cp.async on sm_80+; model)


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
    "PIPELINE_STAGES",
)


def knobs() -> tuple:
    """The knobs' current values: part of every launch plan's cache key, so a plan never outlives a knob's value."""
    module = globals()
    return tuple(module[name] for name in KNOBS)


@dataclasses.dataclass(frozen=True)
class Matrix:
    """A weight's (outer, rows, inner) matrix view."""

    outer: int
    rows: int
    inner: int

    @property
    def cols(self) -> int:
        return self.outer * self.inner


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight of one shape, strides and dtype is seen by the kernels: its matrix view, the strides of that view
    (of W, and of a new weight-shaped output) and whether the output needs contiguous scratch (a layout without such
    a view: channels_last with dim=0), which finish() copies back. Computed once per layout, on meta tensors."""

    matrix: Matrix
    w_strides: tuple[int, int, int]
    out_strides: tuple[int, int, int]
    scratch: bool

    @staticmethod
    def of(shape: tuple, stride: tuple, dtype: torch.dtype, dim: int) -> "Layout":
        m = Matrix(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))
        like = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        w_strides = like.reshape(m.outer, m.rows, m.inner).stride()
        try:
            return Layout(m, w_strides, torch.empty_like(like).view(m.outer, m.rows, m.inner).stride(), False)
        except RuntimeError:
            return Layout(m, w_strides, (m.rows * m.inner, m.inner, 1), True)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """t as (outer, rows, inner): a view for every layout that has one (all contiguous ones), else a copy."""
        m = self.matrix
        return t.reshape(m.outer, m.rows, m.inner)

    def output(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A new tensor in `like`'s layout (as the other backends and the fake kernel) and the (outer, rows, inner)
        tensor the kernels write: a view of it, or the scratch."""
        m = self.matrix
        out = torch.empty_like(like)
        if self.scratch:
            return out, torch.empty((m.outer, m.rows, m.inner), dtype=like.dtype, device=like.device)
        return out, out.view(m.outer, m.rows, m.inner)

    def finish(self, out: torch.Tensor, out3: torch.Tensor) -> torch.Tensor:
        if self.scratch:
            out.copy_(out3.view(out.shape))
        return out


def tile_shape(rows: int, cols: int, max_cols: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of about TILE elements, no wider than the matrix nor than `max_cols`: the one-program
    kernels pass TILE (a 1 x 8192 weight gets [1, 4096] tiles, 16-byte loads, instead of [1, 128] scalar ones)."""
    block_cols = min(max_cols, TILE, pow2(cols))
    return max(1, min(pow2(rows), TILE // block_cols)), block_cols
