"""Pure-PyTorch spectral normalization: the test oracle, and the kernels used where no compiled one exists.

Same semantics as the fused kernels (csrc/cpu/spectral_norm_cpu.cpp), written with plain torch ops:
- the matrix is torch's: ``weight.permute(dim, *other dims).flatten(1)``;
- ``N(x) = x / max(|x|, eps)``, computed in float32 (float64 for float64 weights) so eps never underflows,
  and rounded to the weight's dtype like torch's buffers;
- u-first rounds (u = N(W v), v = N(W^H u)) as torch.nn.utils.parametrizations, v-first as legacy torch;
- sigma = u^H W v for the final vectors (= s^2 / max(s, eps) for the last half-step's norm s);
- complex weights (complex64, complex128) as torch's parametrization takes them: conjugate transposes where torch
  has them (W^H u, vdot), sigma = u^H W v in the weight's complex dtype (real after a round), and the gradient
  (G - <W_sn, G> u v^H) / conj(sigma); only the reference backend's ops take them (the compiled and Triton kernels,
  and so sn_ext::spectral_normalize on every build, refuse them);
- a run that meets a non-finite or zero vector returns the input vectors unchanged (no host synchronisation).
"""

import torch
from torch import Tensor

REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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


def _normalized(x: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.vector_norm(x)
    return (x / norm.clamp_min(eps)).to(dtype).to(x.dtype), norm


def _usable(norm: Tensor) -> Tensor:
    return torch.isfinite(norm) & (norm > 0)


def _iterate(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (sigma, u_new, v_new); u_new, v_new in the weight's dtype."""
    dim = dim % weight.dim()
    acc = accumulate_dtype(weight.dtype)
    matrix = to_matrix(weight, dim).to(acc)
    uu, vv = u.to(acc), v.to(acc)
    if n_power_iterations == 0:
        return torch.vdot(uu, matrix @ vv), u.clone(), v.clone()
    ok = torch.ones((), dtype=torch.bool, device=weight.device)
    for _ in range(n_power_iterations):
        if v_first:
            vv, first = _normalized(matrix.mH @ uu, eps, weight.dtype)
            uu, last = _normalized(matrix @ vv, eps, weight.dtype)
        else:
            uu, first = _normalized(matrix @ vv, eps, weight.dtype)
            vv, last = _normalized(matrix.mH @ uu, eps, weight.dtype)
        ok = ok & _usable(first) & _usable(last)
    sigma = (last * last / last.clamp_min(eps)).to(acc)
    return sigma, torch.where(ok, uu.to(u.dtype), u), torch.where(ok, vv.to(v.dtype), v)


def _check(op: str, weight: Tensor, n_power_iterations: int, eps: float, complex_ok: bool) -> None:
    if weight.dtype not in REAL_DTYPES and not (complex_ok and weight.dtype in COMPLEX_DTYPES):
        kinds = (
            "float16, bfloat16, float32, float64, complex64 or complex128"
            if complex_ok
            else "float16, bfloat16, float32 or float64"
        )
        raise TypeError(f"{op}: weight must be {kinds}, got {weight.dtype}")
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
    _check(op, weight, n_power_iterations, eps, complex_ok)
    _check_vectors(op, weight, u, v, dim)


def check_backward_args(
    op: str, grad: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int, complex_ok: bool = False
) -> None:
    """All the checks of spectral_normalize_backward, as csrc/matrix_view.cpp's check_backward_args."""
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


def power_iteration_(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> Tensor:
    check_forward_args("sn_ext::power_iteration_", weight, u, v, dim, n_power_iterations, eps)
    sigma, u_new, v_new = _iterate(weight, u, v, dim, n_power_iterations, eps, v_first)
    u.copy_(u_new)
    v.copy_(v_new)
    return sigma


def spectral_normalize(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    v_first: bool = False,
    *,
    op: str = "sn_ext::spectral_normalize",
    complex_ok: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_forward_args(op, weight, u, v, dim, n_power_iterations, eps, complex_ok)
    sigma, u_new, v_new = _iterate(weight, u, v, dim, n_power_iterations, eps, v_first)
    weight_sn = (weight.to(sigma.dtype) / sigma).to(weight.dtype)
    return weight_sn, sigma, u_new, v_new


def rank_one(u: Tensor, v: Tensor, like: Tensor, dim: int) -> Tensor:
    """u v^H (u v^T for real vectors) in the layout of `like` (the gradient of sigma = u^H W v with respect to W)."""
    return from_matrix(torch.outer(u, v.conj()), like, dim % like.dim())


def spectral_normalize_backward(
    grad: Tensor,
    weight_sn: Tensor,
    u: Tensor,
    v: Tensor,
    sigma: Tensor,
    dim: int,
    *,
    op: str = "sn_ext::spectral_normalize_backward",
    complex_ok: bool = False,
) -> Tensor:
    check_backward_args(op, grad, weight_sn, u, v, sigma, dim, complex_ok)
    acc = sigma.dtype
    g = grad.to(acc)
    lam = torch.sum(weight_sn.to(acc).conj() * g)  # <W_sn, G>; conj() is a no-op on real tensors
    grad_weight = ((g - lam * rank_one(u.to(acc), v.to(acc), grad, dim)) / sigma.conj()).to(grad.dtype)
    # In weight_sn's layout, as the compiled kernels and the fake kernel (empty_like(weight_sn)).
    return torch.empty_like(weight_sn).copy_(grad_weight)


# The "reference" backend's own ops (sn_ext::reference_spectral_normalize(_backward)): the same, and they also take
# complex weights. sn_ext::spectral_normalize refuses them on every build, as the compiled kernels do.


def reference_spectral_normalize(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return spectral_normalize(
        weight, u, v, dim, n_power_iterations, eps, v_first, op="sn_ext::reference_spectral_normalize", complex_ok=True
    )


def reference_spectral_normalize_backward(
    grad: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int
) -> Tensor:
    return spectral_normalize_backward(
        grad, weight_sn, u, v, sigma, dim, op="sn_ext::reference_spectral_normalize_backward", complex_ok=True
    )


# ---- grouped mode: many layers per call (sn_ext.grouped_spectral_norm); the same as the per-layer ops ----


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
) -> None:
    """All the checks of spectral_normalize_grouped_, as csrc/matrix_view.cpp's check_grouped_forward_args."""
    _check_grouped_lists(op, weights, dims, {"weights": weights, "us": us, "vs": vs})
    for i, (weight, u, v, dim) in enumerate(zip(weights, us, vs, dims)):
        check_forward_args(f"{op} (layer {i})", weight, u, v, dim, n_power_iterations, eps)


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


def spectral_normalize_grouped_(
    weights: list[Tensor], us: list[Tensor], vs: list[Tensor], dims: list[int], n_power_iterations: int, eps: float
) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]:
    check_grouped_forward_args("sn_ext::spectral_normalize_grouped_", weights, us, vs, dims, n_power_iterations, eps)
    weights_sn, sigmas, us_used, vs_used = [], [], [], []
    for weight, u, v, dim in zip(weights, us, vs, dims):
        weight_sn, sigma, u_new, v_new = spectral_normalize(weight, u, v, dim, n_power_iterations, eps)
        u.copy_(u_new)
        v.copy_(v_new)
        weights_sn.append(weight_sn)
        sigmas.append(sigma)
        us_used.append(u_new)
        vs_used.append(v_new)
    return weights_sn, torch.stack(sigmas), us_used, vs_used


def spectral_normalize_grouped_backward(
    grads: list[Tensor], weights_sn: list[Tensor], us: list[Tensor], vs: list[Tensor], sigmas: Tensor, dims: list[int]
) -> list[Tensor]:
    check_grouped_backward_args("sn_ext::spectral_normalize_grouped_backward", grads, weights_sn, us, vs, sigmas, dims)
    return [
        spectral_normalize_backward(grad, weight_sn, u, v, sigmas[i], dim)
        for i, (grad, weight_sn, u, v, dim) in enumerate(zip(grads, weights_sn, us, vs, dims))
    ]
