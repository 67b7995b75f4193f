"""Host-side helpers shared by the Triton ops (spectral_normalize.py, spectral_normalize_backward.py): the launch-plan
knobs, the weight's (outer, rows, inner) matrix view as the kernels index it (the twin of csrc/matrix_view.h's
WeightShapedOutput), and tile sizes. Device-side helpers are in _helpers.py."""

import dataclasses
import math

import torch

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


# Plain integer arithmetic for the launch plans: triton.cdiv and triton.next_power_of_2 are constexpr functions that
# cost ~7 us a call on the host (measured here, triton 3.8), and a grid forward makes about twenty such calls.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << (max(1, int(n)) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Matrix:
    """A weight-shaped tensor as the (outer, rows, inner) matrix view, and the tensor kernels index through."""

    outer: int
    rows: int
    inner: int

    @property
    def cols(self) -> int:
        return self.outer * self.inner

    @staticmethod
    def of(weight: torch.Tensor, dim: int) -> "Matrix":
        dim = dim % weight.dim()
        shape = weight.shape
        return Matrix(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))

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


def tile_shape(rows: int, cols: int, tile: int = 0) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of about `tile` elements: up to 128 columns wide, no wider than the matrix."""
    tile = tile or TILE
    block_cols = min(128, pow2(cols))
    return max(1, min(pow2(rows), tile // block_cols)), block_cols
