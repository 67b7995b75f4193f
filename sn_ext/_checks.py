"""The Python twin of csrc/matrix_view.cpp's argument checks: the same errors, naming the argument, for every
Python backend (the reference, the Triton ops) and the fallback without the compiled library. tests/test_errors.py
runs the same bad calls through both and expects the same exception types and messages."""

import math
import numbers

import torch
from torch import Tensor

from ._matrix import COMPLEX_DTYPES, REAL_DTYPES, accumulate_dtype


def check_weight_dtype(what: str, dtype: torch.dtype, complex_ok: bool, hint: str = "") -> None:
    """TypeError "<what> must be float16, ... got <dtype>" unless `dtype` is one sn_ext computes in (complex ones only
    where `complex_ok`: the reference backend's ops and sn_ext.spectral_norm)."""
    if dtype not in REAL_DTYPES and not (complex_ok and dtype in COMPLEX_DTYPES):
        kinds = (
            "float16, bfloat16, float32, float64, complex64 or complex128"
            if complex_ok
            else ("float16, bfloat16, float32 or float64")
        )
        raise TypeError(f"{what} must be {kinds}, got {dtype}{hint}")


def check_coeff(what: str, coeff) -> None:
    """ValueError "<what>: coeff must be a positive finite number or None" (a module's argument; a bool is none)."""
    number = isinstance(coeff, numbers.Real) and not isinstance(coeff, bool)
    if coeff is not None and not (number and 0 < coeff < math.inf):
        raise ValueError(f"{what}: coeff must be a positive finite number or None, got coeff={coeff!r}")


