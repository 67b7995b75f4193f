"""The sn_ext operators: typed wrappers, fake (meta) kernels for torch.compile, and autograd.

Importing this module loads the kernels (see _library.py). The ops, all on W's matrix view for `dim`
(torch's ``W.permute(dim, *others).flatten(1)``, which the kernels read in place):

- ``power_iteration_(W, u, v, dim, n, eps, v_first=False) -> sigma``: n rounds, u and v updated in place.
- ``spectral_normalize(W, u, v, dim, n, eps, v_first=False) -> (W_sn, sigma, u_new, v_new)``: the fused forward,
  differentiable in W (W_sn and sigma); u_new, v_new are the vectors after n rounds (fresh tensors, no grad).
- ``spectral_normalize_backward(grad, W_sn, u, v, sigma, dim) -> grad_W``: ``(grad - <grad, W_sn> u v^T) / sigma``.
- ``spectral_normalize_grouped_(Ws, us, vs, dims, n, eps) -> (W_sns, sigmas, us_used, vs_used)``: the forward of
  many layers in one call (one launch on a GPU), u-first, with us and vs updated in place; ``sigmas`` is a vector.
- ``spectral_normalize_grouped_backward(grads, W_sns, us, vs, sigmas, dims) -> grads_W``: their backward.

The other backends' pairs (sn_ext.backends) have the same schemas and share the fake kernels and autograd formulas
below (register_backend_ops): ``reference_spectral_normalize(_backward)`` (pure PyTorch, always defined) and
``triton_spectral_normalize(_backward)`` (sn_ext/triton, defined when that backend is first chosen).
"""

import contextlib

import torch
from torch import Tensor

from . import _library, reference

library_status = _library.load()

_ops = torch.ops.sn_ext


