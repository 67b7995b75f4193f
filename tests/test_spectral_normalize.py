"""sn_ext::spectral_normalize_ (W -> W / sigma, after n rounds of power iteration) on every backend (tests/op_cases.py:
"cpu", "cuda", "triton", "reference"; ids start with the backend, and a backend that cannot run here skips, saying
why): values against the float64 reference and, on the CPU grid, an independent float64 numpy computation; output
layouts; degenerate rounds; opcheck; gradcheck of W -> (W_sn, sigma); determinism; and the module built on it
against torch's and the reference backend. Its backward is tested in test_spectral_normalize_backward.py,
power_iteration_ in test_power_iteration.py, the grouped ops in test_spectral_normalize_grouped.py.

Each backend keeps its own grid: the CPU kernels every layout at tiny sizes (tolerance helpers.TOL); the CUDA kernels
odd, split-reduction and large sizes (op_cases.GPU_TOL); Triton every launch path (a smaller grid in the interpreter)
and, on a GPU, real layer sizes.
"""

import copy

import pytest
import torch
from helpers import assert_rel, numpy_matrix, randn, rel_err, unit
from op_cases import (
    BACKEND_TOL,
    CPU_OPCHECK,
    CUDA,
    CUDA_LARGE,
    CUDA_OPCHECK,
    CUDA_SMALL,
    CUDA_SOME,
    CUDA_SPLIT,
    DEVICE,
    DTYPES,
    EPS,
    GPU_TOL,
    REDUCED_GRID,
    TORCH_CUDA_TOL,
    TRITON_BIG,
    TRITON_BIG_DTYPES,
    TRITON_CASES,
    TRITON_GRID,
    TRITON_INTERPRETED,
    TRITON_PATHS,
    VF,
    WeightCase,
    cpu_case,
    cpu_round_grid,
    cuda_twins,
    dtype_id,
    forward,
    forward_op,
    no_tf32,
    numpy_forward,
    param,
    plain,
    power_iteration_op,
    reference_forward_f64,
    sigma_dtype,
    use_triton_path,
    vectors,
)
from torch import nn

import sn_ext
from sn_ext import _library, reference


def _matches_reference_params():
    # cpu, reference: every layout, tiny sizes (vector seed 20 + n)
    params = [
        param(b, c, 20 + n, dt, n, vf, None, id=i) for b in ("cpu", "reference") for c, dt, n, vf, i in cpu_round_grid()
    ]
    params += [
        param("cuda", c, 10, dt, n, vf, None, id=f"{c.id}-{dtype_id(dt)}-{n}-{VF[vf]}")
        for c in CUDA_SMALL + CUDA_SPLIT
        for dt in DTYPES
        for n in (0, 1, 3)
        for vf in (False, True)
    ]
    params += [
        param("cuda", c, 10, dt, 1, False, None, id=f"{c.id}-{dtype_id(dt)}-1-u_first")
        for c in CUDA_LARGE
        for dt in DTYPES
    ]
    # triton: every launch path; real layer sizes on a GPU only
    rounds = [(0, False), (1, False), (2, True)] + ([] if REDUCED_GRID else [(3, False), (1, True)])
    params += [
        param("triton", c, 20, dt, n, vf, path, id=f"{c.id}-{path}-{dtype_id(dt)}-{n}-{VF[vf]}")
        for c in TRITON_CASES
        for path, dt in TRITON_GRID
        for n, vf in rounds
    ]
    params += [
        param("triton", c, 20, dt, n, vf, None, id=f"{c.id}-default_plan-{dtype_id(dt)}-{n}-{VF[vf]}", gpu_only=True)
        for c in TRITON_BIG
        for dt in TRITON_BIG_DTYPES
        for n, vf in [(1, False), (1, True), (0, False)]
    ]
    return params


