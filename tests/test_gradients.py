"""Gradients of sn_ext's spectral norm: float64 gradcheck / gradgradcheck of W -> W_sn (eval mode, so u and v are
fixed during the check) and of the op itself, and a gradient penalty (double backward) against torch's."""

import pytest
import torch
from helpers import assert_rel, make_net_pair, randn, tol_for, unit
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import sn_ext

# (weight shape, dim): 2-D, conv 4-D, and dim=1 cases (a ConvTranspose layout), odd sizes.
SHAPES = [((5, 7), 0), ((3, 1), 0), ((4, 3, 2, 3), 0), ((3, 5, 2, 2), 1), ((6, 5), 1), ((2, 3, 5), -1), ((7,), 0)]


def _ids(shape_dim):
    shape, dim = shape_dim
    return "x".join(map(str, shape)) + f"-dim{dim}"


@pytest.mark.parametrize("shape_dim", SHAPES, ids=_ids)
def test_gradcheck_parametrization_eval(shape_dim):
    shape, dim = shape_dim
    weight = randn(*shape, dtype=torch.float64, seed=1)
    sn = sn_ext.SpectralNorm(weight, n_power_iterations=1, dim=dim).eval()
    buffers = [b.clone() for b in sn.buffers()]
    w = randn(*shape, dtype=torch.float64, seed=2).requires_grad_()  # not the weight the buffers converged on
    assert gradcheck(sn, (w,))
    assert gradgradcheck(sn, (w,))
    for b, b0 in zip(sn.buffers(), buffers):
        assert torch.equal(b, b0)


@pytest.mark.parametrize("shape_dim", [s for s in SHAPES if len(s[0]) > 1], ids=_ids)
def test_gradcheck_op_weight_sn_and_sigma(shape_dim):
    # n_power_iterations=0: sigma = u^T W v with u, v inputs, so (W_sn, sigma) is a smooth function of W.
    shape, dim = shape_dim
    w = randn(*shape, dtype=torch.float64, seed=3).requires_grad_()
    h = shape[dim]
    u, v = unit(h, torch.float64, seed=4), unit(w.numel() // h, torch.float64, seed=5)

    def f(weight):
        weight_sn, sigma, _, _ = torch.ops.sn_ext.spectral_normalize(weight, u, v, dim, 0, 1e-12)
        return weight_sn, sigma

    assert gradcheck(f, (w,))
    assert gradgradcheck(f, (w,))

    def sigma_only(weight):
        return torch.ops.sn_ext.spectral_normalize(weight, u, v, dim, 0, 1e-12)[1]

    assert gradcheck(sigma_only, (w,))


def test_gradcheck_op_backward():
    # The backward op is differentiable itself (double backward); check it directly in all its inputs.
    shape, dim = (4, 3, 2), 1
    grad = randn(*shape, dtype=torch.float64, seed=6).requires_grad_()
    weight_sn = randn(*shape, dtype=torch.float64, seed=7).requires_grad_()
    sigma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    u, v = unit(3, torch.float64, seed=8), unit(8, torch.float64, seed=9)

    def f(g, s, sig):
        return torch.ops.sn_ext.spectral_normalize_backward(g, s, u, v, sig, dim)

    assert gradcheck(f, (grad, weight_sn, sigma))


def _discriminator():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 1),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_torch(dtype, train):
    theirs, ours = make_net_pair(_discriminator, dtype, seed=2, train=train)
    real = randn(3, 2, 7, 7, dtype=dtype, seed=10)
    fake = randn(3, 2, 7, 7, dtype=dtype, seed=11)
    results = []
    for net in (theirs, ours):
        x = (0.3 * real + 0.7 * fake).requires_grad_()
        out = net(x)
        (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        penalty = ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = net(real).mean() - net(fake).mean() + 10 * penalty
        loss.backward()
        results.append((penalty.detach(), {k: p.grad for k, p in net.named_parameters()}))
    (pen_t, grads_t), (pen_o, grads_o) = results
    tol = tol_for(dtype)
    assert_rel(pen_o, pen_t, tol, "penalty")
    assert grads_o.keys() == grads_t.keys()
    for key in grads_t:
        assert grads_o[key] is not None, key
        assert_rel(grads_o[key], grads_t[key], tol, f"grad of {key}")
