"""The Python twin of csrc/autograd.cpp: the autograd formulas of sn_ext's ops. The compiled library registers them
in C++, for its own ops and, through register_ops(), for every other backend's set (a Python autograd wrapper costs
~80-290 us per layer and step, more than the fused kernels on small layers); without it, register() (sn_ext/ops.py)
and register_ops() register these.

W_sn = W / sigma(W) with sigma = u^T W v and u, v held constant (as torch does):
  dL/dW = (G - <G, W_sn> u v^T) / sigma  +  g_sigma u v^T.
The scaled forms (coeff, gamma or sigma_grad=False) save W and gamma instead of W_sn and call the scaled backward op
(csrc/autograd.cpp has their formulas, double backward included).
"""

import torch

from . import _library
from ._autocast import autocast_off
from ._checks import check_grouped_forward_args
from ._matrix import rank_one, to_matrix
from .reference import is_scaled, scaled_divisor, scaled_numerator, sigma_counts

_ops = torch.ops.sn_ext


def _scaled_form(coeff, gamma, sigma_grad) -> bool:
    """Whether the backward is the scaled one (W / sigma with its gradient through sigma is the plain one)."""
    return is_scaled(coeff, gamma) or not sigma_grad


def _setup_forward(ctx, inputs, output):
    weight, _, _, dim, _, _, _, coeff, gamma, sigma_grad = inputs
    weight_sn, sigma, u_used, v_used = output
    ctx.mark_non_differentiable(u_used, v_used)
    ctx.set_materialize_grads(False)  # the usual caller ignores sigma: no zero tensor for its gradient
    ctx.scaled = _scaled_form(coeff, gamma, sigma_grad)
    # The plain form's backward reads W_sn; a scaled form's reads W and gamma (W_sn cannot give gamma's gradient at
    # gamma = 0).
    ctx.save_for_backward(weight if ctx.scaled else weight_sn, sigma, u_used, v_used, gamma)
    ctx.dim, ctx.coeff, ctx.sigma_grad = dim, coeff, sigma_grad


def _backward_of_forward(backward: str, scaled_backward: str):
    """The backward of a forward op, calling sn_ext::<backward> or sn_ext::<scaled_backward> (the ops of the same
    backend's set) for the W_sn part: one formula for every backend."""

    def backward_fn(ctx, grad_weight_sn, grad_sigma, _grad_u, _grad_v):
        weight, sigma, u, v, gamma = ctx.saved_tensors  # weight: W_sn for the plain form, W for a scaled one
        grad_weight = grad_gamma = None
        if grad_weight_sn is not None and ctx.scaled:
            grad_weight, grad_gamma = getattr(_ops, scaled_backward).default(
                grad_weight_sn, weight, u, v, sigma, ctx.dim, ctx.coeff, gamma, ctx.sigma_grad
            )
            grad_gamma = grad_gamma if gamma is not None else None
        elif grad_weight_sn is not None:
            grad_weight = getattr(_ops, backward).default(grad_weight_sn, weight, u, v, sigma, ctx.dim)
        if grad_sigma is not None:
            from_sigma = (grad_sigma * rank_one(u, v, weight, ctx.dim)).to(weight.dtype)
            grad_weight = from_sigma if grad_weight is None else grad_weight + from_sigma
        return grad_weight, None, None, None, None, None, None, None, grad_gamma, None

    return backward_fn


# Double backward (gradient penalties through W's gradient, gradgradcheck). With out = (G - lam P) / sigma,
# lam = <G, S>, P = u v^T, and an incoming H:
#   dG = (H - <H, P> S) / sigma,   dS = -<H, P> G / sigma,   dsigma = -<H, out> / sigma.


def _setup_backward(ctx, inputs, output):
    grad, weight_sn, u, v, sigma, dim = inputs
    ctx.save_for_backward(grad, weight_sn, u, v, sigma, output)
    ctx.dim = dim


def _backward_backward(ctx, h):
    grad, weight_sn, u, v, sigma, out = ctx.saved_tensors
    acc = sigma.dtype
    with autocast_off(h.device.type):  # a backward run under autocast must not cast these sums
        h_p = torch.dot(u.to(acc), to_matrix(h, ctx.dim % h.dim()).to(acc) @ v.to(acc))
    d_grad = ((h.to(acc) - h_p * weight_sn.to(acc)) / sigma).to(grad.dtype)
    d_weight_sn = (-h_p / sigma * grad.to(acc)).to(weight_sn.dtype)
    d_sigma = -torch.sum(h.to(acc) * out.to(acc)) / sigma
    return d_grad, d_weight_sn, None, None, d_sigma, None


# The scaled backward's double backward (csrc/autograd.cpp's formulas): with m = 1 / d, A = h c - s k <H, P>,
#   dG = s H + m A W,   dW = m A G,   dsigma = -m^2 (g (<H, G> - k mu <H, P>) + <G, W> A) where d = sigma (else 0),
#   dgamma = c m (<H, G> - k mu <H, P>).


