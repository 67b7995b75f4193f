"""Pure-PyTorch spectral normalization: the test oracle, and the kernels used where no compiled one exists.

Same semantics as the fused kernels (csrc/cpu), written with plain torch ops:
- the matrix is torch's: ``weight.permute(dim, *other dims).flatten(1)``;
- ``N(x) = x / max(|x|, eps)``, computed in float32 (float64 for float64 weights) so eps never underflows,
  and rounded to the weight's dtype like torch's buffers;
- u-first rounds (u = N(W v), v = N(W^H u)) as torch.nn.utils.parametrizations, v-first as legacy torch;
- sigma = u^H W v for the final vectors (= s^2 / max(s, eps) for the last half-step's norm s);
- complex weights (complex64, complex128) as torch's parametrization takes them: conjugate transposes where torch
  has them (W^H u, vdot), sigma = u^H W v in the weight's complex dtype (real after a round), and the gradient
  (G - <W_sn, G> u v^H) / conj(sigma); only the reference backend's ops take them (the compiled and Triton kernels,
  and so sn_ext::spectral_normalize_ on every build, refuse them);
- a run that meets a non-finite or zero vector returns the input vectors unchanged (no host synchronisation);
- the scaled forms (bounded spectral norm, sigma-reparam: docs/variants.md) as the kernels compute them:
  W_hat = W s with s = g / max(sigma, f), g = gamma c and f = c for coeff = c (g = gamma, f = 0 without one; gamma
  1 without one), and their backward from W itself (spectral_normalize_scaled_backward); real weights only.
"""

import torch
from torch import Tensor

from ._checks import (
    check_backward_args,
    check_forward_args,
    check_grouped_backward_args,
    check_grouped_forward_args,
    check_scaled_backward_args,
    check_scaling,
)
from ._matrix import accumulate_dtype, rank_one, to_matrix


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
    if n_power_iterations == 0:
        return torch.vdot(u.to(acc), matrix @ v.to(acc)), u.clone(), v.clone()
    return power_rounds(matrix.__matmul__, matrix.mH.__matmul__, u, v, n_power_iterations, eps, v_first)