def _check(op: str, weight: Tensor, n_power_iterations: int, eps: float, complex_ok: bool) -> None:
    check_weight_dtype(f"{op}: weight", weight.dtype, complex_ok)
    if weight.dim() == 0 or weight.numel() == 0:
        raise ValueError(
            f"{op}: weight must be a non-empty tensor with at least 1 dimension, got shape {tuple(weight.shape)}"
        )
    if n_power_iterations < 0:
        raise ValueError(f"{op}: n_power_iterations must be >= 0, got {n_power_iterations}")
    if not eps >= 0:  # NaN too, as the compiled kernels
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _check_vectors(op: str, weight: Tensor, u: Tensor, v: Tensor, dim: int) -> None:
    if not -weight.dim() <= dim < weight.dim():
        raise IndexError(
            f"{op}: dim out of range (expected to be in range of [{-weight.dim()}, {weight.dim() - 1}] but got {dim})"
        )
    h = weight.shape[dim]
    for name, vector, size in (("u", u, h), ("v", v, weight.numel() // h)):
        if vector.dim() != 1 or vector.shape[0] != size:
            raise ValueError(
                f"{op}: {name} must be a vector of size {size} for a weight of shape "
                f"{list(weight.shape)}, got shape {list(vector.shape)}"
            )
        if vector.dtype != weight.dtype:
            raise TypeError(f"{op}: {name} must have the weight's dtype {weight.dtype}, got {vector.dtype}")
        if vector.device != weight.device:
            raise RuntimeError(f"{op}: {name} must be on the weight's device {weight.device}, got {vector.device}")


def _vectors_fit(weight: Tensor, u: Tensor, v: Tensor, dim: int) -> bool:
    """Whether a non-empty weight, u and v pass _check_vectors: the common case in a few comparisons (~0.5 us less per
    call than the checks that say what is wrong, which every other case goes through)."""
    shape = weight.shape
    ndim = len(shape)
    numel = weight.numel()
    if not numel or not -ndim <= dim < ndim:
        return False
    rows = shape[dim]
    dtype, device = weight.dtype, weight.device
    return (
        u.shape == (rows,)
        and v.shape == (numel // rows,)
        and u.dtype == dtype
        and v.dtype == dtype
        and u.device == device
        and v.device == device
    )


def check_forward_args(
    op: str,
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    complex_ok: bool = False,
) -> None:
    """All the checks of a forward op, as csrc/matrix_view.cpp's check_forward_args (every Python backend; complex
    weights only where `complex_ok`: this reference)."""
    if weight.dtype in REAL_DTYPES and n_power_iterations >= 0 and eps >= 0 and _vectors_fit(weight, u, v, dim):
        return
    _check(op, weight, n_power_iterations, eps, complex_ok)
    _check_vectors(op, weight, u, v, dim)


def check_scaling(op: str, weight: Tensor, coeff, gamma) -> None:
    """The scaled forms' arguments, as csrc/matrix_view.cpp's check_scaling: coeff a positive finite number, gamma
    a one-element real floating tensor on the weight's device; neither for a complex weight."""
    if coeff is None and gamma is None:
        return
    if weight.dtype in COMPLEX_DTYPES:
        raise TypeError(f"{op}: coeff and gamma take real weights, got {weight.dtype}")
    if coeff is not None and not 0 < coeff < math.inf:  # NaN too
        raise ValueError(f"{op}: coeff must be a positive finite number, got {coeff}")
    if gamma is not None:
        if gamma.numel() != 1:
            raise ValueError(f"{op}: gamma must hold one value, got shape {list(gamma.shape)}")
        if gamma.dtype not in REAL_DTYPES:
            raise TypeError(f"{op}: gamma must be float16, bfloat16, float32 or float64, got {gamma.dtype}")
        if gamma.device != weight.device:
            raise RuntimeError(f"{op}: gamma must be on the weight's device {weight.device}, got {gamma.device}")


def check_backward_args(
    op: str, grad: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int, complex_ok: bool = False
) -> None:
    """All the checks of spectral_normalize_backward, as csrc/matrix_view.cpp's check_backward_args."""
    if (
        weight_sn.dtype in REAL_DTYPES
        and grad.shape == weight_sn.shape
        and grad.dtype == weight_sn.dtype
        and grad.device == weight_sn.device
        and sigma.numel() == 1
        and _vectors_fit(weight_sn, u, v, dim)
    ):
        return
    _check(op, weight_sn, 0, 0.0, complex_ok)
    if grad.shape != weight_sn.shape:
        raise ValueError(f"{op}: grad must have weight_sn's shape {list(weight_sn.shape)}, got {list(grad.shape)}")
    if grad.dtype != weight_sn.dtype:
        raise TypeError(f"{op}: grad must have weight_sn's dtype {weight_sn.dtype}, got {grad.dtype}")
    if grad.device != weight_sn.device:
        raise RuntimeError(f"{op}: grad must be on weight_sn's device {weight_sn.device}, got {grad.device}")
    if sigma.numel() != 1:
        raise ValueError(f"{op}: sigma must hold one value, got shape {list(sigma.shape)}")
    _check_vectors(op, weight_sn, u, v, dim)


def check_scaled_backward_args(
    op: str, grad: Tensor, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int, coeff, gamma
) -> None:
    """All the checks of spectral_normalize_scaled_backward, as csrc/matrix_view.cpp's: spectral_normalize_backward's
    (on the weight, whose role weight_sn has there) and the scaled forms'."""
    check_backward_args(op, grad, weight, u, v, sigma, dim)
    check_scaling(op, weight, coeff, gamma)


def _check_grouped_lists(op: str, weights: list[Tensor], dims: list[int], lists: dict[str, list[Tensor]]) -> None:
    if not weights:
        raise ValueError(f"{op}: weights must hold at least one tensor")
    if len(dims) != len(weights):
        raise ValueError(f"{op}: dims must hold one value per weight ({len(weights)}), got {len(dims)}")
    first = weights[0]
    for name, tensors in lists.items():
        if len(tensors) != len(weights):
            raise ValueError(f"{op}: {name} must hold one tensor per weight ({len(weights)}), got {len(tensors)}")
        for i, t in enumerate(tensors):
            if t.dtype != first.dtype:
                raise TypeError(
                    f"{op}: {name}[{i}] has dtype {t.dtype} but the first weight has {first.dtype}: one "
                    f"call takes tensors of one dtype and device (grouped_spectral_norm groups them so)"
                )
            if t.device != first.device:
                raise RuntimeError(
                    f"{op}: {name}[{i}] is on {t.device} but the first weight is on {first.device}: "
                    f"one call takes tensors of one dtype and device (grouped_spectral_norm groups "
                    f"them so)"
                )


def check_grouped_forward_args(
    op: str,
    weights: list[Tensor],
    us: list[Tensor],
    vs: list[Tensor],
    dims: list[int],
    n_power_iterations: int,
    eps: float,
    v_first: list[bool] | None = None,
    coeffs: list[float] | None = None,
    gammas: list[Tensor] | None = None,
    sigma_grad: list[bool] | None = None,
) -> None:
    """All the checks of spectral_normalize_grouped_, as csrc/matrix_view.cpp's check_grouped_forward_args."""
    _check_grouped_lists(op, weights, dims, {"weights": weights, "us": us, "vs": vs})
    for name, values in (("v_first", v_first), ("coeffs", coeffs), ("gammas", gammas), ("sigma_grad", sigma_grad)):
        if values is not None and len(values) != len(weights):
            raise ValueError(f"{op}: {name} must hold one value per weight ({len(weights)}), got {len(values)}")
    for i, (weight, u, v, dim) in enumerate(zip(weights, us, vs, dims)):
        layer = f"{op} (layer {i})"
        check_forward_args(layer, weight, u, v, dim, n_power_iterations, eps)
        check_scaling(layer, weight, None if coeffs is None else coeffs[i], None if gammas is None else gammas[i])


def check_grouped_backward_args(
    op: str,
    grads: list[Tensor],
    weights_sn: list[Tensor],
    us: list[Tensor],
    vs: list[Tensor],
    sigmas: Tensor,
    dims: list[int],
) -> None:
    """All the checks of spectral_normalize_grouped_backward, as csrc/matrix_view.cpp's."""
    _check_grouped_lists(op, weights_sn, dims, {"grads": grads, "weights_sn": weights_sn, "us": us, "vs": vs})
    if sigmas.dim() != 1 or sigmas.shape[0] != len(weights_sn):
        raise ValueError(
            f"{op}: sigmas must be a vector of one value per weight ({len(weights_sn)}), got shape {list(sigmas.shape)}"
        )
    if sigmas.dtype != accumulate_dtype(weights_sn[0].dtype):
        raise TypeError(
            f"{op}: sigmas must be {accumulate_dtype(weights_sn[0].dtype)} for {weights_sn[0].dtype} "
            f"weights, got {sigmas.dtype}"
        )
    if sigmas.device != weights_sn[0].device:
        raise RuntimeError(f"{op}: sigmas must be on the weights' device {weights_sn[0].device}, got {sigmas.device}")
    for i, (grad, weight_sn, u, v, dim) in enumerate(zip(grads, weights_sn, us, vs, dims)):
        check_backward_args(f"{op} (layer {i})", grad, weight_sn, u, v, sigmas[i], dim)
