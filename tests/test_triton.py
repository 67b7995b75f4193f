"""Backend-specific properties of the Triton backend (sn_ext/triton): its ops load and have the C++ ops' schemas,
launch counts per launch path, no host synchronisation, 64-bit offsets, torch.compile, the errors of choosing it where
it cannot run, the CUDA compile check (tests/triton_compile_check.py), and the interpreter run. Op values are tested
per op in test_<op>.py (test_spectral_normalize.py, test_spectral_normalize_backward.py: their "triton-..." cases).

Where the kernels run (tests/op_cases.py):
- with a CUDA device, on it, in this process: the full grid of dtypes, paths and shapes, opcheck, torch.compile, no
  host sync;
- without one, in Triton's CPU interpreter (TRITON_INTERPRET=1), in one child pytest process that this module starts
  (test_interpreter_run) for this file and the "triton" cases of every per-op file: triton.jit reads TRITON_INTERPRET
  when it decorates a kernel, triton's own library included, and triton reads it again at launch, so it must be set
  for the whole process before triton is imported; a child keeps it out of the rest of the suite. A smaller grid then
  (the interpreter runs each program in Python); the "split" path runs on tiny weights by lowering the launch-plan
  knobs so that every loop, split and tile boundary is crossed anyway.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_rel, randn, rel_err, unit
from op_cases import (
    BACKEND_TOL,
    CHILD,
    CHILD_ENV,
    CUDA,
    EPS,
    TRITON_LOAD_REASON,
    TRITON_LOADED,
    TRITON_RUNS,
    TRITON_WHY_NOT,
    backward_op,
    forward,
    forward_op,
    reference_forward_f64,
    use_triton_path,
    vectors,
)
from torch import nn

import sn_ext
from sn_ext import _schemas, backends

needs_kernels = pytest.mark.skipif(not TRITON_RUNS, reason=f"the Triton kernels cannot run here: {TRITON_WHY_NOT}")
needs_cuda = pytest.mark.skipif(not CUDA or not TRITON_LOADED, reason="needs a CUDA device and triton")

DEVICE = "cuda" if CUDA else "cpu"
PER_OP_FILES = (
    "test_power_iteration.py",
    "test_spectral_normalize.py",
    "test_spectral_normalize_backward.py",
    "test_spectral_normalize_grouped.py",
    "test_spectral_normalize_scaled.py",
)


@pytest.mark.skipif(not (CUDA or CHILD), reason="the Triton ops load on a GPU or in the interpreter child")
def test_triton_ops_load_where_triton_is_installed():
    """Installed triton whose ops fail to register fails here with the reason, rather than skipping every kernel
    test (as torch 2.11 once did: its triton_op ignored `schema=` and rejected an unannotated function)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert TRITON_LOADED, TRITON_LOAD_REASON


def _as_called(schema) -> tuple:
    """What a caller sees of a schema: argument names, types (int and SymInt alike), defaults; output types."""

    def kind(t) -> str:
        return str(t).replace("SymInt", "int")

    return ([(a.name, kind(a.type), a.default_value) for a in schema.arguments], [kind(r.type) for r in schema.returns])


@pytest.mark.skipif(not TRITON_LOADED, reason=f"the Triton ops are not loaded: {TRITON_WHY_NOT}")
@pytest.mark.parametrize(
    "op,schema",
    [
        ("triton_spectral_normalize_", _schemas.SCHEMAS["spectral_normalize_"]),
        ("triton_spectral_normalize_backward", _schemas.SCHEMAS["spectral_normalize_backward"]),
    ],
    ids=["forward", "backward"],
)
def test_triton_ops_have_the_backends_schema(op, schema):
    registered = getattr(torch.ops.sn_ext, op).default._schema
    expected = torch._C.parse_schema(f"sn_ext::{op}" + schema)
    assert _as_called(registered) == _as_called(expected), f"{registered} != {expected}"
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 14):  # registers `schema=` as given
        assert str(registered) == str(expected)