def _setup_scaled_backward(ctx, inputs, output):
    grad, weight, u, v, sigma, dim, coeff, gamma, sigma_grad = inputs
    ctx.save_for_backward(grad, weight, u, v, sigma, gamma)
    ctx.dim, ctx.coeff, ctx.sigma_grad = dim % weight.dim(), coeff, sigma_grad


def _scaled_backward_backward(ctx, h, h_gamma):
    grad, weight, u, v, sigma, gamma = ctx.saved_tensors
    coeff = ctx.coeff
    c = 1.0 if coeff is None else coeff
    acc = sigma.dtype
    g, w, sig = grad.to(acc), weight.to(acc), sigma.to(acc).reshape(())
    m = 1 / scaled_divisor(sig, coeff)
    numerator = scaled_numerator(coeff, gamma, acc)
    s = numerator * m
    k = sigma_counts(sig, coeff, ctx.sigma_grad)
    k = k.to(acc) if isinstance(k, torch.Tensor) else float(k)
    g_w = torch.sum(g * w)
    mu = g_w * m
    a = torch.zeros((), dtype=acc, device=sig.device) if h_gamma is None else h_gamma.to(acc).reshape(()) * c
    h_g = h_p = torch.zeros((), dtype=acc, device=sig.device)
    if h is not None:
        with autocast_off(h.device.type):
            h_p = torch.dot(u.to(acc), to_matrix(h, ctx.dim).to(acc) @ v.to(acc))
        h_g = torch.sum(h.to(acc) * g)
        a = a - s * k * h_p
    d_grad = a * m * w if h is None else s * h.to(acc) + a * m * w
    through_sigma = 1.0 if coeff is None else (sig > coeff).to(acc)
    d_sigma = -(m * m) * through_sigma * (numerator * (h_g - k * mu * h_p) + g_w * a)
    d_gamma = None
    if gamma is not None:
        d_gamma = (m * c * (h_g - k * mu * h_p)).to(gamma.dtype).reshape(gamma.shape)
    return (
        d_grad.to(grad.dtype),
        (a * m * g).to(weight.dtype),
        None,
        None,
        d_sigma.to(sigma.dtype),
        None,
        None,
        d_gamma,
        None,
    )


# torch.library.register_autograd refuses ops that mutate inputs (u, v), so without the compiled library the
# formulas of csrc/autograd.cpp's SpectralNormalizeNode and SpectralNormalizeGrouped are registered as Autograd kernels
# directly: torch.autograd.Functions (the grouped one over the flattened lists: L weights_sn, sigmas, L us_used,
# L vs_used). Below Autograd nothing bumps the versions of the vectors updated in place: they do, as an in-place
# aten op would.


def _forward_kernel(forward: str, backward: str, scaled_backward: str):
    """The Autograd kernel of a forward op (spectral_normalize_'s schema) whose backward calls `backward` or
    `scaled_backward`."""
    op = getattr(_ops, forward).default
    backward_fn = _backward_of_forward(backward, scaled_backward)

    class Forward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                output = op(weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad)
            torch.autograd.graph.increment_version((u, v))
            _setup_forward(ctx, (weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad), output)
            return output

        backward = staticmethod(backward_fn)

    def kernel(weight, u, v, dim, n_power_iterations, eps, v_first=False, coeff=None, gamma=None, sigma_grad=True):
        return Forward.apply(weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad)

    return kernel


