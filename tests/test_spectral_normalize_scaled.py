"""The scaled forms of the fused ops (bounded spectral norm, sigma-reparam: docs/variants.md) on every backend
(tests/op_cases.py, imported as `cases`; ids start with the backend, and a backend that cannot run here skips, saying
why): sn_ext::spectral_normalize_ with coeff, gamma and sigma_grad, W_hat = W g / max(sigma, f), and
sn_ext::spectral_normalize_scaled_backward, grad_W = s (G - k mu u v^T) and grad_gamma = mu c with mu = <G, W> /
max(sigma, f). Values against the float64 reference and an independent numpy computation of the formula; opcheck;
gradcheck and gradgradcheck through the forward op in W and gamma; autograd against torch's own autograd of the
formula; gamma = 0; the grouped forward with per-layer forms; torch.compile; autocast; the plain form unchanged.
"""

import dataclasses

import numpy as np
import op_cases as cases
import pytest
import torch
from helpers import assert_rel, numpy_matrix, randn
from torch.autograd import gradcheck, gradgradcheck

from sn_ext import backends, ops, reference


@dataclasses.dataclass(frozen=True)
class Form:
    """One scaled form: coeff (None: unbounded), gamma's value (None: no gamma), sigma_grad."""

    id: str
    coeff: float | None
    gamma: float | None
    sigma_grad: bool = True

    def gamma_tensor(self, device, dtype=torch.float32) -> torch.Tensor | None:
        return None if self.gamma is None else torch.tensor(self.gamma, dtype=dtype, device=device)


# The random weights of the grids have sigma between 1.5 and 6: coeff 0.4 bounds them, 50 leaves them as they are.
FORMS = [
    Form("bounded", 0.4, None),
    Form("bounded_not_reached", 50.0, None),
    Form("bounded_stop_grad", 0.4, None, sigma_grad=False),
    Form("reparam", None, 0.7),
    Form("reparam_gamma_0", None, 0.0),
    Form("reparam_bounded_stop_grad", 0.4, 1.6, sigma_grad=False),
    Form("plain_stop_grad", None, None, sigma_grad=False),
]
FORM_IDS = [f.id for f in FORMS]
SOME_FORMS = [FORMS[0], FORMS[3], FORMS[5]]  # for the slow grids (the interpreter)


def numpy_scaled(weight, sigma: float, form: Form, gamma, grad=None, u=None, v=None, dim=0):
    """The formula in float64 numpy on the matrix views, with `gamma` (the tensor the op got, or None): W_hat, and with
    grad: (grad_W, grad_gamma)."""
    w = numpy_matrix(weight, dim)
    c = 1.0 if form.coeff is None else form.coeff
    divisor = sigma if form.coeff is None else max(sigma, form.coeff)
    g = c * (1.0 if gamma is None else gamma.item())
    if grad is None:
        return w * (g / divisor)
    gm = numpy_matrix(grad, dim)
    mu = np.sum(gm * w) / divisor
    k = form.sigma_grad and (form.coeff is None or sigma > form.coeff)
    outer = np.outer(u.double().cpu().numpy(), v.double().cpu().numpy())
    return (gm - (mu if k else 0.0) * outer) * (g / divisor), mu * c


# ---------------------------------------------------------------------------------------------------------------
# Forward values


def _forward_params():
    # (case, dtype, n, v_first, form, Triton path): every form on the CPU grid and on CUDA, some on Triton's paths.
    params = [
        cases.param(
            b, cases.cpu_case(layout, seed=n), dt, n, vf, form, None, id=f"{cases.dtype_id(dt)}-{layout}-{n}-{form.id}"
        )
        for b in ("cpu", "reference")
        for dt in cases.DTYPES
        for layout in ("contiguous", "transposed", "channels_last", "permuted", "row")
        for n, vf in ((1, False), (0, False), (2, True))
        for form in FORMS
    ]
    params += [
        cases.param("cuda", c, dt, 1, False, form, None, id=f"{c.id}-{cases.dtype_id(dt)}-{form.id}")
        for c in cases.CUDA_SMALL[3:7] + cases.CUDA_SPLIT[2:]
        for dt in cases.DTYPES
        for form in FORMS
    ]
    params += [
        cases.param("triton", c, dt, 2, False, form, path, id=f"{c.id}-{path}-{cases.dtype_id(dt)}-{form.id}")
        for c in cases.TRITON_CASES[:3]
        for path, dt in cases.TRITON_GRID
        for form in SOME_FORMS
    ]
    return params


