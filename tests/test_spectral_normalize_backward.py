"""sn_ext::spectral_normalize_backward (grad_W = (G - <G, W_sn> u v^T) / sigma) on every backend (tests/op_cases.py,
imported as `cases`; ids start with the backend, and a backend that cannot run here skips, saying why): values against
the float64 reference and, on the CPU grid, an independent float64 numpy computation; output layouts; opcheck;
gradcheck of the op itself; determinism; and the gradients of the module built on it: gradcheck / gradgradcheck
through the parametrization, a gradient penalty (double backward) against torch's, two forwards before one backward.
"""

import numpy as np
import op_cases as cases
import pytest
import torch
from helpers import assert_rel, make_net_pair, numpy_matrix, randn, rel_err, tol_for, unit
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import sn_ext
from sn_ext import _library, reference


def _params():
    # cpu, reference: a random W_sn and sigma = 2.3, every layout (not N x 1, 1 x N).
    params = [
        cases.param(b, cases.cpu_case(layout, seed=8), dt, "given", None, id=f"{cases.dtype_id(dt)}-{layout}")
        for b in ("cpu", "reference")
        for dt in cases.DTYPES
        for layout in ("contiguous", "transposed", "channels_last", "slice", "permuted", "conv_dim_neg", "vector")
    ]
    # cuda: W_sn, sigma, u, v from the CUDA forward; the gradient in the weight's layout or transposed.
    params += [
        cases.param("cuda", c, dt, layout, None, id=f"{c.id}-{cases.dtype_id(dt)}-{layout}")
        for c in cases.CUDA_SMALL + cases.CUDA_SPLIT
        for dt in cases.DTYPES
        for layout in ("same", "transposed")
    ]
    params += [
        cases.param("cuda", c, dt, "same", None, id=f"{c.id}-{cases.dtype_id(dt)}-same")
        for c in cases.CUDA_LARGE
        for dt in cases.DTYPES
    ]
    # triton: W_sn, sigma, u, v from the reference forward, on every launch path; real sizes on a GPU.
    params += [
        cases.param("triton", c, dt, "same", path, id=f"{c.id}-{path}-{cases.dtype_id(dt)}")
        for c in cases.TRITON_CASES
        for path, dt in cases.TRITON_GRID
    ]
    params += [
        cases.param("triton", c, dt, "same", None, id=f"{c.id}-default_plan-{cases.dtype_id(dt)}", gpu_only=True)
        for c in cases.TRITON_BIG
        for dt in cases.TRITON_BIG_DTYPES
    ]
    return params


def _inputs(backend, case, dtype, grad_layout, grad_seed=None):
    """(grad, W_sn, u, v, sigma) for a backend's grid."""
    _, make, dim = case
    device = cases.DEVICE[backend]
    if grad_layout == "given":
        weight_sn = make(dtype, device)
        grad = randn(*weight_sn.shape, dtype=dtype, seed=9, device=device)
        u, v = cases.vectors(weight_sn, dim, seed=90)
        return grad, weight_sn, u, v, torch.tensor(2.3, dtype=cases.sigma_dtype(dtype), device=device)
    weight = make(dtype, device)
    u, v = cases.vectors(weight, dim, seed=10 if backend == "cuda" else 20)
    forward = cases.forward(backend) if backend == "cuda" else reference.spectral_normalize
    weight_sn, sigma, u_new, v_new = forward(weight, u, v, dim, 1, cases.EPS)
    grad = randn(*weight.shape, dtype=dtype, seed=grad_seed, device=device)
    if grad_layout == "transposed" and grad.dim() >= 2:
        order = reversed(range(weight.dim()))
        grad = randn(*reversed(weight.shape), dtype=dtype, seed=grad_seed, device=device).permute(*order)
    return grad, weight_sn, u_new, v_new, sigma