def _count_launches(monkeypatch) -> list:
    """Records the name of every kernel the ops' eager calls launch."""
    from sn_ext.triton import _launch

    launched = []
    real = _launch.eager_launch
    monkeypatch.setattr(
        _launch, "eager_launch", lambda launch, *args: launched.append(launch.kernel.fn.__name__) or real(launch, *args)
    )
    return launched


@needs_kernels
@pytest.mark.parametrize(
    "path,launches", [("fused_one_pass", (1, 1, 1)), ("split", (4 * 2 + 1, 3, 2)), ("gram", (3 * 2, 3, 2))]
)
def test_launch_count(path, launches, monkeypatch):
    """Few launches: one program per op for small weights; on the grid 3n for u-first rounds reading W once, else
    4n + 1 (n == 0: 3), and 2 for the backward."""
    use_triton_path(monkeypatch, path)
    counted = _count_launches(monkeypatch)
    weight = randn(9, 11, seed=41, device=DEVICE)
    u, v = vectors(weight, 0, seed=20)
    for (op, args), expected in zip(
        [
            (forward_op("triton"), (weight, u, v, 0, 2, EPS, False)),
            (forward_op("triton"), (weight, u, v, 0, 0, EPS, False)),
            (backward_op("triton"), (weight, weight, u, v, torch.ones((), device=DEVICE), 0)),
        ],
        launches,
    ):
        counted.clear()
        op(*args)
        assert len(counted) == expected, counted