@pytest.mark.parametrize("backend,case,dtype,n,v_first,form,path", _forward_params())
def test_forward_matches_reference(backend, case, dtype, n, v_first, form, path, monkeypatch):
    cases.use_triton_path(monkeypatch, path)
    _, make, dim = case
    device = cases.DEVICE[backend]
    weight = make(dtype, device)
    u, v = cases.vectors(weight, dim, seed=20 + n)
    gamma = form.gamma_tensor(device)
    weight_hat, sigma, u_new, v_new = cases.forward(backend)(
        weight, u, v, dim, n, cases.EPS, v_first, form.coeff, gamma, form.sigma_grad
    )
    assert weight_hat.dtype == dtype and weight_hat.stride() == torch.empty_like(weight).stride()
    tol = cases.BACKEND_TOL[backend][dtype]
    ref = reference.spectral_normalize(
        weight.double(),
        u.double(),
        v.double(),
        dim,
        n,
        cases.EPS,
        v_first,
        form.coeff,
        None if gamma is None else gamma.double(),
    )
    assert_rel(sigma, ref[1], tol, "sigma")
    assert_rel(u_new, ref[2], tol, "u")
    assert_rel(v_new, ref[3], tol, "v")
    assert_rel(weight_hat, ref[0], tol, "W_hat vs float64 reference")
    expected = numpy_scaled(weight, ref[1].item(), form, gamma, dim=dim % weight.dim())
    scale = max(np.abs(expected).max(), 1e-30)  # gamma = 0: W_hat must be exactly 0
    err = np.abs(numpy_matrix(weight_hat, dim % weight.dim()) - expected).max() / scale
    assert err <= tol, f"W_hat vs the formula in numpy: {err:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# Backward values


def _backward_params():
    # (case, dtype, form, Triton path), as _forward_params.
    params = [
        cases.param(b, cases.cpu_case(layout, seed=8), dt, form, None, id=f"{cases.dtype_id(dt)}-{layout}-{form.id}")
        for b in ("cpu", "reference")
        for dt in cases.DTYPES
        for layout in ("contiguous", "transposed", "channels_last", "slice", "permuted", "conv_dim_neg", "vector")
        for form in FORMS
    ]
    params += [
        cases.param("cuda", c, dt, form, None, id=f"{c.id}-{cases.dtype_id(dt)}-{form.id}")
        for c in cases.CUDA_SMALL[3:7] + cases.CUDA_SPLIT[2:]
        for dt in cases.DTYPES
        for form in FORMS
    ]
    params += [
        cases.param("triton", c, dt, form, path, id=f"{c.id}-{path}-{cases.dtype_id(dt)}-{form.id}")
        for c in cases.TRITON_CASES[:4]
        for path, dt in cases.TRITON_GRID
        for form in SOME_FORMS
    ]
    return params


@pytest.mark.parametrize("backend,case,dtype,form,path", _backward_params())
def test_backward_matches_reference(backend, case, dtype, form, path, monkeypatch):
    cases.use_triton_path(monkeypatch, path)
    _, make, dim = case
    device = cases.DEVICE[backend]
    weight = make(dtype, device)
    u, v = cases.vectors(weight, dim, seed=30)
    _, sigma, u_new, v_new = reference.spectral_normalize(weight, u, v, dim, 1, cases.EPS)
    grad = randn(*weight.shape, dtype=dtype, seed=31, device=device)
    gamma = form.gamma_tensor(device)
    grad_weight, grad_gamma = backends.get(backend).scaled_backward(
        grad, weight, u_new, v_new, sigma, dim, form.coeff, gamma, form.sigma_grad
    )
    assert grad_weight.dtype == dtype and grad_weight.stride() == torch.empty_like(weight).stride()
    assert grad_gamma.dtype == (cases.sigma_dtype(dtype) if gamma is None else gamma.dtype) and grad_gamma.shape == ()
    tol = cases.BACKEND_TOL[backend][dtype]
    ref_weight, ref_gamma = reference.spectral_normalize_scaled_backward(
        grad.double(),
        weight.double(),
        u_new.double(),
        v_new.double(),
        sigma.double(),
        dim,
        form.coeff,
        None if gamma is None else gamma.double(),
        form.sigma_grad,
    )
    assert_rel(grad_weight, ref_weight, tol, "grad_W vs float64 reference")
    tol_gamma = tol if gamma is None else max(tol, cases.BACKEND_TOL[backend][gamma.dtype])  # in gamma's dtype
    assert_rel(grad_gamma, ref_gamma, tol_gamma, "grad_gamma vs float64 reference")
    d = dim % weight.dim()
    expected_weight, expected_gamma = numpy_scaled(weight, sigma.item(), form, gamma, grad, u_new, v_new, d)
    scale = max(np.abs(expected_weight).max(), 1e-30)
    assert np.abs(numpy_matrix(grad_weight, d) - expected_weight).max() / scale <= tol, "grad_W vs numpy"
    assert abs(grad_gamma.item() - expected_gamma) <= tol_gamma * abs(expected_gamma), "grad_gamma vs numpy"