@pytest.mark.parametrize("backend,case,dtype,grad_layout,path", _params())
def test_matches_reference(backend, case, dtype, grad_layout, path, monkeypatch):
    cases.use_triton_path(monkeypatch, path)
    dim = case.dim
    grad_seed = 31 if case in cases.TRITON_BIG else 30
    grad, weight_sn, u, v, sigma = _inputs(backend, case, dtype, grad_layout, grad_seed)
    out = cases.backward_op(backend)(grad, weight_sn, u, v, sigma, dim)
    assert out.dtype == dtype and out.shape == weight_sn.shape and out.device == weight_sn.device
    assert out.stride() == torch.empty_like(weight_sn).stride()
    tol = cases.BACKEND_TOL[backend][dtype]
    ref = cases.reference_backward_f64(grad, weight_sn, u, v, sigma, dim)
    assert_rel(out, ref, tol, f"{case.id} {dtype} {grad_layout} grad_W vs float64 reference")
    if backend in ("cpu", "reference"):
        # The CPU grid also holds it to an independent float64 numpy computation and to the reference in the same
        # dtype.
        expected_mat = cases.numpy_backward(grad, weight_sn, u, v, sigma.item(), dim)
        err = np.abs(numpy_matrix(out, dim) - expected_mat).max() / np.abs(expected_mat).max()
        assert err <= tol, f"backward vs float64: {err:.3e}"
        assert_rel(
            out, reference.spectral_normalize_backward(grad, weight_sn, u, v, sigma, dim), tol, "backward vs reference"
        )


def _opcheck_params():
    triton_case = cases.WeightCase("4x3x2x3_dim1", cases.plain(4, 3, 2, 3, seed=43), 1)
    return (
        [
            cases.param(b, cases.cpu_case(layout, seed=0), dt, 10, 5, id=f"{cases.dtype_id(dt)}-{layout}")
            for b in ("cpu", "reference")
            for dt, layout in cases.CPU_OPCHECK
        ]
        + [cases.param("cuda", c, dt, 10, 60, id=f"{c.id}-{cases.dtype_id(dt)}") for c, dt in cases.CUDA_OPCHECK]
        + [
            cases.param("triton", triton_case, dt, 20, 44, id=cases.dtype_id(dt))
            for dt in ([torch.float32, torch.float64] if not cases.CUDA else cases.DTYPES)
        ]
    )


@pytest.mark.parametrize("backend,case,dtype,vector_seed,grad_seed", _opcheck_params())
def test_opcheck(backend, case, dtype, vector_seed, grad_seed):
    # The interpreter runs kernels eagerly on whatever it is given, so the fake-tensor (AOT dispatch) checks need a
    # GPU; schema, fake kernel and autograd registration are checked everywhere.
    interpreted = backend == "triton" and cases.TRITON_INTERPRETED
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")} if interpreted else {}
    _, make, dim = case
    device = cases.DEVICE[backend]
    weight = make(dtype, device)
    u, v = cases.vectors(weight, dim, vector_seed)
    grad = randn(*weight.shape, dtype=dtype, seed=grad_seed, device=device).requires_grad_()
    if backend == "cuda":  # the inputs a training step gives it: the forward's outputs
        with torch.no_grad():
            weight_sn, sigma, u, v = cases.forward(backend)(weight, u, v, dim, 1, cases.EPS)
    else:  # a random W_sn, and a sigma that needs a gradient
        weight_sn = weight.detach()
        sigma = torch.tensor(1.3, dtype=cases.sigma_dtype(dtype), device=device, requires_grad=True)
    torch.library.opcheck(cases.backward_op(backend), (grad, weight_sn.requires_grad_(), u, v, sigma, dim), **kwargs)


