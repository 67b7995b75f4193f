"""Backend-specific properties of the CUDA kernels (csrc/cuda): no host synchronisation, a side stream, CUDA-graph
capture and replay, one launch per op (per-layer and grouped), the argument checks on a CUDA tensor, and the
library's report. Op values are tested per op in test_<op>.py (test_power_iteration.py, test_spectral_normalize.py,
test_spectral_normalize_backward.py, test_spectral_normalize_grouped.py: their "cuda-..." cases).

Skipped without a CUDA device.
"""

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch
from helpers import randn, unit
from op_cases import EPS, grouped_layers, no_tf32, vectors
from torch import nn

import sn_ext
from sn_ext import _library, ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu_smoke  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    with no_tf32():
        yield


def test_no_host_synchronisation():
    weight = randn(64, 3, 3, 3, seed=50, device=DEVICE)
    u, v = vectors(weight, 0, seed=10)
    grad = randn(64, 3, 3, 3, seed=51, device=DEVICE)
    ops.spectral_normalize_(weight, u, v, 0, 1, EPS)  # warm-up (lazy initialisation may synchronise)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n in (0, 1, 3):
            w_sn, sigma, u_new, v_new = ops.spectral_normalize_(weight, u, v, 0, n, EPS)
            ops.spectral_normalize_backward(grad, w_sn, u_new, v_new, sigma, 0)
            ops.power_iteration_(weight, u, v, 0, n, EPS)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_side_stream():
    weight = randn(97, 4099, seed=53, device=DEVICE)
    u, v = vectors(weight, 0, seed=10)
    expected = ops.spectral_normalize_(weight, u.clone(), v.clone(), 0, 2, EPS)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.spectral_normalize_(weight, u.clone(), v.clone(), 0, 2, EPS)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_argument_checks():
    weight = randn(6, 5, seed=54, device=DEVICE)
    u, v = vectors(weight, 0, seed=10)
    with pytest.raises(ValueError, match="u must be a vector of size 6"):
        ops.spectral_normalize_(weight, u[:5], v, 0, 1, EPS)
    with pytest.raises(TypeError, match="must have the weight's dtype"):
        ops.spectral_normalize_(weight, u.double(), v, 0, 1, EPS)
    with pytest.raises(RuntimeError, match="must be on the weight's device"):
        ops.spectral_normalize_(weight, u.cpu(), v, 0, 1, EPS)
    with pytest.raises(IndexError, match="dim out of range"):
        ops.power_iteration_(weight, u, v, 2, 1, EPS)
    with pytest.raises(ValueError, match="n_power_iterations must be >= 0"):
        ops.power_iteration_(weight, u, v, 0, -1, EPS)
    with pytest.raises(TypeError, match="weight must be float16, bfloat16, float32 or float64"):
        ops.spectral_normalize_(weight.int(), u, v, 0, 1, EPS)
    w_sn, sigma, u_new, v_new = ops.spectral_normalize_(weight, u, v, 0, 1, EPS)
    with pytest.raises(ValueError, match="grad must have weight_sn's shape"):
        ops.spectral_normalize_backward(w_sn[:5], w_sn, u_new, v_new, sigma, 0)


def test_cuda_graph_capture_and_replay():
    # A train-mode forward + backward (power iteration, buffer update, W / sigma, the backward) captured once
    # and replayed; an eager copy of the module taking the same steps is the oracle.
    torch.manual_seed(100)
    module = sn_ext.spectral_norm(nn.Linear(48, 32)).to(DEVICE)
    x = randn(8, 48, seed=101, device=DEVICE)

    def step(m):
        out = m(x)
        (out * out).sum().backward()
        return out

    # Warm up on a side stream (as torch.cuda.graphs asks), then start both copies from the same state.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            module.zero_grad(set_to_none=True)
            step(module)
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(module)

    module.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(module)
    # Capturing records the kernels without running them: the buffers still hold the warm-up state, as eager's.
    sn_m, sn_e = module.parametrizations.weight[0], eager.parametrizations.weight[0]
    assert torch.equal(sn_m._u, sn_e._u) and torch.equal(sn_m._v, sn_e._v)
    for replay in range(3):
        graph.replay()
        eager.zero_grad(set_to_none=True)
        eager_out = step(eager)
        torch.cuda.synchronize()
        what = f"replay {replay}"
        torch.testing.assert_close(static_out, eager_out, msg=what)
        torch.testing.assert_close(sn_m._u, sn_e._u, msg=what)
        torch.testing.assert_close(sn_m._v, sn_e._v, msg=what)
        torch.testing.assert_close(
            module.parametrizations.weight.original.grad, eager.parametrizations.weight.original.grad, msg=what
        )
        torch.testing.assert_close(module.bias.grad, eager.bias.grad, msg=what)


def test_library_reports_cuda_backend():
    assert _library.has_compiled_kernel("CUDA"), "sn_ext._C was built without the CUDA kernels"
    assert sn_ext.info()["backends"]["cuda"]["usable"]


def _kernel_names(prof) -> list[str]:
    return [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and "memcpy" not in e.name.lower()
        and "memset" not in e.name.lower()
    ]


