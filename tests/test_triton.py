"""The Triton backend (sn_ext/triton) against the float64 reference (sn_ext.reference): forward and backward ops on
every launch path, odd sizes, non-contiguous and dim=1 weights, degenerate rounds, launch counts, opcheck, the
module with backend="triton", and the errors of choosing it where it cannot run.

Where the kernels run:
- with a CUDA device, on it: the full grid of dtypes, paths and shapes, opcheck, torch.compile, no host sync;
- without one, in Triton's CPU interpreter (TRITON_INTERPRET=1), in a child pytest process that this module starts
  (test_interpreter_run): triton.jit reads TRITON_INTERPRET when it decorates a kernel, triton's own library
  included, and triton reads it again at launch, so it must be set for the whole process before triton is
  imported; a child keeps it out of the rest of the suite. A smaller grid then (the interpreter runs each program
  in Python); the "split" path runs on tiny weights by lowering the launch-plan knobs so that every loop, split and
  tile boundary is crossed anyway.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sn_ext
from sn_ext import _matrix, _schemas, backends, reference

CUDA = torch.cuda.is_available()


CHILD_ENV = "SN_EXT_TRITON_TEST_CHILD"  # set in the interpreter child
CHILD = os.environ.get(CHILD_ENV) == "1"


def _load_triton() -> tuple[bool, str]:
    if not CUDA and not CHILD:
        return False, "runs in a child process with TRITON_INTERPRET=1 (test_interpreter_run)"
    import sn_ext.triton as sn_triton

    return sn_triton.load()


LOADED, LOAD_REASON = _load_triton()
if LOADED:
    import sn_ext.triton as sn_triton
    from sn_ext.triton import _host as triton_plan
    from sn_ext.triton import spectral_normalize as triton_forward
    from sn_ext.triton import spectral_normalize_backward as triton_backward

    INTERPRETED = sn_triton.interpreted()
    try:  # older torch's wrap_triton rejects interpreted kernels
        _WRAPS = torch.library.wrap_triton(triton_forward.fused_forward_kernel) is not None
    except RuntimeError:
        _WRAPS = False
else:
    INTERPRETED, _WRAPS = False, False

_WHY_NOT = (
    LOAD_REASON
    if not LOADED
    else (
        "loaded, but neither on a GPU nor interpreted (TRITON_INTERPRET=1 must "
        "be set when sn_ext.triton loads), or wrap_triton is too old"
    )
)
needs_kernels = pytest.mark.skipif(
    not LOADED or not (CUDA or INTERPRETED) or not _WRAPS, reason=f"the Triton kernels cannot run here: {_WHY_NOT}"
)
needs_cuda = pytest.mark.skipif(not CUDA or not LOADED, reason="needs a CUDA device and triton")

DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-12
FWD = torch.ops.sn_ext.triton_spectral_normalize.default if LOADED else None
BWD = torch.ops.sn_ext.triton_spectral_normalize_backward.default if LOADED else None

# Normwise error allowed against the float64 oracle (the same table as tests/test_cuda.py).
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Launch paths, as launch-plan knob settings. "split" on tiny weights needs tiny tiles and splits.
PATHS = {
    "fused_one_pass": {"FUSED_MAX_NUMEL": 1 << 40},
    "fused_two_pass": {"FUSED_MAX_NUMEL": 1 << 40, "ONE_PASS_MAX": 0},
    "split": {
        "FUSED_MAX_NUMEL": 0,
        "TARGET_PROGRAMS": 8,
        "MIN_COLS_PER_SPLIT": 4,
        "MIN_ROWS_PER_SPLIT": 4,
        "TILE": 64,
        "VECTOR_BLOCK": 16,
        "MAX_LAMBDA_PARTS": 3,
    },
}


@pytest.fixture
def path(request, monkeypatch):
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(triton_plan, name, value)
    return request.param


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    diff = (a - b).abs().max().item()
    if diff != diff:
        return float("inf")
    return diff / max(b.abs().max().item(), 1e-300)


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def unit(n, dtype, seed) -> torch.Tensor:
    return F.normalize(randn(n, dtype=torch.float64, seed=seed), dim=0).to(dtype)


# (id, make(dtype) -> weight, dim): odd sizes, a ConvTranspose-like dim=1, and layouts without a plain view.
CASES = [
    ("13x7", lambda dt: randn(13, 7, dtype=dt, seed=1), 0),
    ("conv_transpose_dim1", lambda dt: randn(3, 5, 2, 3, dtype=dt, seed=2), 1),
    ("transposed", lambda dt: randn(7, 6, dtype=dt, seed=3).t(), 0),
    ("channels_last", lambda dt: randn(4, 3, 2, 3, dtype=dt, seed=4).to(memory_format=torch.channels_last), 0),
    ("sliced_dim1", lambda dt: randn(5, 14, dtype=dt, seed=5)[:, ::2], 1),
    ("1xN", lambda dt: randn(1, 37, dtype=dt, seed=6), 0),
    ("Nx1", lambda dt: randn(41, 1, dtype=dt, seed=7), 0),
    ("vector", lambda dt: randn(9, dtype=dt, seed=8), 0),
]
CASE_IDS = [c[0] for c in CASES]
# Real layer sizes, on the GPU, with the default launch plan (one program up to FUSED_MAX_NUMEL, else the grid).
BIG_CASES = [
    ("conv_64x3x3x3", lambda dt: randn(64, 3, 3, 3, dtype=dt, seed=11), 0),
    ("linear_1000x2048", lambda dt: randn(1000, 2048, dtype=dt, seed=12), 0),
    ("conv_512x256x3x3", lambda dt: randn(512, 256, 3, 3, dtype=dt, seed=9), 0),
    ("conv_transpose_256x384x4x4_dim1", lambda dt: randn(256, 384, 4, 4, dtype=dt, seed=10), 1),
    ("embedding_30011x128", lambda dt: randn(30011, 128, dtype=dt, seed=13), 0),
]
if CUDA:
    GRID = [(p, dt) for p in PATHS for dt in ALL_DTYPES]
else:  # the interpreter: every path and dtype, not every pair
    GRID = [
        ("fused_one_pass", torch.float32),
        ("fused_one_pass", torch.bfloat16),
        ("fused_two_pass", torch.float64),
        ("fused_two_pass", torch.float16),
        ("split", torch.float32),
        ("split", torch.bfloat16),
    ]
GRID_IDS = [f"{p}-{str(dt).replace('torch.', '')}" for p, dt in GRID]


def _vectors(weight, dim, seed=20):
    h = weight.shape[dim]
    return unit(h, weight.dtype, seed), unit(weight.numel() // h, weight.dtype, seed + 1)


def _check_forward(weight, u, v, dim, n, v_first):
    out = FWD(weight, u, v, dim, n, EPS, v_first)
    ref = reference.spectral_normalize(weight.double(), u.double(), v.double(), dim, n, EPS, v_first)
    tol = TOL[weight.dtype]
    for name, ours, theirs in zip(("W_sn", "sigma", "u_new", "v_new"), out, ref):
        err = rel_err(ours, theirs)
        assert err <= tol, f"{name} (n={n}, v_first={v_first}): normwise error {err:.2e} > {tol:.0e}"
    weight_sn, sigma, u_new, v_new = out
    assert weight_sn.dtype == weight.dtype and weight_sn.stride() == torch.empty_like(weight).stride()
    assert sigma.dtype == _matrix.accumulate_dtype(weight.dtype) and sigma.shape == ()
    assert u_new.is_contiguous() and v_new.is_contiguous() and u_new.dtype == v_new.dtype == weight.dtype


@pytest.mark.skipif(not (CUDA or CHILD), reason="the Triton ops load on a GPU or in the interpreter child")
def test_triton_ops_load_where_triton_is_installed():
    """Installed triton whose ops fail to register fails here with the reason, rather than skipping every kernel
    test (as torch 2.11 once did: its triton_op ignored `schema=` and rejected an unannotated function)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert LOADED, LOAD_REASON