# The grid's one-pass u-first round (_gram.py) on small weights, the "gram" path's tiny tiles: 37 rows make 19 row
# blocks of 2 for 3 programs (partial rows added over 6-7 blocks, the last block partial).
GRID_ONE_PASS_CASES = [
    ("37x53", lambda dt: randn(37, 53, dtype=dt, seed=51, device=DEVICE), 0),
    ("conv_5x3x3x3_dim0", lambda dt: randn(5, 3, 3, 3, dtype=dt, seed=52, device=DEVICE), 0),
    ("conv_5x3x3x3_dim1", lambda dt: randn(5, 3, 3, 3, dtype=dt, seed=53, device=DEVICE), 1),
    (
        "channels_last_9x4x3x3",
        lambda dt: randn(9, 4, 3, 3, dtype=dt, seed=54, device=DEVICE).contiguous(memory_format=torch.channels_last),
        0,
    ),
    ("transposed_29x18", lambda dt: randn(18, 29, dtype=dt, seed=55, device=DEVICE).t(), 0),
    # |W v| and |W^T y| / max(|W v|, eps) both below eps: each half-step divides by eps, not by the norm
    ("tiny_37x53", lambda dt: randn(37, 53, dtype=dt, seed=56, device=DEVICE) * 1e-14, 0),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("case", GRID_ONE_PASS_CASES, ids=[c[0] for c in GRID_ONE_PASS_CASES])
def test_grid_one_pass_round_matches_reference(case, n, dtype, monkeypatch):
    """u = N(W v), v = N(W^T (W v) / max(|W v|, eps)) in one read of W per round, summed over fixed parts: the
    reference backend in the same dtype and the float64 oracle agree within the GPU tolerance."""
    use_triton_path(monkeypatch, "gram")
    launched = _count_launches(monkeypatch)
    _, make, dim = case
    weight = make(dtype)
    u, v = vectors(weight, dim, seed=60 + n)
    ours = forward("triton")(weight, u, v, dim, n, EPS, False)
    assert launched.count("gram_kernel") == n and launched.count("gram_reduce_kernel") == n, launched
    assert launched.count("normalize_kernel") == n - 1 and len(launched) == 3 * n, launched
    tol = BACKEND_TOL["triton"][dtype]
    names = ("W_sn", "sigma", "u", "v")
    for name, mine, theirs in zip(names, ours, reference_forward_f64(weight, u, v, dim, n, False)):
        assert_rel(mine, theirs, tol, f"{case[0]} {dtype} n={n} {name} vs float64 reference")
    for name, mine, theirs in zip(names, ours, forward("reference")(weight, u, v, dim, n, EPS, False)):
        assert_rel(mine, theirs, tol, f"{case[0]} {dtype} n={n} {name} vs the reference backend")
    again = forward("triton")(weight, u, v, dim, n, EPS, False)
    for name, mine, theirs in zip(names, ours, again):
        assert torch.equal(mine, theirs), f"{name}: the same inputs give the same bits (fixed summation order)"


@needs_kernels
@pytest.mark.parametrize("fill", ["zero", "nan"])
def test_grid_one_pass_degenerate_weight_keeps_vectors(fill, monkeypatch):
    use_triton_path(monkeypatch, "gram")
    launched = _count_launches(monkeypatch)
    weight = randn(37, 53, seed=57, device=DEVICE)
    if fill == "zero":
        weight.zero_()
    else:
        weight[20, 30] = float("nan")
    u, v = vectors(weight, 0, seed=62)
    for n in (1, 2):
        _, _, u_new, v_new = forward("triton")(weight, u, v, 0, n, EPS, False)
        assert "gram_kernel" in launched, launched
        assert torch.equal(u_new, u) and torch.equal(v_new, v), f"a degenerate round returns the inputs (n={n})"


# ---------------------------------------------------------------------------------------------------------------
# GPU only


@needs_cuda
def test_no_host_synchronisation():
    weight = randn(300, 200, 3, 3, seed=50, device=DEVICE)  # the split path
    u, v = vectors(weight, 1, seed=20)
    w = weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n, v_first in [(1, False), (2, True), (0, False)]:
            weight_sn, sigma, _, _ = forward("triton")(w, u, v, 1, n, EPS, v_first)
            weight_sn.backward(torch.ones_like(weight_sn))
        small = randn(16, 9, seed=51, device=DEVICE).requires_grad_()
        forward("triton")(small, *vectors(small, 0, seed=20), 0, 1, EPS, False)[0].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
    u, v = unit(rows, torch.bfloat16, 53, DEVICE), unit(cols, torch.bfloat16, 54, DEVICE).abs()
    weight_sn, sigma, u_new, v_new = forward("triton")(weight, u, v, 0, 1, EPS, False)
    expected = a.norm().item() * cols**0.5
    assert abs(sigma.item() - expected) / expected < 1e-2
    for index in (0, cols - 1):
        assert abs(weight_sn[rows - 1, index].item() - rows / expected) < 1e-2 * rows / expected
    grad = backward_op("triton")(weight_sn, weight_sn, u_new, v_new, sigma, 0)
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
    x = randn(8, 20, seed=55, device=DEVICE)
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


@pytest.mark.skipif(CHILD, reason="host code: once, in the main process")
def test_launch_plan_arithmetic_equals_tritons():
    """The launch plans' plain-integer cdiv and pow2 (sn_ext/triton/_host.py) equal triton's cdiv and
    next_power_of_2, which cost ~7 us a call on the host."""
    triton = pytest.importorskip("triton")
    from sn_ext.triton import _host

    assert [_host.pow2(n) for n in range(1, 5000)] == [triton.next_power_of_2(n) for n in range(1, 5000)]
    assert _host.pow2(0) == 1
    pairs = [(a, b) for a in range(0, 300) for b in range(1, 40)] + [(2**40 + 3, 7), (2**33, 2**16)]
    assert [_host.cdiv(a, b) for a, b in pairs] == [triton.cdiv(a, b) for a, b in pairs]


@pytest.mark.skipif(CHILD, reason="host code: once, in the main process")
@pytest.mark.parametrize(
    "make,dim,expected",
    [
        # contiguous, dim=0: the columns are one contiguous run, so inner = 1 (16-byte loads on a GPU)
        (lambda: torch.empty(64, 3, 3, 3), 0, ((27, 64, 1), ((1, 27, 1),), (1, 27, 1), False, False)),
        # channels_last, dim=0: (C, H*W) addresses W and a new output in place: no copy, no scratch
        (
            lambda: torch.empty(4, 3, 2, 3).contiguous(memory_format=torch.channels_last),
            0,
            ((3, 4, 6), ((1, 18, 3),), (1, 18, 3), False, False),
        ),
        # dim=1 of a contiguous 4-D weight: torch's (outer, rows, inner) split
        (lambda: torch.empty(3, 5, 2, 3), 1, ((3, 5, 6), ((30, 6, 1),), (30, 6, 1), False, False)),
        # three strided runs of columns: no split fits, so the input is copied and the output written via scratch
        (
            lambda: torch.empty(2, 3, 4, 5).permute(0, 2, 1, 3),
            0,
            ((1, 2, 60), ((120, 60, 1),), (120, 60, 1), True, True),
        ),
    ],
)
def test_triton_layout_fits_the_tensors_as_they_are(make, dim, expected):
    from sn_ext.triton import _host

    weight = make()
    layout = _host.Layout.of(tuple(weight.shape), (weight.stride(),), dim)
    m = layout.matrix
    assert ((m.outer, m.rows, m.inner), layout.strides, layout.out_strides, layout.reshape, layout.scratch) == expected


@pytest.mark.skipif(CHILD, reason="host code: once, in the main process")
def test_triton_variants_of_a_gan_run_stay_few():
    """A model's layers share compiled kernels (`do_not_specialize`, tiles keyed by the column count's power of 2):
    a GAN run (sngan's CNN and ResNet discriminators at 32x32 and 48x48, every layer through its whole run)
    compiles few Triton kernel variants per dtype (each a 0.3-0.5 s compile on a cold cache; 49 before)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    stdout = _run_for_gpu(["-m", "benchmarks.triton_variants"], cwd=ROOT)
    runs = [line for line in stdout.splitlines() if line.startswith("GAN run")]
    assert len(runs) == 2, stdout
    for line in runs:
        assert int(line.split("shapes, ")[1].split()[0]) <= 30, stdout


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_for_gpu(args: list[str], cwd: str | None = None, env: dict | None = None) -> str:
    """Runs `python <args>` in a fresh process with the kernels loaded for a GPU (no TRITON_INTERPRET) and this
    checkout's sn_ext first on the path; returns its output, skips the test if it printed "SKIP <why>"."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-10000:] + result.stderr[-5000:]
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    return result.stdout


# Direct launches (sn_ext/triton/_launch.py) reuse a compiled kernel per (device, tensor alignments); the launch plan
# fixes the rest of Triton's key. Under dry_run(verify=True) every direct launch is bound again by Triton's binder,
# which fails if it would have chosen another variant: here for every path, layouts and dtypes, vectors and weights
# at 16-byte-aligned and unaligned addresses, and the launch plan's knobs changed in between.
DIRECT_LAUNCH_SCRIPT = textwrap.dedent("""
    import torch, sn_ext.triton as sn_triton
    from sn_ext.triton import _dry_run, _host
    reason = _dry_run.why_not()
    if reason:
        print("SKIP", reason)
        raise SystemExit
    forward = torch.ops.sn_ext.triton_spectral_normalize_.default
    backward = torch.ops.sn_ext.triton_spectral_normalize_backward.default
    def vector(n, offset, dtype):
        return torch.randn(n + offset)[offset:].to(dtype) if offset == 0 else torch.randn(n + 4)[1 : n + 1].to(dtype)
    paths = [{}, {"FUSED_MAX_NUMEL": 0}, {"FUSED_MAX_NUMEL": 0, "GRAM_ROUNDS": False}]
    launches = 0
    with _dry_run.dry_run(verify=True) as variants:
        for knobs in paths:
            saved = {k: getattr(_host, k) for k in knobs}
            for k, value in knobs.items():
                setattr(_host, k, value)
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for make, dim in [(lambda: torch.randn(24, 7, 3), 0), (lambda: torch.randn(40, 9)[:, 1:], 0),
                                  (lambda: torch.randn(6, 5, 3, 3), 1)]:
                    for offset in (0, 1, 0):  # the same plan with aligned, unaligned, aligned tensors
                        base = torch.randn(make().numel() + 8).to(dtype)
                        weight = make().to(dtype) if offset == 0 else base[1 : 1 + make().numel()].view(make().shape)
                        rows = weight.shape[dim]
                        u, v = vector(rows, offset, dtype), vector(weight.numel() // rows, offset, dtype)
                        for n, v_first in [(1, False), (2, False), (0, False), (1, True)]:
                            out, sigma, u_new, v_new = forward(weight, u, v, dim, n, 1e-12, v_first)
                            backward(out if offset == 0 else weight, out, u_new, v_new, sigma, dim)
                            launches += 1
            for k, value in saved.items():
                setattr(_host, k, value)
    eps = {str(v.signature.get("eps")) for v in variants.values() if "eps" in v.signature}
    assert eps == {"fp64"}, eps
    print("DIRECT-OK", len(variants), launches)
""")


@pytest.mark.skipif(CUDA or CHILD, reason="bound without a GPU (once, not in the child)")
def test_direct_launches_take_the_variant_triton_would():
    stdout = _run_for_gpu(["-c", DIRECT_LAUNCH_SCRIPT])
    assert "DIRECT-OK" in stdout, stdout


class _RecordingGuard:
    def __init__(self, device, entered: list):
        self.device, self.entered = device, entered

    def __enter__(self):
        self.entered.append(self.device)

    def __exit__(self, *exc):
        self.entered.append(None)


@pytest.mark.skipif(CHILD, reason="host code: once, in the main process")
def test_device_guard_switches_to_the_weights_device_only_when_needed(monkeypatch):
    """A weight on cuda:1 while cuda:0 is current: its launches run with cuda:1 current (Triton launches on the
    current device); on the current device or the CPU, no guard (no host time spent on one)."""
    from sn_ext.triton import _launch

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: _RecordingGuard(device, entered))
    guard = _launch.device_guard(torch.device("cuda", 1))
    with guard:
        assert entered == [torch.device("cuda", 1)]
    assert _launch.device_guard(torch.device("cuda", 0)) is None
    assert _launch.device_guard(torch.device("cpu")) is None