@pytest.mark.parametrize(
    "shape,layout",
    [((64, 3, 3, 3), None), ((512, 512, 3, 3), None), ((1, 100003), None), ((256, 128, 3, 3), torch.channels_last)],
    ids=str,
)
def test_one_launch_per_op(shape, layout):
    """Each op is one persistent kernel, whatever the shape or n (csrc/cuda/<op>_cuda.cu), and reads a channels_last
    weight in place (no copy kernel)."""
    weight = randn(*shape, device=DEVICE)
    if layout is not None:
        weight = weight.to(memory_format=layout)
    u, v = unit(shape[0], seed=1, device=DEVICE), unit(weight[0].numel(), seed=2, device=DEVICE)
    u_buffer, v_buffer = u.clone(), v.clone()
    calls = {
        "spectral_normalize_": lambda: ops.spectral_normalize_(weight, u_buffer, v_buffer, 0, 2, EPS),
        "power_iteration_": lambda: ops.power_iteration_(weight, u_buffer, v_buffer, 0, 1, EPS),
        "spectral_normalize_backward": lambda: ops.spectral_normalize_backward(
            weight, weight, u, v, torch.tensor(1.5, device=DEVICE), 0
        ),
    }
    # The fused round reads a channels_last weight in place; the split rounds (the fallback) copy it.
    with gpu_smoke.round_mode("fused") if layout is not None else contextlib.nullcontext():
        for name, call in calls.items():
            call()  # first-call work (occupancy query) outside the profile
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            kernels = _kernel_names(prof)
            assert len(kernels) == 1, (name, kernels)


# ---- grouped: one launch each way, CUDA graphs, no host synchronisation ----


def test_grouped_one_launch_forward_and_one_backward():
    weights, us, vs, dims = grouped_layers(torch.float32, "cuda")
    weights = [w.detach().requires_grad_() for w in weights]
    grads = [torch.randn_like(w) for w in weights]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        weights_sn, _, _, _ = ops.spectral_normalize_grouped_(weights, us, vs, dims, 1, EPS)
        torch.autograd.backward(weights_sn, grads)
        torch.cuda.synchronize()
    kernels = _kernel_names(prof)
    assert len(kernels) == 2, kernels
    assert "forward_kernel" in kernels[0] and "backward_kernel" in kernels[1], kernels


MIXED_ORDERS = [True, False, False, True]  # legacy (v-first) and parametrization (u-first) layers in one call


@pytest.mark.parametrize("round_,forward_launches", [("fused", 1), ("split", 2)])
def test_grouped_mixed_orders_forward_launches(round_, forward_launches):
    """The fused round runs layers of both power-iteration orders in one forward launch (each on its own schedule),
    the split round one per order; each writes its layers' sigmas in place (no gather); the backward, which has no
    order, is one launch."""
    weights, us, vs, dims = grouped_layers(torch.float32, "cuda")
    weights = [w.detach().requires_grad_() for w in weights]
    grads = [torch.randn_like(w) for w in weights]
    torch.cuda.synchronize()
    with gpu_smoke.round_mode(round_):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            weights_sn, _, _, _ = ops.spectral_normalize_grouped_(weights, us, vs, dims, 1, EPS, MIXED_ORDERS)
            torch.autograd.backward(weights_sn, grads)
            torch.cuda.synchronize()
    kernels = _kernel_names(prof)
    assert len(kernels) == forward_launches + 1, kernels
    assert sum("forward_kernel" in k for k in kernels) == forward_launches and "backward_kernel" in kernels[-1], kernels


@pytest.mark.parametrize("v_first", [None, MIXED_ORDERS], ids=["u_first", "mixed_orders"])
def test_grouped_no_host_synchronisation_and_cuda_graph_replay(v_first):
    weights, us, vs, dims = grouped_layers(torch.float32, "cuda")
    us_start, vs_start = [u.clone() for u in us], [v.clone() for v in vs]
    grads = [torch.randn_like(w) for w in weights]
    expected, _, _, _ = ops.spectral_normalize_grouped_(weights, us, vs, dims, 1, EPS, v_first)
    expected_grads = ops.spectral_normalize_grouped_backward(
        grads, expected, us, vs, torch.ones(len(weights), device="cuda"), dims
    )
    for u, u0 in zip(us, us_start):
        u.copy_(u0)
    for v, v0 in zip(vs, vs_start):
        v.copy_(v0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph asks
            ops.spectral_normalize_grouped_(
                weights, [u.clone() for u in us], [v.clone() for v in vs], dims, 1, EPS, v_first
            )
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got, _, _, _ = ops.spectral_normalize_grouped_(weights, us, vs, dims, 1, EPS, v_first)
            got_grads = ops.spectral_normalize_grouped_backward(
                grads, got, us, vs, torch.ones(len(weights), device="cuda"), dims
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for u, u0 in zip(us, us_start):  # capture does not run the kernels: start from the same vectors
        u.copy_(u0)
    for v, v0 in zip(vs, vs_start):
        v.copy_(v0)
    graph.replay()
    torch.cuda.synchronize()
    for i in range(len(weights)):
        assert torch.equal(got[i], expected[i]), f"W_sn {i}"
        assert torch.equal(got_grads[i], expected_grads[i]), f"grad {i}"