def test_gamma_zero_keeps_its_gradient():
    """At gamma = 0, W_hat = 0, but dL/dgamma = <G, W> / sigma: from W, not from W_hat (which would give 0 / 0)."""
    weight = randn(6, 5, dtype=torch.float64, seed=3)
    u, v = cases.vectors(weight, 0, seed=4)
    gamma = torch.zeros((), dtype=torch.float64, requires_grad=True)
    w = weight.clone().requires_grad_()
    weight_hat, sigma, _, _ = ops.spectral_normalize_(w, u, v, 0, 1, cases.EPS, False, None, gamma)
    assert torch.count_nonzero(weight_hat) == 0
    grad = randn(6, 5, dtype=torch.float64, seed=5)
    (weight_hat * grad).sum().backward()
    assert torch.isfinite(gamma.grad) and gamma.grad != 0
    assert_rel(gamma.grad, (grad * weight).sum() / sigma.detach(), 1e-14, "grad_gamma at gamma = 0")
    assert torch.count_nonzero(w.grad) == 0  # s = 0: no gradient for W


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck, gradcheck, autograd against torch's


def _opcheck_params():
    triton_case = cases.WeightCase("4x3x2x3_dim1", cases.plain(4, 3, 2, 3, seed=43), 1)
    return [
        cases.param(b, cases.cpu_case(layout, seed=0), dt, form, id=f"{cases.dtype_id(dt)}-{layout}-{form.id}")
        for b in ("cpu", "reference")
        for dt, layout in ((torch.float32, "contiguous"), (torch.float64, "permuted"), (torch.bfloat16, "slice"))
        for form in FORMS
    ] + [cases.param("triton", triton_case, torch.float32, form, id=form.id) for form in SOME_FORMS]