@needs_kernels
@pytest.mark.parametrize("path", ["fused_one_pass", "split", "gram"])
def test_every_launch_runs_under_the_device_guard(path, monkeypatch):
    """Both ops launch every kernel inside the guard device_guard gives them (a weight on another device)."""
    from sn_ext.triton import _launch

    use_triton_path(monkeypatch, path)
    entered, launched = [], []
    monkeypatch.setattr(_launch, "device_guard", lambda device: _RecordingGuard(device, entered))
    real = _launch.eager_launch
    monkeypatch.setattr(
        _launch,
        "eager_launch",
        lambda launch, *args: launched.append(entered[-1:] == [weight.device]) or real(launch, *args),
    )
    weight = randn(9, 11, seed=41, device=DEVICE)
    u, v = vectors(weight, 0, seed=20)
    out, sigma, u_new, v_new = forward_op("triton")(weight, u, v, 0, 2, EPS, False)
    backward_op("triton")(weight, out, u_new, v_new, sigma, 0)
    assert launched and all(launched), launched
    assert entered[-1] is None, "the guard was left"


@needs_kernels
@pytest.mark.parametrize("path", ["fused_one_pass", "split", "gram"])
def test_float64_eps_is_not_rounded_to_float32(path, monkeypatch):
    """eps reaches the kernels in the weight's precision: a float64 weight whose norms are below eps (every
    half-step divides by eps) matches the float64 reference to float64 precision, which eps rounded to float32
    (9.99999996e-13) would miss by ~4e-9."""
    use_triton_path(monkeypatch, path)
    weight = randn(13, 7, dtype=torch.float64, seed=44, device=DEVICE) * 1e-14
    u, v = vectors(weight, 0, seed=45)
    ours = forward("triton")(weight, u, v, 0, 1, EPS, False)
    for name, mine, theirs in zip(("W_sn", "sigma", "u", "v"), ours, reference_forward_f64(weight, u, v, 0, 1, False)):
        assert_rel(mine, theirs, 1e-13, f"{path} {name}")