@pytest.mark.parametrize("backend,case,vector_seed,dtype,n,v_first,path", _matches_reference_params())
def test_matches_reference(backend, case, vector_seed, dtype, n, v_first, path, monkeypatch):
    use_triton_path(monkeypatch, path)
    _, make, dim = case
    weight = make(dtype, DEVICE[backend])
    u, v = vectors(weight, dim, vector_seed)
    weight_sn, sigma, u_new, v_new = forward(backend)(weight, u, v, dim, n, EPS, v_first)
    assert weight_sn.dtype == dtype and weight_sn.shape == weight.shape and weight_sn.device == weight.device
    assert weight_sn.stride() == torch.empty_like(weight).stride(), "W_sn must have the fake kernel's layout"
    assert sigma.dtype == sigma_dtype(dtype) and sigma.shape == ()
    assert u_new.dtype == v_new.dtype == dtype and u_new.is_contiguous() and v_new.is_contiguous()
    tol = BACKEND_TOL[backend][dtype]
    what = f"{case.id} {dtype} n={n} v_first={v_first}"
    ref = reference_forward_f64(weight, u, v, dim, n, v_first)
    for name, ours, theirs in zip(("W_sn", "sigma", "u", "v"), (weight_sn, sigma, u_new, v_new), ref):
        assert_rel(ours, theirs, tol, f"{what} {name} vs float64 reference")
    if backend in ("cpu", "reference"):
        # The CPU grid also holds them to an independent float64 numpy computation and to the reference in the same
        # dtype.
        s_o, u_o, v_o, w_o = numpy_forward(weight, u, v, dim, n, v_first)
        assert abs(sigma.item() - s_o) <= tol * s_o, f"sigma {sigma.item()} vs {s_o}"
        assert_rel(u_new, u_o, tol, "u vs float64")
        assert_rel(v_new, v_o, tol, "v vs float64")
        assert_rel(weight_sn, w_o, tol, "W_sn vs float64")
        r_sn, r_sigma, r_u, r_v = reference.spectral_normalize(weight, u, v, dim, n, EPS, v_first)
        assert_rel(weight_sn, r_sn, tol, "W_sn vs reference")
        assert_rel(sigma, r_sigma, tol, "sigma vs reference")
        assert_rel(u_new, r_u, tol, "u vs reference")
        assert_rel(v_new, r_v, tol, "v vs reference")


@pytest.mark.parametrize(
    "backend,dtype", [param(b, dt, id=dtype_id(dt)) for b in ("cpu", "reference") for dt in DTYPES]
)
def test_u_first_and_v_first_differ(backend, dtype):
    # Far from converged (random u, v, one round), the two orders give different vectors: the flag is honoured.
    _, make, dim = cpu_case("contiguous", seed=4)
    weight = make(dtype, "cpu")
    u, v = vectors(weight, dim, seed=40)
    op = forward(backend)
    uf = op(weight, u, v, dim, 1, EPS, False)
    vf = op(weight, u, v, dim, 1, EPS, True)
    tol = BACKEND_TOL[backend][dtype]
    assert tol < (uf[2].double() - vf[2].double()).abs().max()
    assert tol < (uf[3].double() - vf[3].double()).abs().max()
    # v-first: the final v is N(W^T u_old) and the final u is N(W v); u-first: u = N(W v_old), v = N(W^T u).
    mat = torch.from_numpy(numpy_matrix(weight, dim))
    v_expected = torch.nn.functional.normalize(mat.T @ u.double(), dim=0)
    assert_rel(vf[3], v_expected, tol, "v-first v")
    u_expected = torch.nn.functional.normalize(mat @ v.double(), dim=0)
    assert_rel(uf[2], u_expected, tol, "u-first u")