def power_iteration_(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> Tensor:
    return _ops.power_iteration_.default(weight, u, v, dim, n_power_iterations, eps, v_first)


def spectral_normalize(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ops.spectral_normalize.default(weight, u, v, dim, n_power_iterations, eps, v_first)


def spectral_normalize_backward(
    grad: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int
) -> Tensor:
    return _ops.spectral_normalize_backward.default(grad, weight_sn, u, v, sigma, dim)


def spectral_normalize_grouped_(
    weights: list[Tensor], us: list[Tensor], vs: list[Tensor], dims: list[int], n_power_iterations: int, eps: float
) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]:
    return _ops.spectral_normalize_grouped_.default(weights, us, vs, dims, n_power_iterations, eps)


def spectral_normalize_grouped_backward(
    grads: list[Tensor], weights_sn: list[Tensor], us: list[Tensor], vs: list[Tensor], sigmas: Tensor, dims: list[int]
) -> list[Tensor]:
    return _ops.spectral_normalize_grouped_backward.default(grads, weights_sn, us, vs, sigmas, dims)


# ---- fake kernels: output metadata only, for torch.compile and FakeTensor ----


def _sigma_like(weight: Tensor) -> Tensor:
    return weight.new_empty((), dtype=reference.accumulate_dtype(weight.dtype))


@torch.library.register_fake("sn_ext::power_iteration_")
def _(weight, u, v, dim, n_power_iterations, eps, v_first=False):
    return _sigma_like(weight)


# Shared by every backend's ops with these schemas (see register_backend_ops).
@torch.library.register_fake("sn_ext::spectral_normalize")
def _fake_forward(weight, u, v, dim, n_power_iterations, eps, v_first=False):
    return (
        torch.empty_like(weight),
        _sigma_like(weight),
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("sn_ext::spectral_normalize_backward")
def _fake_backward(grad, weight_sn, u, v, sigma, dim):
    return torch.empty_like(weight_sn)


def _contiguous_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("sn_ext::spectral_normalize_grouped_")
def _(weights, us, vs, dims, n_power_iterations, eps):
    sigmas = weights[0].new_empty(len(weights), dtype=reference.accumulate_dtype(weights[0].dtype))
    return (
        [torch.empty_like(w) for w in weights],
        sigmas,
        [_contiguous_like(u) for u in us],
        [_contiguous_like(v) for v in vs],
    )


@torch.library.register_fake("sn_ext::spectral_normalize_grouped_backward")
def _(grads, weights_sn, us, vs, sigmas, dims):
    return [torch.empty_like(w) for w in weights_sn]


# ---- autograd ----
# The compiled library registers these formulas in C++ (csrc/autograd.cpp): this Python wrapper costs ~80 us per
# layer and step, more than the fused kernels on small layers. Without the library, they are registered here.
# W_sn = W / sigma(W) with sigma = u^T W v and u, v held constant (as torch does):
#   dL/dW = (G - <G, W_sn> u v^T) / sigma  +  g_sigma u v^T.


def _setup_forward(ctx, inputs, output):
    weight, _, _, dim, *_ = inputs
    weight_sn, sigma, u_new, v_new = output
    ctx.mark_non_differentiable(u_new, v_new)
    ctx.set_materialize_grads(False)  # the usual caller ignores sigma: no zero tensor for its gradient
    ctx.save_for_backward(weight_sn, sigma, u_new, v_new)
    ctx.dim = dim


def _backward_of_forward(backward_op):
    """The backward of a forward op, calling `backward_op` (a spectral_normalize_backward-schema op of the same
    backend) for the W_sn part: one formula for every backend."""

    def backward(ctx, grad_weight_sn, grad_sigma, _grad_u, _grad_v):
        weight_sn, sigma, u, v = ctx.saved_tensors
        grad_weight = None
        if grad_weight_sn is not None:
            grad_weight = backward_op(grad_weight_sn, weight_sn, u, v, sigma, ctx.dim)
        if grad_sigma is not None:
            from_sigma = (grad_sigma * reference.rank_one(u, v, weight_sn, ctx.dim)).to(weight_sn.dtype)
            grad_weight = from_sigma if grad_weight is None else grad_weight + from_sigma
        return grad_weight, None, None, None, None, None, None

    return backward


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
    with _autocast_off(h.device.type):  # a backward run under autocast must not cast these sums
        h_p = torch.dot(u.to(acc), reference.to_matrix(h, ctx.dim % h.dim()).to(acc) @ v.to(acc))
    d_grad = ((h.to(acc) - h_p * weight_sn.to(acc)) / sigma).to(grad.dtype)
    d_weight_sn = (-h_p / sigma * grad.to(acc)).to(weight_sn.dtype)
    d_sigma = -torch.sum(h.to(acc) * out.to(acc)) / sigma
    return d_grad, d_weight_sn, None, None, d_sigma, None


# ---- autocast ----
# The ops run in their inputs' dtype (the weight's) with autocast off inside them, whatever the autocast dtype.
# A custom op with no Autocast kernel falls through that key with autocast still on, and the reference's matmuls
# then ran in bfloat16/float16 and returned a bfloat16 sigma (the fake kernel says float32). The compiled library
# registers this in C++ (csrc/autocast.cpp); without it, it is registered here.

_AUTOCAST_KEYS = {"AutocastCPU": "cpu", "AutocastCUDA": "cuda"}


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _without_autocast(op, device_type: str):
    def kernel(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)

    return kernel


if not library_status.loaded:
    torch.library.register_autograd(
        "sn_ext::spectral_normalize",
        _backward_of_forward(_ops.spectral_normalize_backward.default),
        setup_context=_setup_forward,
    )
    torch.library.register_autograd(
        "sn_ext::spectral_normalize_backward", _backward_backward, setup_context=_setup_backward
    )
    _autocast_lib = torch.library.Library("sn_ext", "IMPL")
    for _name in (
        "power_iteration_",
        "spectral_normalize",
        "spectral_normalize_backward",
        "spectral_normalize_grouped_",
        "spectral_normalize_grouped_backward",
    ):
        for _key, _device in _AUTOCAST_KEYS.items():
            _autocast_lib.impl(_name, _without_autocast(getattr(_ops, _name).default, _device), _key)


# ---- autograd of the grouped forward ----
# torch.library.register_autograd refuses ops that mutate inputs (us, vs), so without the compiled library the
# formulas of csrc/autograd.cpp's SpectralNormalizeGrouped are registered as an Autograd kernel directly: a
# torch.autograd.Function over the flattened lists (L weights_sn, sigmas, L us_used, L vs_used).


class _Grouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dims, n_power_iterations, eps, layers, *tensors):
        weights, us, vs = tensors[:layers], tensors[layers : 2 * layers], tensors[2 * layers :]
        with torch._C._AutoDispatchBelowAutograd():
            weights_sn, sigmas, us_used, vs_used = _ops.spectral_normalize_grouped_.default(
                list(weights), list(us), list(vs), dims, n_power_iterations, eps
            )
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
                    None if g is None else spectral_normalize_backward(g, s, u, v, sigmas[i], d)
                    for i, (g, s, u, v, d) in enumerate(zip(grads, weights_sn, us, vs, ctx.dims))
                ]
            else:
                incoming = [torch.zeros_like(s) if g is None else g for g, s in zip(grads, weights_sn)]
                grads_weight = spectral_normalize_grouped_backward(
                    incoming, list(weights_sn), list(us), list(vs), sigmas, ctx.dims
                )
        if grads[layers] is not None:  # sigmas used in the loss: d sigma_i / d W_i = u_i v_i^T
            for i, (s, u, v, d) in enumerate(zip(weights_sn, us, vs, ctx.dims)):
                from_sigma = (grads[layers][i] * reference.rank_one(u.to(sigmas.dtype), v.to(sigmas.dtype), s, d)).to(
                    s.dtype
                )
                grads_weight[i] = from_sigma if grads_weight[i] is None else grads_weight[i] + from_sigma
        return (None, None, None, None, *grads_weight, *([None] * 2 * layers))