@pytest.mark.parametrize("backend", [cases.param(b, id="4x3x2-dim1") for b in ("cpu", "reference")])
def test_gradcheck(backend):
    # The backward op is differentiable itself (double backward); check it directly in all its inputs.
    shape, dim = (4, 3, 2), 1
    grad = randn(*shape, dtype=torch.float64, seed=6).requires_grad_()
    weight_sn = randn(*shape, dtype=torch.float64, seed=7).requires_grad_()
    sigma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    u, v = unit(3, torch.float64, seed=8), unit(8, torch.float64, seed=9)
    op = cases.backward_op(backend)

    def f(g, s, sig):
        return op(g, s, u, v, sig, dim)

    assert gradcheck(f, (grad, weight_sn, sigma))


@pytest.mark.parametrize(
    "backend,case", [cases.param("cuda", c, id=c.id) for c in cases.CUDA_SPLIT + [cases.CUDA_LARGE[0]]]
)
def test_deterministic(backend, case):
    _, make, dim = case
    device = cases.DEVICE[backend]
    weight = make(torch.float32, device)
    u, v = cases.vectors(weight, dim, seed=10)
    grad = randn(*weight.shape, seed=52, device=device)
    w_sn, sigma, u_new, v_new = cases.forward(backend)(weight, u, v, dim, 2, cases.EPS)
    g1 = cases.backward_op(backend)(grad, w_sn, u_new, v_new, sigma, dim)
    g2 = cases.backward_op(backend)(grad, w_sn, u_new, v_new, sigma, dim)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize(
    "backend,dtype,case",
    [cases.param("cuda", dt, c, id=f"{c.id}-{cases.dtype_id(dt)}") for c in cases.CUDA_SOME for dt in cases.DTYPES],
)
def test_matches_cpu_kernels(backend, dtype, case):
    """The CUDA kernels agree with the CPU kernels to rounding, on the CPU forward's outputs."""
    if not _library.has_compiled_kernel("CPU"):
        pytest.skip("no compiled CPU kernel")
    _, make, dim = case
    device = cases.DEVICE[backend]
    weight = make(dtype, device)
    u, v = cases.vectors(weight, dim, seed=10)
    grad = randn(*weight.shape, dtype=dtype, seed=31, device=device)
    w_sn, sigma, u_new, v_new = cases.forward("cpu")(weight.cpu(), u.cpu(), v.cpu(), dim, 2, cases.EPS)
    g_cuda = cases.backward_op(backend)(grad, *(t.to(device) for t in (w_sn, u_new, v_new, sigma)), dim)
    g_cpu = cases.backward_op("cpu")(grad.cpu(), w_sn, u_new, v_new, sigma, dim)
    assert_rel(g_cuda, g_cpu, cases.GPU_TOL[dtype], f"{case.id} {dtype} grad_W")


# ---------------------------------------------------------------------------------------------------------------
# Through the module: gradcheck, double backward, and against torch's gradients

# (weight shape, dim): 2-D, conv 4-D, and dim=1 cases (a ConvTranspose layout), odd sizes.
PARAMETRIZATION_SHAPES = [
    ((5, 7), 0),
    ((3, 1), 0),
    ((4, 3, 2, 3), 0),
    ((3, 5, 2, 2), 1),
    ((6, 5), 1),
    ((2, 3, 5), -1),
    ((7,), 0),
]


@pytest.mark.parametrize(
    "backend,shape,dim",
    [cases.param("cpu", s, d, id="x".join(map(str, s)) + f"-dim{d}") for s, d in PARAMETRIZATION_SHAPES],
)
def test_gradcheck_parametrization_eval(backend, shape, dim):
    """float64 gradcheck / gradgradcheck of W -> W_sn through sn_ext.SpectralNorm in eval mode (u, v fixed)."""
    weight = randn(*shape, dtype=torch.float64, seed=1, device=cases.DEVICE[backend])
    sn = sn_ext.SpectralNorm(weight, n_power_iterations=1, dim=dim).eval()
    buffers = [b.clone() for b in sn.buffers()]
    w = randn(*shape, dtype=torch.float64, seed=2).requires_grad_()  # not the weight the buffers converged on
    assert gradcheck(sn, (w,))
    assert gradgradcheck(sn, (w,))
    for b, b0 in zip(sn.buffers(), buffers):
        assert torch.equal(b, b0)