@pytest.mark.parametrize(
    "backend,dtype,layout",
    [
        param(b, dt, layout, id=f"{dtype_id(dt)}-{layout}")
        for b in ("cpu", "reference")
        for dt in DTYPES
        for layout in ("contiguous", "transposed", "permuted", "conv_dim_neg", "vector")
    ],
)
def test_zero_iterations_sigma_is_u_w_v(backend, dtype, layout):
    # n=0: no update, sigma = u^T W v for the given (not converged) u, v; power_iteration_ leaves u, v as they are.
    _, make, dim = cpu_case(layout, seed=7)
    weight = make(dtype, "cpu")
    u, v = vectors(weight, dim, seed=70)
    u0, v0 = u.clone(), v.clone()
    expected = float(u.double().numpy() @ numpy_matrix(weight, dim) @ v.double().numpy())
    weight_sn, sigma, u_new, v_new = forward(backend)(weight, u, v, dim, 0, EPS)
    tol = BACKEND_TOL[backend][dtype]
    assert abs(sigma.item() - expected) <= tol * abs(expected)
    assert torch.equal(u_new, u0) and torch.equal(v_new, v0)
    assert u_new.data_ptr() != u.data_ptr(), "u_new must be a fresh tensor"
    assert_rel(weight_sn, weight.double() / expected, tol, "W_sn")
    s = power_iteration_op(backend)(weight, u, v, dim, 0, EPS)
    assert torch.equal(u, u0) and torch.equal(v, v0)
    assert abs(s.item() - expected) <= tol * abs(expected)
    r = reference.spectral_normalize(weight, u, v, dim, 0, EPS)
    assert_rel(sigma, r[1], tol, "sigma vs reference")
    assert_rel(weight_sn, r[0], tol, "W_sn vs reference")


@pytest.mark.parametrize(
    "backend,dtype", [param(b, dt, id=dtype_id(dt)) for b in ("cpu", "cuda", "reference") for dt in DTYPES]
)
def test_zero_vector_round_restores_inputs(backend, dtype):
    # W v = 0 for this v (a null vector of W), though W itself is not zero.
    device = DEVICE[backend]
    weight = torch.zeros(4, 6, dtype=dtype, device=device)
    weight[:, :3] = randn(4, 3, dtype=dtype, seed=40, device=device)
    u = unit(4, dtype, seed=41, device=device)
    v = torch.zeros(6, dtype=dtype, device=device)
    v[4] = 1.0
    _, _, u_new, v_new = forward(backend)(weight, u, v, 0, 2, EPS)
    assert torch.equal(u_new, u) and torch.equal(v_new, v)


def _degenerate_params():
    params = []
    for dtype in DTYPES:  # every entry degenerate (inf: mixed finite and infinite entries)
        for fill in (0.0, float("nan"), float("inf")):
            for n in (0, 1, 2):
                for v_first in (False, True):
                    params.append(
                        param(
                            "cuda", dtype, fill, [(n, v_first)], None, id=f"{dtype_id(dtype)}-{fill}-{n}-{VF[v_first]}"
                        )
                    )
    for path in TRITON_PATHS:  # one degenerate entry, or all zero
        for fill in ("zero", "nan", "inf"):
            params.append(param("triton", torch.float32, fill, [(1, False), (2, True)], path, id=f"{fill}-{path}"))
    return params


@pytest.mark.parametrize("backend,dtype,fill,rounds,path", _degenerate_params())
def test_degenerate_weight_keeps_vectors(backend, dtype, fill, rounds, path, monkeypatch):
    """A round on a zero or non-finite weight returns the input vectors (the CPU kernels and the reference: in
    tests/test_errors.py and tests/test_reliability_nonfinite.py)."""
    use_triton_path(monkeypatch, path)
    device = DEVICE[backend]
    if backend == "cuda":
        weight = torch.full((7, 5), fill, dtype=dtype, device=device)
        if fill == float("inf"):
            weight[0, 0] = 1.0
        u, v = vectors(weight, 0, seed=10)
    else:
        weight = randn(6, 5, dtype=dtype, seed=40, device=device)
        if fill == "zero":
            weight.zero_()
        else:
            weight.view(-1)[7] = float(fill)
        u, v = vectors(weight, 0, seed=20)
    u_in, v_in = u.clone(), v.clone()
    for n, v_first in rounds:
        weight_sn, sigma, u_new, v_new = forward(backend)(weight, u, v, 0, n, EPS, v_first)
        assert torch.equal(u_new, u_in) and torch.equal(v_new, v_in), f"a degenerate round returns the inputs {n}"
        if backend == "cuda":  # the CPU kernels' values, NaNs included; power_iteration_ leaves the buffers
            if _library.has_compiled_kernel("CPU"):
                c_sn, c_sigma, _, _ = forward("cpu")(weight.cpu(), u_in.cpu(), v_in.cpu(), 0, n, EPS, v_first)
                torch.testing.assert_close(sigma.cpu(), c_sigma, equal_nan=True)
                torch.testing.assert_close(weight_sn.cpu(), c_sn, equal_nan=True)
            sigma_p = power_iteration_op(backend)(weight, u, v, 0, n, EPS, v_first)
            assert torch.equal(u, u_in) and torch.equal(v, v_in), "power_iteration_ leaves degenerate buffers unchanged"
            torch.testing.assert_close(sigma_p, sigma, equal_nan=True)
            if fill == 0.0:
                assert sigma.item() == 0.0 and torch.isnan(weight_sn).all()
        else:  # the reference's NaNs
            ref_sn, ref_sigma, ref_u, ref_v = reference.spectral_normalize(weight, u, v, 0, n, EPS, v_first)
            assert torch.equal(ref_u, u) and torch.equal(ref_v, v)
            assert torch.equal(sigma.isnan(), ref_sigma.isnan()) and torch.equal(weight_sn.isnan(), ref_sn.isnan())