def _grouped_autograd(weights, us, vs, dims, n_power_iterations, eps):
    # Checked before the lists are flattened: unequal lengths would otherwise be split wrongly.
    reference.check_grouped_forward_args(
        "sn_ext::spectral_normalize_grouped_", weights, us, vs, dims, n_power_iterations, eps
    )
    layers = len(weights)
    out = _Grouped.apply(dims, n_power_iterations, eps, layers, *weights, *us, *vs)
    return list(out[:layers]), out[layers], list(out[layers + 1 : 2 * layers + 1]), list(out[2 * layers + 1 :])


if not library_status.loaded:
    _grouped_autograd_lib = torch.library.Library("sn_ext", "IMPL")
    _grouped_autograd_lib.impl("spectral_normalize_grouped_", _grouped_autograd, "Autograd")
    _library.keep_alive(_grouped_autograd_lib)


# ---- the other backends' ops (sn_ext.backends): same schemas, so the same fake kernels, autograd and autocast ----


def register_backend_ops(forward: str, backward: str, *, autocast: bool = True) -> None:
    """Registers, for a backend's pair of ops with the schemas of spectral_normalize / spectral_normalize_backward
    (names in the sn_ext namespace), the shared fake kernels, the autograd formulas above (the forward's backward
    calling `backward`), and optionally the autocast exclusion."""
    torch.library.register_fake(f"sn_ext::{forward}", _fake_forward)
    torch.library.register_fake(f"sn_ext::{backward}", _fake_backward)
    torch.library.register_autograd(
        f"sn_ext::{forward}", _backward_of_forward(getattr(_ops, backward).default), setup_context=_setup_forward
    )
    torch.library.register_autograd(f"sn_ext::{backward}", _backward_backward, setup_context=_setup_backward)
    if autocast:
        lib = torch.library.Library("sn_ext", "IMPL")
        for name in (forward, backward):
            for key, device in _AUTOCAST_KEYS.items():
                lib.impl(name, _without_autocast(getattr(_ops, name).default, device), key)
        _library.keep_alive(lib)


# The reference under its own names (sn_ext/_library.py), for the "reference" backend where compiled kernels exist.
register_backend_ops(*_library.REFERENCE_OPS)
