"""How the CUDA kernels launch (csrc/cuda/launch.h, common.cuh): cooperative and phased launches give the same bits,
both capture into a CUDA graph, the one-block size class gives a layer the same bits as a multi-block launch of its
group, grouped launches chunk, a layer's forward is one launch, SN_EXT_CUDA_LAUNCH is checked, and the round modes
(SN_EXT_CUDA_ROUND: fused, split, split-scalar) all agree with the CPU kernels. Needs a GPU and a CUDA build of sn_ext.
A test that runs a round mode on purpose has the mode in its id, so that benchmarks/gpu_check.sh can leave out a mode
that failed its check (-k "not <mode>")."""

import functools
import sys
from pathlib import Path

import pytest
import torch

import sn_ext
import sn_ext.legacy
from sn_ext import _library, ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu_smoke  # noqa: E402
from benchmarks.gpu_smoke import launch_mode, round_mode  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _library.has_compiled_kernel("CUDA")),
    reason="needs a CUDA device and sn_ext built with its CUDA kernels",
)

DEVICE = "cuda"
EPS = 1e-12
MODES = ("cooperative", "phased")
# A dense layer (one block: the device-time model finds it faster than a grid), mid-size layers (a grid sized by
# their work), and a short-and-wide one (dense: one row).
SHAPES = [(64, 3, 3, 3), (128, 128, 3, 3), (257, 129, 3), (1, 100003)]


def _weight(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def skip_without_cooperative_launch():
    """A test that forces cooperative launches skips, saying why, on a device that has none (or refused one)."""
    problem = gpu_smoke.cooperative_problem()
    if problem:
        pytest.skip(f"SN_EXT_CUDA_LAUNCH=cooperative cannot run here: {problem}")


def _inputs(shape, seed=0, dtype=torch.float32):
    w, u, v, _ = gpu_smoke.inputs(shape, dtype, seed)
    return w.to(DEVICE), u.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("v_first", [False, True], ids=["u_first", "v_first"])
@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cooperative_and_phased_give_the_same_bits(shape, dtype, n, v_first):
    skip_without_cooperative_launch()
    cuda_inputs = [t.to(DEVICE) for t in gpu_smoke.inputs(shape, dtype)]
    results = {}
    for mode in MODES:
        with launch_mode(mode):
            results[mode] = gpu_smoke.all_ops(*cuda_inputs, n, v_first)
    for name, value in results["cooperative"].items():
        assert torch.equal(value, results["phased"][name]), name


def _group(count, dtype=torch.float32):
    shapes = [(16 + 8 * (i % 5), 3 + i % 4, 3, 3) for i in range(count)]
    weights, us, vs = zip(*(_inputs(s, seed=10 * i, dtype=dtype) for i, s in enumerate(shapes)))
    return list(weights), list(us), list(vs)


@pytest.mark.parametrize("count", [3, 12, 13, 30], ids=lambda c: f"{c}_layers")
def test_grouped_chunks_agree_with_per_layer_launches(count):
    """Up to 12 layers per grouped launch (a 4 KB parameter block), more in several: every layer's bits equal its
    per-layer launch's, in both launch modes."""
    skip_without_cooperative_launch()
    weights, us, vs = _group(count)
    for mode in MODES:
        with launch_mode(mode):
            us_g, vs_g = [u.clone() for u in us], [v.clone() for v in vs]
            weights_sn, sigmas, us_used, vs_used = ops.spectral_normalize_grouped_(
                weights, us_g, vs_g, [0] * count, 1, EPS
            )
            grads = [_weight(w.shape, 50 + i) for i, w in enumerate(weights)]
            grads_w = ops.spectral_normalize_grouped_backward(grads, weights_sn, us_used, vs_used, sigmas, [0] * count)
            for i in range(count):
                w_sn, sigma, u_new, v_new = ops.spectral_normalize_(weights[i], us[i].clone(), vs[i].clone(), 0, 1, EPS)
                assert torch.equal(w_sn, weights_sn[i]) and torch.equal(sigma, sigmas[i]), (mode, i)
                assert torch.equal(u_new, us_g[i]) and torch.equal(v_new, vs_g[i]), (mode, i)
                grad = ops.spectral_normalize_backward(grads[i], w_sn, u_new, v_new, sigma, 0)
                assert torch.equal(grad, grads_w[i]), (mode, i)


def test_one_block_layer_has_the_bits_of_a_multi_block_launch():
    """A small layer alone runs in one block (dense); grouped with a large layer, on a grid of many: same bits."""
    small, big = (64, 3, 3, 3), (512, 256, 3, 3)
    (w1, w2), (u1, u2), (v1, v2) = zip(_inputs(small, 1), _inputs(big, 2))
    alone = ops.spectral_normalize_(w1, u1.clone(), v1.clone(), 0, 1, EPS)
    grouped = ops.spectral_normalize_grouped_([w1, w2], [u1.clone(), u2], [v1.clone(), v2], [0, 0], 1, EPS)
    assert torch.equal(alone[0], grouped[0][0]) and torch.equal(alone[1], grouped[1][0])


@pytest.mark.parametrize("mode", [*MODES, "auto"])
def test_graph_capture_and_replay(mode):
    """In auto mode too: the eager call before the capture proves the cooperative launch, which the capture then
    uses (csrc/cuda/launch.h); a refusal there would have invalidated the capture."""
    if mode == "cooperative":
        skip_without_cooperative_launch()
    shape = (256, 128, 3, 3)
    w, u0, v0 = _inputs(shape)
    u, v = u0.clone(), v0.clone()
    g = _weight(shape, 5)
    with launch_mode(mode):

        def step():  # from the same vectors every time (the op updates u, v in place)
            u.copy_(u0)
            v.copy_(v0)
            w_sn, sigma, u_new, v_new = ops.spectral_normalize_(w, u, v, 0, 1, EPS)
            return ops.spectral_normalize_backward(g, w_sn, u_new, v_new, sigma, 0), sigma

        eager_grad, eager_sigma = step()
        graph, (static_grad, static_sigma) = gpu_smoke.captured(step)
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_grad, eager_grad) and torch.equal(static_sigma, eager_sigma)