class _Grouped(torch.autograd.Function):
    """The grouped forward (csrc/autograd.cpp's SpectralNormalizeGrouped): the plain form's backward is the grouped
    backward op; the scaled forms' the scaled backward op layer by layer, from the weights and gammas."""

    @staticmethod
    def forward(ctx, dims, n_power_iterations, eps, v_first, coeffs, sigma_grad, layers, has_gammas, *tensors):
        weights, us, vs = tensors[:layers], tensors[layers : 2 * layers], tensors[2 * layers : 3 * layers]
        gammas = list(tensors[3 * layers :]) if has_gammas else None
        with torch._C._AutoDispatchBelowAutograd():
            weights_sn, sigmas, us_used, vs_used = _ops.spectral_normalize_grouped_.default(
                list(weights), list(us), list(vs), dims, n_power_iterations, eps, v_first, coeffs, gammas, sigma_grad
            )
        torch.autograd.graph.increment_version((*us, *vs))
        ctx.mark_non_differentiable(*us_used, *vs_used)
        ctx.set_materialize_grads(False)
        ctx.scaled = coeffs is not None or has_gammas or (sigma_grad is not None and not all(sigma_grad))
        if ctx.scaled:
            ctx.save_for_backward(*weights, sigmas, *us_used, *vs_used, *(gammas or ()))
            ctx.coeffs, ctx.sigma_grad = coeffs, sigma_grad
        else:
            ctx.save_for_backward(*weights_sn, sigmas, *us_used, *vs_used)
        ctx.layers, ctx.has_gammas = layers, has_gammas
        ctx.dims = [d % w.dim() for d, w in zip(dims, weights)]
        return (*weights_sn, sigmas, *us_used, *vs_used)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        layers = ctx.layers
        weights, sigmas = saved[:layers], saved[layers]  # weights_sn, or the weights for a scaled form
        us, vs = saved[layers + 1 : 2 * layers + 1], saved[2 * layers + 1 : 3 * layers + 1]
        gammas = saved[3 * layers + 1 :] if ctx.has_gammas else [None] * layers
        grads_weight, grads_gamma = [None] * layers, [None] * layers
        if any(g is not None for g in grads[:layers]) and ctx.scaled:
            for i, (g, w, u, v, d) in enumerate(zip(grads, weights, us, vs, ctx.dims)):
                if g is None:
                    continue
                coeff = None if ctx.coeffs is None else ctx.coeffs[i]
                sigma_grad = True if ctx.sigma_grad is None else ctx.sigma_grad[i]
                grads_weight[i], grads_gamma[i] = _ops.spectral_normalize_scaled_backward.default(
                    g, w, u, v, sigmas[i], d, coeff, gammas[i], sigma_grad
                )
        elif any(g is not None for g in grads[:layers]):
            if torch.is_grad_enabled():  # create_graph=True: the per-layer ops have a double backward
                grads_weight = [
                    None if g is None else _ops.spectral_normalize_backward.default(g, s, u, v, sigmas[i], d)
                    for i, (g, s, u, v, d) in enumerate(zip(grads, weights, us, vs, ctx.dims))
                ]
            else:
                incoming = [torch.zeros_like(s) if g is None else g for g, s in zip(grads, weights)]
                grads_weight = _ops.spectral_normalize_grouped_backward.default(
                    incoming, list(weights), list(us), list(vs), sigmas, ctx.dims
                )
        if grads[layers] is not None:  # sigmas used in the loss: d sigma_i / d W_i = u_i v_i^T
            for i, (w, u, v, d) in enumerate(zip(weights, us, vs, ctx.dims)):
                from_sigma = (grads[layers][i] * rank_one(u.to(sigmas.dtype), v.to(sigmas.dtype), w, d)).to(w.dtype)
                grads_weight[i] = from_sigma if grads_weight[i] is None else grads_weight[i] + from_sigma
        return (
            *([None] * 8),
            *grads_weight,
            *([None] * 2 * layers),
            *(grads_gamma if ctx.has_gammas else ()),
        )


def _grouped_autograd(
    weights, us, vs, dims, n_power_iterations, eps, v_first=None, coeffs=None, gammas=None, sigma_grad=None
):
    # Checked before the lists are flattened: unequal lengths would otherwise be split wrongly.
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
    out = _Grouped.apply(
        dims,
        n_power_iterations,
        eps,
        v_first,
        coeffs,
        sigma_grad,
        layers,
        gammas is not None,
        *weights,
        *us,
        *vs,
        *(gammas or ()),
    )
    return list(out[:layers]), out[layers], list(out[layers + 1 : 2 * layers + 1]), list(out[2 * layers + 1 :])


def register_ops(forward: str, backward: str, scaled_backward: str) -> None:
    """The formulas for a backend's set of ops, names in the sn_ext namespace: `forward` with spectral_normalize_'s
    schema (u, v updated in place), `backward` and `scaled_backward` with spectral_normalize_backward's and
    spectral_normalize_scaled_backward's, which the forward's backward calls. In C++ where the compiled library is
    loaded (csrc/autograd.cpp register_autograd), else these; either replaces the Autograd kernel that
    torch.library.triton_op gave the ops."""
    if _library.compiled is not None:
        _library.compiled.register_autograd(forward, backward, scaled_backward)
        return
    torch.library.register_autograd(f"sn_ext::{backward}", _backward_backward, setup_context=_setup_backward)
    torch.library.register_autograd(
        f"sn_ext::{scaled_backward}", _scaled_backward_backward, setup_context=_setup_scaled_backward
    )
    lib = torch.library.Library("sn_ext", "IMPL")
    _library.replace_impl(lib, forward, _forward_kernel(forward, backward, scaled_backward), "Autograd")
    _library.keep_alive(lib)


def register() -> None:
    """Without the compiled library: the formulas of every sn_ext op, as csrc/autograd.cpp registers them. The
    forwards update u and v in place, which register_autograd refuses: they are Autograd kernels of their own."""
    register_ops(*_library.BACKEND_SCHEMAS)
    lib = torch.library.Library("sn_ext", "IMPL")
    lib.impl("spectral_normalize_grouped_", _grouped_autograd, "Autograd")
    _library.keep_alive(lib)