@pytest.mark.parametrize("backend,case,dtype,form", _opcheck_params())
def test_opcheck(backend, case, dtype, form):
    interpreted = backend == "triton" and cases.TRITON_INTERPRETED
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")} if interpreted else {}
    _, make, dim = case
    device = cases.DEVICE[backend]
    weight = make(dtype, device).requires_grad_()
    u, v = cases.vectors(weight, dim, seed=10)
    gamma = form.gamma_tensor(device)
    gamma = None if gamma is None else gamma.requires_grad_()
    torch.library.opcheck(
        cases.forward_op(backend),
        (weight, u, v, dim, 1, cases.EPS, False, form.coeff, gamma, form.sigma_grad),
        **kwargs,
    )
    grad = randn(*weight.shape, dtype=dtype, seed=11, device=device).requires_grad_()
    sigma = torch.tensor(1.3, dtype=cases.sigma_dtype(dtype), device=device, requires_grad=True)
    torch.library.opcheck(
        backends.get(backend).scaled_backward,
        (grad, weight, u, v, sigma, dim, form.coeff, gamma, form.sigma_grad),
        **kwargs,
    )


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("backend", [cases.param(b, id="5x4x3-dim1") for b in ("cpu", "reference")])
def test_gradcheck(backend, form):
    """W, gamma -> W_hat through the forward op (n = 0: u, v fixed), first and second derivatives, in float64 (where
    the gradient flows through sigma); and the scaled backward op itself in all its differentiable inputs."""
    weight = randn(5, 4, 3, dtype=torch.float64, seed=6).requires_grad_()
    u, v = cases.vectors(weight, 1, seed=7)
    gamma = torch.tensor(0.8 if form.gamma is None else form.gamma, dtype=torch.float64, requires_grad=True)
    op = cases.forward_op(backend)

    def f(w, gm):
        out, sigma, _, _ = op(
            w,
            u.clone(),
            v.clone(),
            1,
            0,
            cases.EPS,
            False,
            form.coeff,
            gm if form.gamma is not None else None,
            form.sigma_grad,
        )
        return out, sigma

    if form.sigma_grad:  # a stopped gradient differs from finite differences by design (test_autograd_matches_torch)
        assert gradcheck(f, (weight, gamma))
        assert gradgradcheck(f, (weight, gamma))
    grad = randn(5, 4, 3, dtype=torch.float64, seed=8).requires_grad_()
    sigma = torch.tensor(2.1, dtype=torch.float64, requires_grad=True)
    backward = backends.get(backend).scaled_backward
    with_gamma = form.gamma is not None

    def b(g, w, sig, gm):
        return backward(g, w, u, v, sig, 1, form.coeff, gm if with_gamma else None, form.sigma_grad)

    assert gradcheck(b, (grad, weight, sigma, gamma))


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("backend", [cases.param(b, id="conv") for b in ("cpu", "reference", "triton")])
def test_autograd_matches_torch(backend, form):
    """The op's gradients (W and gamma, through W_hat and sigma) are torch's autograd of the formula written with
    torch ops from the same u, v: W g / max(sigma, f), sigma = u^T W v (detached for sigma_grad=False)."""
    device = cases.DEVICE[backend]
    weight = randn(6, 3, 2, 2, dtype=torch.float64, seed=12, device=device)
    u, v = cases.vectors(weight, 0, seed=13)
    grads = []
    for ours in (True, False):
        w = weight.clone().requires_grad_()
        gamma = torch.tensor(0.6 if form.gamma is None else form.gamma, dtype=torch.float64, device=device)
        gamma.requires_grad_()
        if ours:
            out, sigma, _, _ = cases.forward(backend)(
                w, u, v, 0, 0, cases.EPS, False, form.coeff, gamma if form.gamma is not None else None, form.sigma_grad
            )
        else:
            sigma = torch.dot(u, w.flatten(1) @ v)
            used = sigma if form.sigma_grad else sigma.detach()
            divisor = used if form.coeff is None else torch.clamp_min(used, form.coeff)
            numerator = (1.0 if form.coeff is None else form.coeff) * (gamma if form.gamma is not None else 1.0)
            out = w * numerator / divisor
        loss = (out * randn(*weight.shape, dtype=torch.float64, seed=14, device=device)).sum() + 0.3 * sigma
        grads.append(torch.autograd.grad(loss, [w, gamma] if form.gamma is not None else [w]))
    for ours, theirs in zip(*grads):
        assert_rel(ours, theirs, 1e-13, "gradient vs torch's autograd")


def test_plain_form_unchanged():
    """The defaults are today's op: the same bits as a call without the new arguments, and sigma_grad=False (a
    scaled backward) gives the same forward."""
    weight = randn(7, 5, seed=15)
    u, v = cases.vectors(weight, 0, seed=16)
    first = ops.spectral_normalize_(weight, u.clone(), v.clone(), 0, 2, cases.EPS)
    for extra in ((False, None, None, True), (False, None, None, False)):
        again = torch.ops.sn_ext.spectral_normalize_.default(weight, u.clone(), v.clone(), 0, 2, cases.EPS, *extra)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Grouped, compile, autocast