def _as_called(schema) -> tuple:
    """What a caller sees of a schema: argument names, types (int and SymInt alike), defaults; output types."""

    def kind(t) -> str:
        return str(t).replace("SymInt", "int")

    return ([(a.name, kind(a.type), a.default_value) for a in schema.arguments], [kind(r.type) for r in schema.returns])


@pytest.mark.skipif(not LOADED, reason=f"the Triton ops are not loaded: {_WHY_NOT}")
@pytest.mark.parametrize(
    "op,same_as",
    [
        ("triton_spectral_normalize", "spectral_normalize"),
        ("triton_spectral_normalize_backward", "spectral_normalize_backward"),
    ],
)
def test_triton_ops_have_the_cpp_ops_schema(op, same_as):
    registered = getattr(torch.ops.sn_ext, op).default._schema
    expected = torch._C.parse_schema(f"sn_ext::{op}" + _schemas.SCHEMAS[same_as])
    assert _as_called(registered) == _as_called(expected), f"{registered} != {expected}"
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 14):  # registers `schema=` as given
        assert str(registered) == str(expected)


@needs_kernels
@pytest.mark.parametrize("path,dtype", [pytest.param(*g, id=i) for g, i in zip(GRID, GRID_IDS)], indirect=["path"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(case, path, dtype):
    _, make, dim = case
    weight = make(dtype)
    u, v = _vectors(weight, dim)
    for n, v_first in [(0, False), (1, False), (2, True)] + ([(3, False), (1, True)] if CUDA else []):
        _check_forward(weight, u, v, dim, n, v_first)


@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", BIG_CASES, ids=[c[0] for c in BIG_CASES])
def test_real_sizes_match_reference(case, dtype):
    _, make, dim = case
    weight = make(dtype)
    u, v = _vectors(weight, dim)
    for n, v_first in [(1, False), (1, True), (0, False)]:
        _check_forward(weight, u, v, dim, n, v_first)
    weight_sn, sigma, u, v = reference.spectral_normalize(weight, u, v, dim, 1, EPS)
    grad = randn(*weight.shape, dtype=dtype, seed=31)
    ours = BWD(grad, weight_sn, u, v, sigma, dim)
    ref = reference.spectral_normalize_backward(
        grad.double(), weight_sn.double(), u.double(), v.double(), sigma.double(), dim
    )
    assert rel_err(ours, ref) <= TOL[dtype]


@needs_kernels
@pytest.mark.parametrize("path,dtype", [pytest.param(*g, id=i) for g, i in zip(GRID, GRID_IDS)], indirect=["path"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_reference(case, path, dtype):
    _, make, dim = case
    weight = make(dtype)
    u, v = _vectors(weight, dim)
    weight_sn, sigma, u, v = reference.spectral_normalize(weight, u, v, dim, 1, EPS)
    grad = randn(*weight.shape, dtype=dtype, seed=30)
    ours = BWD(grad, weight_sn, u, v, sigma, dim)
    ref = reference.spectral_normalize_backward(
        grad.double(), weight_sn.double(), u.double(), v.double(), sigma.double(), dim
    )
    err = rel_err(ours, ref)
    assert err <= TOL[dtype], f"grad_W: normwise error {err:.2e} > {TOL[dtype]:.0e}"
    assert ours.dtype == dtype and ours.stride() == torch.empty_like(weight_sn).stride()


@needs_kernels
@pytest.mark.parametrize("path", list(PATHS), indirect=True)
@pytest.mark.parametrize("fill", ["zero", "nan", "inf"])
def test_degenerate_round_keeps_input_vectors(path, fill):
    weight = randn(6, 5, dtype=torch.float32, seed=40)
    if fill == "zero":
        weight.zero_()
    else:
        weight.view(-1)[7] = float(fill)
    u, v = _vectors(weight, 0)
    for n, v_first in [(1, False), (2, True)]:
        weight_sn, sigma, u_new, v_new = FWD(weight, u, v, 0, n, EPS, v_first)
        assert torch.equal(u_new, u) and torch.equal(v_new, v), (n, v_first)
        ref_sn, ref_sigma, ref_u, ref_v = reference.spectral_normalize(weight, u, v, 0, n, EPS, v_first)
        assert torch.equal(ref_u, u) and torch.equal(ref_v, v)
        assert torch.equal(sigma.isnan(), ref_sigma.isnan()) and torch.equal(weight_sn.isnan(), ref_sn.isnan())


@needs_kernels
@pytest.mark.parametrize(
    "path,launches", [("fused_one_pass", (1, 1, 1)), ("split", (4 * 2 + 1, 3, 2))], indirect=["path"]
)
def test_launch_count(path, launches, monkeypatch):
    """Few launches: one program per op for small weights; 4n + 1 (n == 0: 3) and 2 on the grid."""
    counted = []
    real = torch.library.wrap_triton
    for module in (triton_forward, triton_backward):
        monkeypatch.setattr(module, "wrap_triton", lambda kernel: counted.append(kernel) or real(kernel))
    weight = randn(9, 11, seed=41)
    u, v = _vectors(weight, 0)
    for (op, args), expected in zip(
        [
            (FWD, (weight, u, v, 0, 2, EPS, False)),
            (FWD, (weight, u, v, 0, 0, EPS, False)),
            (BWD, (weight, weight, u, v, torch.ones((), device=DEVICE), 0)),
        ],
        launches,
    ):
        counted.clear()
        op(*args)
        assert len(counted) == expected, [k.fn.__name__ for k in counted]


@needs_kernels
def test_deterministic():
    weight = randn(33, 20, seed=42)
    u, v = _vectors(weight, 0)
    for a, b in zip(FWD(weight, u, v, 0, 2, EPS, False), FWD(weight, u, v, 0, 2, EPS, False)):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] if not CUDA else ALL_DTYPES, ids=str)
def test_opcheck(dtype):
    # The interpreter runs kernels eagerly on whatever it is given, so the fake-tensor (AOT dispatch) checks need
    # a GPU; schema, fake kernel and autograd registration are checked everywhere.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if INTERPRETED else None
    weight = randn(4, 3, 2, 3, dtype=dtype, seed=43)
    u, v = _vectors(weight, 1)
    sigma = torch.tensor(1.3, dtype=_matrix.accumulate_dtype(dtype), device=DEVICE, requires_grad=True)
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(FWD, (weight.detach().requires_grad_(), u, v, 1, 1, EPS, False), **kwargs)
    grad = randn(*weight.shape, dtype=dtype, seed=44).requires_grad_()
    torch.library.opcheck(BWD, (grad, weight.detach().requires_grad_(), u, v, sigma, 1), **kwargs)


@needs_kernels
def test_autograd_matches_reference_backend():
    # W -> (W_sn, sigma) through the shared autograd formulas, calling the Triton backward; double backward too.
    weight = randn(5, 4, 3, dtype=torch.float64, seed=45)
    u, v = _vectors(weight, 1)
    grads = []
    for op in (FWD, torch.ops.sn_ext.reference_spectral_normalize.default):
        w = weight.clone().requires_grad_()
        weight_sn, sigma, _, _ = op(w, u, v, 1, 0, EPS, False)
        (g,) = torch.autograd.grad((weight_sn * weight_sn.detach().cos()).sum() + sigma, w, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), w)
        grads.append((g.detach(), gg))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12


@needs_kernels
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_module_backend_matches_reference_backend(legacy):
    """sn_ext's spectral norm with backend="triton" against backend="reference": equal outputs, gradients and
    buffers over train steps (and an eval step)."""
    apply = sn_ext.legacy.spectral_norm if legacy else sn_ext.spectral_norm
    nets = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        net = (
            nn.Sequential(
                nn.Conv2d(3, 5, 3), nn.ReLU(), nn.ConvTranspose2d(5, 2, 2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)
            )
            .double()
            .to(DEVICE)
        )
        torch.manual_seed(1)
        for layer in net:
            if hasattr(layer, "weight"):
                apply(layer, backend=backend)
        nets.append(net)
    kernels = [
        h._kernels
        for m in nets[0].modules()
        for h in ([m.parametrizations.weight[0]] if hasattr(m, "parametrizations") else m._forward_pre_hooks.values())
    ]
    assert kernels and all(k.backend.name == "triton" for k in kernels)
    x = randn(2, 3, 7, 7, dtype=torch.float64, seed=46)
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


# ---------------------------------------------------------------------------------------------------------------
# GPU only


@needs_cuda
def test_no_host_synchronisation():
    weight = randn(300, 200, 3, 3, seed=50)  # the split path
    u, v = _vectors(weight, 1)
    w = weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n, v_first in [(1, False), (2, True), (0, False)]:
            weight_sn, sigma, _, _ = FWD(w, u, v, 1, n, EPS, v_first)
            weight_sn.backward(torch.ones_like(weight_sn))
        small = randn(16, 9, seed=51).requires_grad_()
        FWD(small, *_vectors(small, 0), 0, 1, EPS, False)[0].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_agrees_with_compiled_cuda_backend():
    if backends.get("cuda").unavailable_reasons():
        pytest.skip("the compiled CUDA kernels are not available")
    weight = randn(256, 128, 3, 3, dtype=torch.bfloat16, seed=52)
    u, v = _vectors(weight, 0)
    ours = FWD(weight, u, v, 0, 1, EPS, False)
    theirs = torch.ops.sn_ext.spectral_normalize(weight, u, v, 0, 1, EPS, False)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) <= 2 * TOL[torch.bfloat16]