WARM_UP_SCRIPT = textwrap.dedent("""
    import os, torch
    from torch import nn
    import sn_ext
    from sn_ext.triton import warm_up, _dry_run
    reason = _dry_run.why_not()
    if reason:
        print("SKIP", reason)
        raise SystemExit
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 2), nn.Linear(5, 6))
    assert warm_up.layers_of(model) == [((8, 3, 3, 3), 0, False), ((8, 4, 2, 2), 1, False), ((6, 5), 0, False)]
    assert warm_up.layers_of(["64x3x3x3", "4x5:1", (2, 3)]) == [((64, 3, 3, 3), 0, False), ((4, 5), 1, False),
                                                              ((2, 3), 0, False)]
    count = warm_up.warm_up(["64x3x3x3"], dtypes=[torch.float32], processes=2)
    cached = sum(len(files) for _, _, files in os.walk(os.environ["TRITON_CACHE_DIR"]))
    assert count == 3 and cached > 0, (count, cached)
    print("WARM-UP-OK", count)
""")


@pytest.mark.skipif(CUDA or CHILD, reason="compiled without a GPU (once, not in the child)")
def test_warm_up_compiles_a_models_variants_into_tritons_cache(tmp_path):
    """sn_ext.triton.warm_up finds a model's layers (torch's default dim per layer type) and compiles their run's
    variants (one-program forward in train and eval, backward: 3 for 64x3x3x3) into Triton's cache."""
    stdout = _run_for_gpu(["-c", WARM_UP_SCRIPT], env=dict(os.environ, TRITON_CACHE_DIR=str(tmp_path)))
    assert "WARM-UP-OK" in stdout, stdout


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
    stdout = _run_for_gpu([os.path.join(ROOT, "tests", "triton_compile_check.py")])
    assert stdout.startswith("COMPILED"), stdout