_DETERMINISTIC = [param("cuda", c, 10, id=c.id) for c in CUDA_SPLIT + [CUDA_LARGE[0]]] + [
    param("triton", WeightCase("33x20", plain(33, 20, seed=42), 0), 20, id="33x20")
]


@pytest.mark.parametrize("backend,case,vector_seed", _DETERMINISTIC)
def test_deterministic(backend, case, vector_seed):
    _, make, dim = case
    weight = make(torch.float32, DEVICE[backend])
    u, v = vectors(weight, dim, vector_seed)
    op = forward(backend)
    for a, b in zip(op(weight, u, v, dim, 2, EPS, False), op(weight, u, v, dim, 2, EPS, False)):
        assert torch.equal(a, b)


def _opcheck_params():
    params = [
        param(b, cpu_case(layout, seed=0), dt, 10, [(1, layout == "permuted")], id=f"{dtype_id(dt)}-{layout}")
        for b in ("cpu", "reference")
        for dt, layout in CPU_OPCHECK
    ]
    params += [param("cuda", c, dt, 10, [(1, False), (0, True)], id=f"{c.id}-{dtype_id(dt)}") for c, dt in CUDA_OPCHECK]
    triton_case = WeightCase("4x3x2x3_dim1", plain(4, 3, 2, 3, seed=43), 1)
    params += [
        param("triton", triton_case, dt, 20, [(1, False)], id=dtype_id(dt))
        for dt in ([torch.float32, torch.float64] if not CUDA else DTYPES)
    ]
    return params


@pytest.mark.parametrize("backend,case,dtype,vector_seed,rounds", _opcheck_params())
def test_opcheck(backend, case, dtype, vector_seed, rounds):
    # The interpreter runs kernels eagerly on whatever it is given, so the fake-tensor (AOT dispatch) checks need a
    # GPU; schema, fake kernel and autograd registration are checked everywhere.
    interpreted = backend == "triton" and TRITON_INTERPRETED
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")} if interpreted else {}
    _, make, dim = case
    weight = make(dtype, DEVICE[backend]).detach().requires_grad_()
    u, v = vectors(weight, dim, vector_seed)
    for n, v_first in rounds:
        torch.library.opcheck(forward_op(backend), (weight, u, v, dim, n, EPS, v_first), **kwargs)


_GRADCHECK_CPU = [((5, 7), 0), ((3, 1), 0), ((4, 3, 2, 3), 0), ((3, 5, 2, 2), 1), ((6, 5), 1), ((2, 3, 5), -1)]
_GRADCHECK_CUDA = [((5, 4), 0), ((3, 2, 2, 2), 1), ((4, 3, 2), -1)]


def _shape_id(shape, dim):
    return "x".join(map(str, shape)) + f"-dim{dim}"