@needs_cuda
def test_weight_past_int32_offsets():
    """A weight with more than 2^31 elements (64-bit offsets): W = a b^T has sigma = |a| |b| and power iteration
    reaches it in one round from any start."""
    rows, cols = 5, (1 << 31) // 5 + 1000
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB of GPU memory")
    a = torch.arange(1, rows + 1, device=DEVICE, dtype=torch.float32)
    b = torch.ones(cols, device=DEVICE, dtype=torch.float32)
    weight = torch.outer(a, b).to(torch.bfloat16)
    del b
    u, v = unit(rows, torch.bfloat16, 53), unit(cols, torch.bfloat16, 54).abs()
    weight_sn, sigma, u_new, v_new = FWD(weight, u, v, 0, 1, EPS, False)
    expected = a.norm().item() * cols**0.5
    assert abs(sigma.item() - expected) / expected < 1e-2
    for index in (0, cols - 1):
        assert abs(weight_sn[rows - 1, index].item() - rows / expected) < 1e-2 * rows / expected
    grad = BWD(weight_sn, weight_sn, u_new, v_new, sigma, 0)
    assert torch.isfinite(grad[:, -8:]).all()


@needs_cuda
def test_torch_compile_sees_the_triton_kernels():
    """fullgraph torch.compile of a module with backend="triton": no graph break, the same numbers as eager."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4)).to(DEVICE)
    torch.manual_seed(1)
    for layer in (net[0], net[2]):
        sn_ext.spectral_norm(layer, backend="triton")
    twin = copy.deepcopy(net)
    compiled = torch.compile(twin, fullgraph=True)
    x = randn(8, 20, seed=55)
    for _ in range(2):
        out_e, out_c = net(x), compiled(x)
        assert rel_err(out_c, out_e) < 1e-5
        out_e.square().sum().backward()
        out_c.square().sum().backward()
    for (name, a), (_, b) in zip(net.named_parameters(), twin.named_parameters()):
        assert rel_err(b.grad, a.grad) < 1e-5, name
    for (name, a), (_, b) in zip(net.named_buffers(), twin.named_buffers()):
        assert rel_err(b, a) < 1e-5, name
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# Choosing the Triton backend where it cannot run (a fresh process: this one may have loaded the interpreter)

NO_GPU_SCRIPT = textwrap.dedent("""
    import importlib.util, os, torch, sn_ext
    from torch import nn
    from sn_ext import backends
    assert not torch.cuda.is_available()
    try:
        sn_ext.spectral_norm(nn.Linear(3, 4), backend="triton")
    except backends.BackendUnavailable as error:
        assert "'triton' backend cannot run here" in str(error) and "no CUDA device" in str(error), error
    else:
        raise AssertionError("no error")
    os.environ["SN_EXT_BACKEND"] = "triton"
    try:
        sn_ext.legacy.spectral_norm(nn.Linear(3, 4))
    except backends.BackendUnavailable as error:
        assert "SN_EXT_BACKEND" in str(error) and "no CUDA device" in str(error), error
    else:
        raise AssertionError("no error")
    del os.environ["SN_EXT_BACKEND"]
    assert sn_ext.info()["backends"]["triton"]["usable"] is False
    assert "no CUDA device" in sn_ext.info()["backends"]["triton"]["reason"]
    import sys
    assert "sn_ext.triton.spectral_normalize" not in sys.modules, "the kernels were loaded to answer"
    # triton not installed
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "triton" else real(name, *a)
    assert backends.get("triton").unavailable_reasons() == ["triton is not installed (pip install 'triton>=3.2')"]
    print("NO-GPU-OK")