@needs_kernels
def test_triton_backend_refuses_a_weight_on_another_device():
    # Interpreted kernels take CPU tensors, compiled ones CUDA tensors; either way "meta" is refused, saying why.
    layer = sn_ext.spectral_norm(nn.Linear(3, 4).to(DEVICE), backend="triton")
    layer.to("meta")
    with pytest.raises(backends.BackendUnavailable, match=r"'triton' backend cannot take .* on meta"):
        layer.weight


@pytest.mark.skipif(CUDA or CHILD, reason="the interpreter child runs only on machines without a GPU")
def test_interpreter_run():
    """Runs this module's kernel tests and the "triton" cases of every per-op file in Triton's CPU interpreter, in one
    child process (see the docstring)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    env.pop("SN_EXT_BACKEND", None)
    # The child runs in tests/: the sn_ext beside it, not another checkout's that an editable install points to.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
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
            "-k",
            "triton",
            *PER_OP_FILES,
            os.path.basename(__file__),
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


# The in-place forward as torch.compile's AOTAutograd traces it, without a GPU: fake CUDA tensors (nothing runs), the
# kernels loaded for a GPU. On a GPU, test_torch_compile_sees_the_triton_kernels compiles and runs it.
TRACE_SCRIPT = textwrap.dedent("""
    import torch, sn_ext.triton as sn_triton
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    loaded, reason = sn_triton.load()
    if not loaded or sn_triton.interpreted():
        print("SKIP the kernels are not loaded for a GPU:", reason)
        raise SystemExit
    graphs = []
    op = torch.ops.sn_ext.triton_spectral_normalize_.default
    def f(weight, u, v):
        return op(weight, u, v, 0, 1, 1e-12, False)[0] * 2
    with FakeTensorMode():
        weight = torch.empty(30, 20, device="cuda")
        u, v = torch.empty(30, device="cuda"), torch.empty(20, device="cuda")
        try:
            aot_function(f, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(weight, u, v)
        except RuntimeError as error:
            if "active drivers" not in str(error):
                raise
            print("SKIP this torch's wrap_triton tracing needs a GPU driver:", error)
            raise SystemExit
    print(graphs[0].code)
""")


@pytest.mark.skipif(CUDA or CHILD, reason="traced without a GPU (once, not in the child)")
def test_compile_traces_the_in_place_forward_without_gpu():
    """The Triton forward mutates u and v (mutates_args): AOTAutograd functionalizes its launch and hands the new u,
    v back as updated graph inputs, so torch.compile(fullgraph=True) keeps the kernels and the in-place update."""
    code = _run_for_gpu(["-c", TRACE_SCRIPT])
    assert "triton_kernel_wrapper_functional" in code, code
    assert "['u_ptr']" in code and "['v_ptr']" in code, code  # u, v come back as mutated inputs