@pytest.mark.parametrize("device", ["cpu", cases.param("cuda", id="grouped")])
def test_grouped_matches_per_layer(device):
    """Per-layer coeffs, gammas and sigma_grad in one grouped call (the compiled grouped op, or with
    SN_EXT_DISABLE_EXT=1 the fallback's; on CUDA one launch of the forward kernel): the per-layer op's outputs,
    buffers and gradients (W and gamma), orders mixed."""
    weights, us, vs, dims = cases.grouped_layers(torch.float64, device, seed=5)
    coeffs = [0.4, 50.0, 0.3, 2.0]
    gammas = [torch.tensor(g, dtype=torch.float64, device=device, requires_grad=True) for g in (0.7, 1.3, 0.0, 2.0)]
    sigma_grad = [True, True, False, True]
    v_first = [False, True, False, True]
    results = []
    for grouped in (True, False):
        ws = [w.clone().requires_grad_() for w in weights]
        bufs = [(u.clone(), v.clone()) for u, v in zip(us, vs)]
        for g in gammas:
            g.grad = None
        if grouped:
            outs, sigmas, _, _ = ops.spectral_normalize_grouped_(
                ws, [b[0] for b in bufs], [b[1] for b in bufs], dims, 2, cases.EPS, v_first, coeffs, gammas, sigma_grad
            )
        else:
            per_layer = [
                ops.spectral_normalize_(w, b[0], b[1], d, 2, cases.EPS, vf, c, g, sg)
                for w, b, d, vf, c, g, sg in zip(ws, bufs, dims, v_first, coeffs, gammas, sigma_grad)
            ]
            outs, sigmas = [p[0] for p in per_layer], torch.stack([p[1] for p in per_layer])
        loss = sum((o * randn(*o.shape, dtype=torch.float64, seed=40 + i).to(device)).sum() for i, o in enumerate(outs))
        (loss + sigmas.sum()).backward()
        results.append((outs, sigmas, bufs, [w.grad for w in ws], [g.grad for g in gammas]))
    (o1, s1, b1, gw1, gg1), (o2, s2, b2, gw2, gg2) = results
    assert_rel(s1, s2, 1e-14, "sigmas")
    for a, b in zip(o1, o2):
        assert_rel(a, b, 1e-14, "W_hat")
    for (u1, v1), (u2, v2) in zip(b1, b2):
        assert torch.equal(u1, u2) and torch.equal(v1, v2)
    for a, b in zip(gw1 + gg1, gw2 + gg2):
        assert_rel(a, b, 1e-14, "gradient")


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) of a step through the scaled forward op and its backward (aot_eager: the fake
    kernels and autograd formulas): the eager numbers, no graph break."""

    def step(w, u, v, gamma):
        out, sigma, _, _ = ops.spectral_normalize_(w, u, v, 0, 1, cases.EPS, False, 0.5, gamma, True)
        return (out.sin() * 3).sum() + sigma

    weight = randn(6, 5, seed=17)
    u, v = cases.vectors(weight, 0, seed=18)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        w = weight.clone().requires_grad_()
        gamma = torch.tensor(1.2, requires_grad=True)
        uu, vv = u.clone(), v.clone()
        fn(w, uu, vv, gamma).backward()
        results.append((w.grad, gamma.grad, uu, vv))
    for a, b in zip(*results):
        assert_rel(a, b, 1e-6, "compiled vs eager")


@pytest.mark.parametrize("backend", [cases.param(b, id="bf16") for b in ("cpu", "reference")])
def test_autocast_keeps_the_weight_dtype(backend):
    weight = randn(6, 5, seed=19)
    u, v = cases.vectors(weight, 0, seed=20)
    gamma = torch.tensor(0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, sigma, _, _ = cases.forward(backend)(weight, u, v, 0, 1, cases.EPS, False, 0.5, gamma, True)
        grad_weight, grad_gamma = backends.get(backend).scaled_backward(
            torch.ones_like(weight), weight, u, v, sigma, 0, 0.5, gamma, True
        )
    assert out.dtype == torch.float32 and sigma.dtype == torch.float32
    assert grad_weight.dtype == torch.float32 and grad_gamma.dtype == torch.float32
    ref = reference.spectral_normalize(weight.double(), u.double(), v.double(), 0, 1, cases.EPS, False, 0.5, gamma)
    assert_rel(out, ref[0], 1e-6, "autocast off inside the op")


def test_degenerate_weight_keeps_the_vectors():
    """A NaN weight gives a NaN W_hat, a zero weight sigma 0 (W_hat = 0 with a coeff: W / max(1, 0)); u and v stay."""
    for weight, coeff, finite in ((torch.full((4, 3), float("nan")), 0.5, False), (torch.zeros(4, 3), 0.5, True)):
        u, v = cases.vectors(torch.ones(4, 3), 0, seed=21)
        u0, v0 = u.clone(), v.clone()
        out, _, _, _ = ops.spectral_normalize_(weight, u, v, 0, 1, cases.EPS, False, coeff)
        assert torch.equal(u, u0) and torch.equal(v, v0)
        assert bool(torch.isfinite(out).all()) == finite