""")


@pytest.mark.skipif(CUDA or CHILD, reason="checks the errors on a machine without a GPU (once, not in the child)")
def test_triton_backend_without_gpu_explains_why():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SN_EXT_BACKEND")}
    result = subprocess.run([sys.executable, "-c", NO_GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NO-GPU-OK" in result.stdout


@pytest.mark.skipif(CUDA or CHILD, reason="on a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_cuda_without_gpu():
    """Every kernel variant lowers to CUDA code for sm_90 (tests/triton_compile_check.py, a fresh process)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-10000:] + result.stderr[-5000:]
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    assert result.stdout.startswith("COMPILED"), result.stdout + result.stderr


@needs_kernels
def test_triton_backend_refuses_a_weight_on_another_device():
    # Interpreted kernels take CPU tensors, compiled ones CUDA tensors; either way "meta" is refused, saying why.
    layer = sn_ext.spectral_norm(nn.Linear(3, 4).to(DEVICE), backend="triton")
    layer.to("meta")
    with pytest.raises(backends.BackendUnavailable, match=r"'triton' backend cannot take .* on meta"):
        layer.weight


@pytest.mark.skipif(CUDA or CHILD, reason="the interpreter child runs only on machines without a GPU")
def test_interpreter_run():
    """Runs this module's kernel tests in Triton's CPU interpreter, in a child process (see the docstring)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    env.pop("SN_EXT_BACKEND", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore:invalid value encountered:RuntimeWarning",
            __file__,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(__file__),
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in summary and "skipped" in summary, summary  # the GPU-only tests skip in the child
