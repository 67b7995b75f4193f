"""The matrix view every sn_ext kernel works on, and the dtypes it accumulates in: shared by the reference, the
autograd formulas and the Triton host code (csrc/matrix_view.h is its C++ counterpart).

A weight of any shape is seen as torch's matrix ``W.permute(dim, *other dims).flatten(1)`` of shape
(weight.shape[dim], numel / weight.shape[dim]); the kernels read it in place as a strided (outer, rows, inner) view.
"""

import torch
from torch import Tensor

REAL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums happen, and sigma's dtype: float64 for float64 weights, the weight's own for complex ones, float32
    for the rest."""
    if dtype in (torch.float64, *COMPLEX_DTYPES):
        return dtype
    return torch.float32


def to_matrix(weight: Tensor, dim: int) -> Tensor:
    """torch's matrix view of a weight: (weight.shape[dim], numel / weight.shape[dim])."""
    if weight.dim() == 1:
        return weight.unsqueeze(1)
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


def from_matrix(matrix: Tensor, like: Tensor, dim: int) -> Tensor:
    """Inverse of to_matrix: a (h, w) matrix back in the layout of `like`."""
    if dim == 0 or like.dim() == 1:
        return matrix.reshape(like.shape)
    order = [dim, *(d for d in range(like.dim()) if d != dim)]
    permuted = matrix.reshape([like.shape[d] for d in order])
    return permuted.permute(*sorted(range(like.dim()), key=order.__getitem__))


def rank_one(u: Tensor, v: Tensor, like: Tensor, dim: int) -> Tensor:
    """u v^H (u v^T for real vectors) in the layout of `like` (the gradient of sigma = u^H W v with respect to W)."""
    return from_matrix(torch.outer(u, v.conj()), like, dim % like.dim())