@pytest.mark.parametrize(
    "backend,shape,dim,seeds",
    [param(b, s, d, (3, 4, 5), id=_shape_id(s, d)) for b in ("cpu", "reference") for s, d in _GRADCHECK_CPU]
    + [param("cuda", s, d, (70, 10, 11), id=_shape_id(s, d)) for s, d in _GRADCHECK_CUDA],
)
def test_gradcheck(backend, shape, dim, seeds):
    # n_power_iterations=0: sigma = u^T W v with u, v inputs, so (W_sn, sigma) is a smooth function of W.
    device = DEVICE[backend]
    w = randn(*shape, dtype=torch.float64, seed=seeds[0], device=device).requires_grad_()
    h = shape[dim]
    u, v = unit(h, torch.float64, seeds[1], device), unit(w.numel() // h, torch.float64, seeds[2], device)
    op = forward(backend)

    def f(weight):
        weight_sn, sigma, _, _ = op(weight, u, v, dim, 0, EPS)
        return weight_sn, sigma

    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))

    def sigma_only(weight):
        return op(weight, u, v, dim, 0, EPS)[1]

    assert torch.autograd.gradcheck(sigma_only, (w,))


@pytest.mark.parametrize(
    "backend,dtype,case", [param("cuda", dt, c, id=f"{c.id}-{dtype_id(dt)}") for c in CUDA_SOME for dt in DTYPES]
)
def test_matches_cpu_kernels(backend, dtype, case):
    """The CUDA kernels agree with the CPU kernels to rounding (their backward: in
    test_spectral_normalize_backward.py)."""
    if not _library.has_compiled_kernel("CPU"):
        pytest.skip("no compiled CPU kernel")
    _, make, dim = case
    weight = make(dtype, DEVICE[backend])
    u, v = vectors(weight, dim, seed=10)
    cuda_out = forward(backend)(weight, u, v, dim, 2, EPS)
    cpu_out = forward("cpu")(weight.cpu(), u.cpu(), v.cpu(), dim, 2, EPS)
    for name, a, b in zip(("W_sn", "sigma", "u", "v"), cuda_out, cpu_out):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert_rel(a, b, GPU_TOL[dtype], f"{case.id} {dtype} {name}")


@pytest.mark.parametrize("backend", [param("triton", id="bfloat16")])
def test_matches_cuda_kernels(backend):
    if not CUDA:
        pytest.skip("needs a CUDA device")
    if sn_ext.backends.get("cuda").unavailable_reasons():
        pytest.skip("the compiled CUDA kernels are not available")
    weight = randn(256, 128, 3, 3, dtype=torch.bfloat16, seed=52, device="cuda")
    u, v = vectors(weight, 0, seed=20)
    ours = forward(backend)(weight, u, v, 0, 1, EPS, False)
    theirs = forward("cuda")(weight, u, v, 0, 1, EPS, False)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) <= 2 * GPU_TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------
# Through the module (forward and backward): against torch's spectral norm on CUDA, and against the reference backend

MODULE_CASES = [
    ("linear_61x37", lambda: nn.Linear(37, 61), (4, 37)),
    ("linear_1xN", lambda: nn.Linear(300, 1), (4, 300)),
    ("linear_Nx1", lambda: nn.Linear(1, 300), (4, 1)),
    ("conv2d_64x3x3x3", lambda: nn.Conv2d(3, 64, 3), (2, 3, 8, 8)),
    ("conv_transpose2d_dim1", lambda: nn.ConvTranspose2d(32, 16, 4), (2, 32, 5, 5)),
    ("conv2d_512x512x3x3", lambda: nn.Conv2d(512, 512, 3), (1, 512, 6, 6)),
    ("linear_4096x4096", lambda: nn.Linear(4096, 4096), (2, 4096)),
]


def _assert_vs_torch(ours, theirs, oracle, dtype, what):
    """ours vs torch within TORCH_CUDA_TOL, and ours at most twice as far from the float64 oracle as torch (or
    GPU_TOL)."""
    assert_rel(ours, theirs, TORCH_CUDA_TOL[dtype], f"{what} vs torch")
    allowed = max(2 * rel_err(theirs, oracle), GPU_TOL[dtype])
    assert rel_err(ours, oracle) <= allowed, f"{what}: further from float64 than torch"