def power_rounds(
    matvec, rmatvec, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, v_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """n >= 1 rounds on (u, v), however W x (`matvec`) and W^H x (`rmatvec`) are computed: here from the whole
    matrix, in sn_ext/sharded.py from each rank's shard and a collective. Both take and return whole vectors in the
    accumulation dtype; u and v have the weight's dtype. Returns (sigma, u_new, v_new) as _iterate."""
    dtype = u.dtype
    acc = accumulate_dtype(dtype)
    uu, vv = u.to(acc), v.to(acc)
    ok = torch.ones((), dtype=torch.bool, device=u.device)
    for _ in range(n_power_iterations):
        if v_first:
            vv, first = _normalized(rmatvec(uu), eps, dtype)
            uu, last = _normalized(matvec(vv), eps, dtype)
        else:
            uu, first = _normalized(matvec(vv), eps, dtype)
            vv, last = _normalized(rmatvec(uu), eps, dtype)
        ok = ok & _usable(first) & _usable(last)
    sigma = (last * last / last.clamp_min(eps)).to(acc)
    return sigma, torch.where(ok, uu.to(u.dtype), u), torch.where(ok, vv.to(v.dtype), v)


def is_scaled(coeff: float | None, gamma: Tensor | None) -> bool:
    """Whether the forward is a scaled form (W s), not W / sigma."""
    return coeff is not None or gamma is not None


def scaled_divisor(sigma: Tensor, coeff: float | None) -> Tensor:
    """max(sigma, coeff) (a NaN sigma stays NaN, as the kernels'), or sigma without a coeff."""
    return sigma if coeff is None else torch.clamp_min(sigma, coeff)


def scaled_numerator(coeff: float | None, gamma: Tensor | None, dtype: torch.dtype) -> Tensor | float:
    """g = gamma c: gamma (1 without one) times coeff (1 without one), in `dtype` (a float without gamma)."""
    c = 1.0 if coeff is None else coeff
    return c if gamma is None else gamma.to(dtype).reshape(()) * c


def sigma_counts(sigma: Tensor, coeff: float | None, sigma_grad: bool) -> Tensor | bool:
    """k: whether the gradient flows through sigma, sigma_grad and (with a coeff) sigma > coeff."""
    if not sigma_grad:
        return False
    return True if coeff is None else sigma > coeff


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
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
    *,
    op: str = "sn_ext::spectral_normalize_",
    complex_ok: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """spectral_normalize_ without the in-place update (the test oracle): (W_sn, sigma, u_new, v_new), u and v
    untouched. `sigma_grad` changes nothing here (it is autograd's)."""
    check_forward_args(op, weight, u, v, dim, n_power_iterations, eps, complex_ok)
    check_scaling(op, weight, coeff, gamma)
    sigma, u_new, v_new = _iterate(weight, u, v, dim, n_power_iterations, eps, v_first)
    if is_scaled(coeff, gamma):
        scale = scaled_numerator(coeff, gamma, sigma.dtype) / scaled_divisor(sigma, coeff)
        weight_sn = (weight.to(sigma.dtype) * scale).to(weight.dtype)
    else:
        weight_sn = (weight.to(sigma.dtype) / sigma).to(weight.dtype)
    return weight_sn, sigma, u_new, v_new


def spectral_normalize_(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    v_first: bool = False,
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
    *,
    op: str = "sn_ext::spectral_normalize_",
    complex_ok: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op: u and v also updated in place (not when n == 0; u_new, v_new are the inputs' values when a round was
    degenerate, so the copies change nothing then)."""
    weight_sn, sigma, u_new, v_new = spectral_normalize(
        weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad, op=op, complex_ok=complex_ok
    )
    if n_power_iterations:
        u.copy_(u_new)
        v.copy_(v_new)
    return weight_sn, sigma, u_new, v_new


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


def spectral_normalize_scaled_backward(
    grad: Tensor,
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    sigma: Tensor,
    dim: int,
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
    *,
    op: str = "sn_ext::spectral_normalize_scaled_backward",
) -> tuple[Tensor, Tensor]:
    """(grad_W, grad_gamma) of W_hat = W g / max(sigma, f): with mu = <G, W> / max(sigma, f) and s = g / max(sigma, f),
    grad_W = s (G - k mu u v^T), grad_gamma = mu c (see sn_ext/ops.py)."""
    check_scaled_backward_args(op, grad, weight, u, v, sigma, dim, coeff, gamma)
    acc = accumulate_dtype(weight.dtype)
    g, sig = grad.to(acc), sigma.to(acc).reshape(())
    divisor = scaled_divisor(sig, coeff)
    mu = torch.sum(weight.to(acc) * g) / divisor
    scale = scaled_numerator(coeff, gamma, acc) / divisor
    k = sigma_counts(sig, coeff, sigma_grad)
    correction = torch.where(k, mu, torch.zeros_like(mu)) if isinstance(k, Tensor) else (mu if k else None)
    corrected = g if correction is None else g - correction * rank_one(u.to(acc), v.to(acc), grad, dim)
    grad_weight = torch.empty_like(weight).copy_((corrected * scale).to(grad.dtype))  # in the weight's layout
    grad_gamma = mu * (1.0 if coeff is None else coeff)
    if gamma is not None:
        grad_gamma = grad_gamma.to(gamma.dtype).reshape(gamma.shape)
    return grad_weight, grad_gamma


# The "reference" backend's own ops (sn_ext::reference_spectral_normalize_(_backward), _scaled_backward): the same,
# and the first two also take complex weights. sn_ext::spectral_normalize_ refuses them on every build, as the
# compiled kernels do.


def reference_spectral_normalize_(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    v_first: bool = False,
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return spectral_normalize_(
        weight,
        u,
        v,
        dim,
        n_power_iterations,
        eps,
        v_first,
        coeff,
        gamma,
        sigma_grad,
        op="sn_ext::reference_spectral_normalize_",
        complex_ok=True,
    )


def reference_spectral_normalize_backward(
    grad: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int
) -> Tensor:
    return spectral_normalize_backward(
        grad, weight_sn, u, v, sigma, dim, op="sn_ext::reference_spectral_normalize_backward", complex_ok=True
    )


def reference_spectral_normalize_scaled_backward(
    grad: Tensor,
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    sigma: Tensor,
    dim: int,
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    op = "sn_ext::reference_spectral_normalize_scaled_backward"
    return spectral_normalize_scaled_backward(grad, weight, u, v, sigma, dim, coeff, gamma, sigma_grad, op=op)


# ---- grouped mode: many layers per call (sn_ext.grouped_spectral_norm); the same as the per-layer ops ----


def spectral_normalize_grouped_(
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
) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]:
    check_grouped_forward_args(
        "sn_ext::spectral_normalize_grouped_",
        weights,
        us,
        vs,
        dims,
        n_power_iterations,
        eps,
        v_first,
        coeffs,
        gammas,
        sigma_grad,
    )
    layers = len(weights)
    orders = v_first if v_first is not None else [False] * layers
    layer_coeffs = coeffs if coeffs is not None else [None] * layers
    layer_gammas = gammas if gammas is not None else [None] * layers
    weights_sn, sigmas, us_used, vs_used = [], [], [], []
    for weight, u, v, dim, order, coeff, gamma in zip(weights, us, vs, dims, orders, layer_coeffs, layer_gammas):
        weight_sn, sigma, u_new, v_new = spectral_normalize_(
            weight, u, v, dim, n_power_iterations, eps, order, coeff, gamma
        )
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