def _launches(call) -> int:
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not any(k in e.name.lower() for k in ("memcpy", "memset"))
    )


# Phases of a forward: fused rounds 2 per round (the pass over W | z summed) then the finish (u, v, sigma, W / sigma),
# v-first one pass more (W^T u | z summed | W v | the finish); split rounds 4 per round, then W / sigma.
@pytest.mark.parametrize(
    "round_,v_first,n,phased_launches",
    [("fused", False, 1, 3), ("fused", False, 2, 5), ("split", False, 1, 5), ("split", False, 2, 9)]
    + [("split-scalar", False, 1, 5), ("fused", True, 1, 4), ("fused", True, 2, 6), ("split-scalar", True, 2, 9)],
    ids=str,
)
def test_phased_launches_one_kernel_per_phase(round_, v_first, n, phased_launches):
    skip_without_cooperative_launch()
    w, u, v = _inputs((512, 512, 3, 3))
    with round_mode(round_):
        with launch_mode("cooperative"):
            assert _launches(lambda: ops.spectral_normalize_(w, u, v, 0, n, EPS, v_first)) == 1
        with launch_mode("phased"):
            assert _launches(lambda: ops.spectral_normalize_(w, u, v, 0, n, EPS, v_first)) == phased_launches
        small = _inputs((64, 3, 3, 3))
        with launch_mode("phased"):  # one block: one launch whatever the mode
            assert _launches(lambda: ops.spectral_normalize_(*small, 0, n, EPS, v_first)) == 1


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_module_forward_is_one_launch(legacy):
    """A spectral-norm layer's forward in train mode is one launch: the op updates u and v in place (no copies)."""
    layer = torch.nn.Linear(300, 200).to(DEVICE)
    if legacy:
        sn_ext.legacy.spectral_norm(layer)
        (hook,) = layer._forward_pre_hooks.values()
        assert _launches(lambda: hook.compute_weight(layer, do_power_iteration=True)) == 1
    else:
        sn_ext.spectral_norm(layer)
        assert _launches(lambda: layer.weight) == 1


_ROUND_CASES = list(gpu_smoke.round_cases())


@functools.cache
def _cpu_ops(case, n, v_first):
    """The CPU kernels' outputs for a round case, computed once for all round modes (gpu_check.sh's test step has a
    time budget)."""
    return gpu_smoke.all_ops(*_ROUND_CASES[case][2]("cpu"), n, v_first)


@pytest.mark.parametrize("n,v_first", gpu_smoke.ROUND_RUNS, ids=str)
@pytest.mark.parametrize("case", range(gpu_smoke.ROUND_CASES))
@pytest.mark.parametrize("round_", gpu_smoke.ROUND_MODES)
def test_round_modes_agree_with_the_cpu(round_, case, n, v_first):
    """Each path of the fused round and of the split round's loops (gpu_smoke.round_cases), in each round mode,
    u-first and v-first, against the CPU kernels; and the launch modes give the same bits."""
    name, dtype, make = _ROUND_CASES[case]
    expected = _cpu_ops(case, n, v_first)
    with round_mode(round_):
        got = gpu_smoke.all_ops(*make(DEVICE), n, v_first)
        with launch_mode("phased"):
            phased = gpu_smoke.all_ops(*make(DEVICE), n, v_first)
    for key, value in got.items():
        assert gpu_smoke._rel(value, expected[key]) <= gpu_smoke.DTYPES[dtype], (name, key)
        assert torch.equal(value, phased[key]), (name, key)


def test_round_mode_is_checked_and_reported():
    w, u, v = _inputs((512, 512, 3, 3))
    with round_mode("sideways"), pytest.raises(RuntimeError, match="SN_EXT_CUDA_ROUND must be fused, split or split-"):
        ops.spectral_normalize_(w, u, v, 0, 1, EPS)
    device = torch.cuda.current_device()
    for mode in gpu_smoke.ROUND_MODES:
        with round_mode(mode):
            assert _library.cuda_launch(device).endswith(f"u-first rounds {mode} (SN_EXT_CUDA_ROUND)")


def test_launch_mode_is_checked_and_reported():
    w, u, v = _inputs((512, 512, 3, 3))
    with launch_mode("sideways"), pytest.raises(RuntimeError, match="SN_EXT_CUDA_LAUNCH must be auto, cooperative"):
        ops.spectral_normalize_(w, u, v, 0, 1, EPS)
    device = torch.cuda.current_device()
    with launch_mode("phased"):
        assert _library.cuda_launch(device).startswith("phased (SN_EXT_CUDA_LAUNCH=phased)")
    with launch_mode("auto"):
        assert _library.cuda_launch(device).split()[0] in ("cooperative", "phased")