@pytest.mark.parametrize(
    "backend,dtype,case", [param("cuda", dt, c, id=f"{c[0]}-{dtype_id(dt)}") for c in MODULE_CASES for dt in DTYPES]
)
def test_module_matches_torch(backend, dtype, case):
    _, make, x_shape = case
    with no_tf32():
        theirs, ours = cuda_twins(make, dtype)
        oracle = copy.deepcopy(ours).double()  # sn_ext on float64 copies of the same weights and buffers
        x = randn(*x_shape, dtype=dtype, seed=81, device=DEVICE[backend])
        for step in range(2):
            w_t, w_o, w_64 = theirs.weight, ours.weight, oracle.weight  # one train-mode power iteration each
            _assert_vs_torch(w_o, w_t, w_64, dtype, f"{case[0]} {dtype} step {step} W_sn")
            for name in ("_u", "_v"):
                b_o = getattr(ours.parametrizations.weight[0], name)
                b_t = getattr(theirs.parametrizations.weight[0], name)
                b_64 = getattr(oracle.parametrizations.weight[0], name)
                _assert_vs_torch(b_o, b_t, b_64, dtype, f"{case[0]} {dtype} step {step} {name}")
        outs = [m(x.to(m.bias.dtype)) for m in (theirs, ours, oracle)]  # one more iteration each
        seed_grad = randn(*outs[0].shape, dtype=torch.float64, seed=82, device=DEVICE[backend])
        for out in outs:
            (out * seed_grad.to(out.dtype)).sum().backward()
    g_t = theirs.parametrizations.weight.original.grad
    g_o = ours.parametrizations.weight.original.grad
    g_64 = oracle.parametrizations.weight.original.grad
    _assert_vs_torch(g_o, g_t, g_64, dtype, f"{case[0]} {dtype} grad")


@pytest.mark.parametrize(
    "backend,legacy",
    [
        param(b, legacy, id=name)
        for b in ("cpu", "triton")
        for legacy, name in ((False, "parametrization"), (True, "legacy"))
    ],
)
def test_module_backend_matches_reference_backend(backend, legacy):
    """sn_ext's spectral norm with backend=<backend> against backend="reference": equal outputs, gradients and
    buffers over train steps (and an eval step)."""
    if backend == "cpu" and sn_ext.backends.get("cpu").unavailable_reasons():
        pytest.skip("the compiled CPU kernels are not loaded (SN_EXT_DISABLE_EXT=1?): backend='cpu' cannot be chosen")
    apply = sn_ext.legacy.spectral_norm if legacy else sn_ext.spectral_norm
    device = DEVICE[backend]
    nets = []
    for name in (backend, "reference"):
        torch.manual_seed(0)
        net = (
            nn.Sequential(
                nn.Conv2d(3, 5, 3), nn.ReLU(), nn.ConvTranspose2d(5, 2, 2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)
            )
            .double()
            .to(device)
        )
        torch.manual_seed(1)
        for layer in net:
            if hasattr(layer, "weight"):
                apply(layer, backend=name)
        nets.append(net)
    kernels = [
        h._kernels
        for m in nets[0].modules()
        for h in ([m.parametrizations.weight[0]] if hasattr(m, "parametrizations") else m._forward_pre_hooks.values())
    ]
    assert kernels and all(k.backend.name == backend for k in kernels)
    x = randn(2, 3, 7, 7, dtype=torch.float64, seed=46, device=device)
    for step in range(3):
        if step == 2:
            for net in nets:
                net.eval()
        outs = [net(x) for net in nets]
        assert rel_err(outs[0], outs[1]) < 1e-12
        for net, out in zip(nets, outs):
            net.zero_grad()
            out.square().sum().backward()
        for (name, a), (_, b) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
            assert rel_err(a.grad, b.grad) < 1e-12, name
        for (name, a), (_, b) in zip(nets[0].named_buffers(), nets[1].named_buffers()):
            assert rel_err(a, b) < 1e-12, name
