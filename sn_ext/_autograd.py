"""The Python twin of csrc/autograd.cpp: the autograd formulas of sn_ext's ops. The compiled library registers them
in C++, for its own ops and, through register_ops(), for every other backend's pair (a Python autograd wrapper costs
~80-290 us per layer and step, more than the fused kernels on small layers); without it, register() (sn_ext/ops.py)
and register_ops() register these.

W_sn = W / sigma(W) with sigma = u^T W v and u, v held constant (as torch does):
  dL/dW = (G - <G, W_sn> u v^T) / sigma  +  g_sigma u v^T.
"""

import torch

from . import _library
from ._autocast import autocast_off
from ._checks import check_grouped_forward_args
from ._matrix import rank_one, to_matrix

_ops = torch.ops.sn_ext


# W_sn = W / sigma(W) with sigma = u^T W v and u, v held constant (as torch does):
#   dL/dW = (G - <G, W_sn> u v^T) / sigma  +  g_sigma u v^T.


def _setup_forward(ctx, inputs, output):
    weight, _, _, dim, *_ = inputs
    weight_sn, sigma, u_used, v_used = output
    ctx.mark_non_differentiable(u_used, v_used)
    ctx.set_materialize_grads(False)  # the usual caller ignores sigma: no zero tensor for its gradient
    ctx.save_for_backward(weight_sn, sigma, u_used, v_used)
    ctx.dim = dim


def _backward_of_forward(backward: str):
    """The backward of a forward op, calling sn_ext::<backward> (a spectral_normalize_backward-schema op of the same
    backend) for the W_sn part: one formula for every backend."""

    def backward_fn(ctx, grad_weight_sn, grad_sigma, _grad_u, _grad_v):
        weight_sn, sigma, u, v = ctx.saved_tensors
        grad_weight = None
        if grad_weight_sn is not None:
            grad_weight = getattr(_ops, backward).default(grad_weight_sn, weight_sn, u, v, sigma, ctx.dim)
        if grad_sigma is not None:
            from_sigma = (grad_sigma * rank_one(u, v, weight_sn, ctx.dim)).to(weight_sn.dtype)
            grad_weight = from_sigma if grad_weight is None else grad_weight + from_sigma
        return grad_weight, None, None, None, None, None, None

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


# torch.library.register_autograd refuses ops that mutate inputs (u, v), so without the compiled library the
# formulas of csrc/autograd.cpp's SpectralNormalizeNode and SpectralNormalizeGrouped are registered as Autograd kernels
# directly: torch.autograd.Functions (the grouped one over the flattened lists: L weights_sn, sigmas, L us_used,
# L vs_used). Below Autograd nothing bumps the versions of the vectors updated in place: they do, as an in-place
# aten op would.


def _forward_kernel(forward: str, backward: str):
    """The Autograd kernel of a forward op (spectral_normalize_'s schema) whose backward calls `backward`."""
    op = getattr(_ops, forward).default
    backward_fn = _backward_of_forward(backward)

    class Forward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight, u, v, dim, n_power_iterations, eps, v_first):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                output = op(weight, u, v, dim, n_power_iterations, eps, v_first)
            torch.autograd.graph.increment_version((u, v))
            _setup_forward(ctx, (weight, u, v, dim), output)
            return output

        backward = staticmethod(backward_fn)

    def kernel(weight, u, v, dim, n_power_iterations, eps, v_first=False):
        return Forward.apply(weight, u, v, dim, n_power_iterations, eps, v_first)

    return kernel


class _Grouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dims, n_power_iterations, eps, v_first, layers, *tensors):
        weights, us, vs = tensors[:layers], tensors[layers : 2 * layers], tensors[2 * layers :]
        with torch._C._AutoDispatchBelowAutograd():
            weights_sn, sigmas, us_used, vs_used = _ops.spectral_normalize_grouped_.default(
                list(weights), list(us), list(vs), dims, n_power_iterations, eps, v_first
            )
        torch.autograd.graph.increment_version((*us, *vs))
        ctx.mark_non_differentiable(*us_used, *vs_used)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*weights_sn, sigmas, *us_used, *vs_used)
        ctx.dims = [d % w.dim() for d, w in zip(dims, weights)]
        return (*weights_sn, sigmas, *us_used, *vs_used)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        layers = (len(saved) - 1) // 3
        weights_sn, sigmas = saved[:layers], saved[layers]
        us, vs = saved[layers + 1 : 2 * layers + 1], saved[2 * layers + 1 :]
        grads_weight = [None] * layers
        if any(g is not None for g in grads[:layers]):
            if torch.is_grad_enabled():  # create_graph=True: the per-layer ops have a double backward
                grads_weight = [
                    None if g is None else _ops.spectral_normalize_backward.default(g, s, u, v, sigmas[i], d)
                    for i, (g, s, u, v, d) in enumerate(zip(grads, weights_sn, us, vs, ctx.dims))
                ]
            else:
                incoming = [torch.zeros_like(s) if g is None else g for g, s in zip(grads, weights_sn)]
                grads_weight = _ops.spectral_normalize_grouped_backward.default(
                    incoming, list(weights_sn), list(us), list(vs), sigmas, ctx.dims
                )
        if grads[layers] is not None:  # sigmas used in the loss: d sigma_i / d W_i = u_i v_i^T
            for i, (s, u, v, d) in enumerate(zip(weights_sn, us, vs, ctx.dims)):
                from_sigma = (grads[layers][i] * rank_one(u.to(sigmas.dtype), v.to(sigmas.dtype), s, d)).to(s.dtype)
                grads_weight[i] = from_sigma if grads_weight[i] is None else grads_weight[i] + from_sigma
        return (None, None, None, None, None, *grads_weight, *([None] * 2 * layers))


def _grouped_autograd(weights, us, vs, dims, n_power_iterations, eps, v_first=None):
    # Checked before the lists are flattened: unequal lengths would otherwise be split wrongly.
    check_grouped_forward_args(
        "sn_ext::spectral_normalize_grouped_", weights, us, vs, dims, n_power_iterations, eps, v_first
    )
    layers = len(weights)
    out = _Grouped.apply(dims, n_power_iterations, eps, v_first, layers, *weights, *us, *vs)
    return list(out[:layers]), out[layers], list(out[layers + 1 : 2 * layers + 1]), list(out[2 * layers + 1 :])


def register_ops(forward: str, backward: str) -> None:
    """The formulas for a backend's pair of ops, names in the sn_ext namespace: `forward` with spectral_normalize_'s
    schema (u, v updated in place), `backward` with spectral_normalize_backward's, which the forward's backward
    calls. In C++ where the compiled library is loaded (csrc/autograd.cpp register_autograd), else these; either
    replaces the Autograd kernel that torch.library.triton_op gave the op."""
    if _library.compiled is not None:
        _library.compiled.register_autograd(forward, backward)
        return
    torch.library.register_autograd(f"sn_ext::{backward}", _backward_backward, setup_context=_setup_backward)
    lib = torch.library.Library("sn_ext", "IMPL")
    _library.replace_impl(lib, forward, _forward_kernel(forward, backward), "Autograd")
    _library.keep_alive(lib)


def register() -> None:
    """Without the compiled library: the formulas of every sn_ext op, as csrc/autograd.cpp registers them. The
    forwards update u and v in place, which register_autograd refuses: they are Autograd kernels of their own."""
    register_ops("spectral_normalize_", "spectral_normalize_backward")
    lib = torch.library.Library("sn_ext", "IMPL")
    lib.impl("spectral_normalize_grouped_", _grouped_autograd, "Autograd")
    _library.keep_alive(lib)