@pytest.mark.parametrize(
    "backend,make,x_shape",
    [
        cases.param("cuda", lambda: nn.Linear(5, 4), (2, 5), id="linear"),
        cases.param("cuda", lambda: nn.Conv2d(2, 3, 2), (2, 2, 3, 3), id="conv2d"),
        cases.param("cuda", lambda: nn.ConvTranspose2d(3, 2, 2), (2, 3, 3, 3), id="conv_transpose2d"),
    ],
)
def test_gradcheck_module_weight(backend, make, x_shape):
    # Eval mode: u, v are fixed, so the module is a function of its weight and finite differences apply.
    device = cases.DEVICE[backend]
    torch.manual_seed(71)
    module = sn_ext.spectral_norm(make().double().to(device)).eval()
    original = module.parametrizations.weight.original.detach().clone().requires_grad_()
    x = randn(*x_shape, dtype=torch.float64, seed=72, device=device)

    def f(w):
        return torch.func.functional_call(module, {"parametrizations.weight.original": w}, (x,))

    with cases.no_tf32():
        assert gradcheck(f, (original,))
        assert gradgradcheck(f, (original,))


def _discriminator():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 1),
    )


@pytest.mark.parametrize(
    "backend,dtype,train",
    [
        cases.param("cpu", dt, train, id=f"{cases.dtype_id(dt)}-{'train' if train else 'eval'}")
        for dt in (torch.float32, torch.float64)
        for train in (True, False)
    ],
)
def test_gradient_penalty_matches_torch(backend, dtype, train):
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


@pytest.mark.parametrize(
    "backend,dtype", [cases.param("cuda", dt, id=cases.dtype_id(dt)) for dt in (torch.float32, torch.float64)]
)
def test_two_forwards_then_one_backward_matches_torch(backend, dtype):
    device = cases.DEVICE[backend]
    with cases.no_tf32():
        theirs, ours = cases.cuda_twins(lambda: nn.Conv2d(4, 8, 3), dtype, seed=90)
        x1 = randn(2, 4, 6, 6, dtype=dtype, seed=91, device=device)
        x2 = randn(2, 4, 6, 6, dtype=dtype, seed=92, device=device)
        for m in (theirs, ours):
            loss = m(x1).square().sum() + m(x2).sin().sum()  # two power iterations before one backward
            loss.backward()
    for name in ("_u", "_v"):
        assert_rel(
            getattr(ours.parametrizations.weight[0], name),
            getattr(theirs.parametrizations.weight[0], name),
            cases.TORCH_CUDA_TOL[dtype],
            name,
        )
    assert_rel(
        ours.parametrizations.weight.original.grad,
        theirs.parametrizations.weight.original.grad,
        cases.TORCH_CUDA_TOL[dtype],
        "grad",
    )
    assert_rel(ours.bias.grad, theirs.bias.grad, cases.TORCH_CUDA_TOL[dtype], "bias grad")


@pytest.mark.parametrize("backend", [cases.param(b, id="5x4x3-dim1") for b in ("cpu", "triton")])
def test_autograd_matches_reference_backend(backend):
    # W -> (W_sn, sigma) through the shared autograd formulas, calling the backend's backward; double backward too.
    weight = randn(5, 4, 3, dtype=torch.float64, seed=45, device=cases.DEVICE[backend])
    u, v = cases.vectors(weight, 1, seed=20)
    grads = []
    for op in (cases.forward(backend), cases.forward("reference")):
        w = weight.clone().requires_grad_()
        weight_sn, sigma, _, _ = op(w, u, v, 1, 0, cases.EPS, False)
        (g,) = torch.autograd.grad((weight_sn * weight_sn.detach().cos()).sum() + sigma, w, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), w)
        grads.append((g.detach(), gg))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12
