"""Mixed precision: CPU autocast (bfloat16, float16) and float16/bfloat16 modules.

- The ops run in the weight's dtype under autocast, with autocast off inside them: sigma in float32, W_sn and the
  new u, v in the weight's dtype, the same numbers as without autocast, double backward included.
- float16/bfloat16 weights: sums and sigma in float32 (or wider), so eps=1e-12 never underflows and a tiny-norm
  float16 weight gives a finite W_sn wherever the float32 math is finite (pytorch issue 32137).
- The flash-attention rule against a float64 oracle (torch's spectral norm on the same values in float64): sn_ext's
  error in a low-precision setting is at most twice torch's own error in the same setting, plus one rounding of
  the result's dtype (the least any result stored in that dtype can promise).
"""

import copy

import pytest
import torch
from helpers import CASES, TOL, assert_rel, make_input, make_pair, randn, rel_err, sn_state, unit
from torch import nn

import sn_ext

ops = torch.ops.sn_ext
LOW = [torch.float16, torch.bfloat16]
EPS = 1e-12
CASE_IDS = ["linear", "conv_transpose2d", "conv2d_n3_dim1"]
PRECISION_CASES = [c for c in CASES if c.id in CASE_IDS]


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _rounding(dtype: torch.dtype) -> float:
    """The unit roundoff of a dtype: half the distance from 1 to the next number."""
    return torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------------------------------------------------------
# The ops under autocast


def _op_inputs(dtype=torch.float32, dim=1):
    weight = randn(4, 6, 3, dtype=dtype, seed=1)
    h = weight.shape[dim]
    return weight, unit(h, dtype, 2), unit(weight.numel() // h, dtype, 3), dim


@pytest.mark.parametrize("autocast_dtype", LOW, ids=_dtype_id)
@pytest.mark.parametrize("v_first", [False, True], ids=["u_first", "v_first"])
def test_ops_run_in_weight_dtype_under_autocast(autocast_dtype, v_first):
    weight, u, v, dim = _op_inputs()
    plain = ops.spectral_normalize_(weight, u.clone(), v.clone(), dim, 3, EPS, v_first)
    with torch.autocast("cpu", dtype=autocast_dtype):
        inside = ops.spectral_normalize_(weight, u.clone(), v.clone(), dim, 3, EPS, v_first)
        u_in, v_in = u.clone(), v.clone()
        sigma_in = ops.power_iteration_(weight, u_in, v_in, dim, 3, EPS, v_first)
    assert [t.dtype for t in inside] == [torch.float32] * 4, "autocast must not change any output dtype"
    for got, want, what in zip(inside, plain, ("W_sn", "sigma", "u", "v")):
        assert torch.equal(got, want), f"{what} differs under autocast: the op must run as without it"
    assert sigma_in.dtype == torch.float32 and torch.equal(sigma_in, plain[1])
    assert torch.equal(u_in, plain[2]) and torch.equal(v_in, plain[3])


@pytest.mark.parametrize("autocast_dtype", LOW, ids=_dtype_id)
def test_backward_and_double_backward_under_autocast(autocast_dtype):
    weight, u, v, dim = _op_inputs(torch.float32)
    g_out = randn(*weight.shape, seed=4)
    h_in = randn(*weight.shape, seed=5)

    def grads():
        w = weight.clone().requires_grad_()
        weight_sn, sigma, _, _ = ops.spectral_normalize_(w, u, v, dim, 0, EPS)
        (g,) = torch.autograd.grad((weight_sn * g_out).sum() + 0.3 * sigma, w, create_graph=True)
        (gg,) = torch.autograd.grad((g * h_in).sum(), w)
        return g, gg

    want = grads()
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = grads()
    for a, b, what in zip(got, want, ("gradient", "double backward")):
        assert a.dtype == torch.float32
        assert_rel(a, b, TOL[torch.float32], f"{what} under autocast")


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
@pytest.mark.parametrize("name", ["power_iteration_", "spectral_normalize_", "spectral_normalize_backward"])
def test_every_op_has_an_autocast_kernel(name, key):
    # The registration behind the two tests above; CUDA autocast cannot run here, but uses the same kernel.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sn_ext::{name}", key)


# ---------------------------------------------------------------------------------------------------------------
# Modules: the flash-attention rule against a float64 oracle


def _steps(case, dtype, autocast: bool, legacy: bool, steps: int = 2):
    """torch's and sn_ext's module in the low-precision setting, and torch's in float64 on the same values.

    Returns {quantity: [(sn_ext error, torch error, dtype of the quantity)]} over train steps (then one eval
    step), each error normwise against the float64 oracle."""
    module_dtype = torch.float32 if autocast else dtype
    theirs, ours = make_pair(case, module_dtype, seed=3, legacy=legacy)
    with torch.no_grad():  # the same random start vectors (not the warmed-up ones), so the iterations do work
        for m in (theirs, ours):
            for i, b in enumerate(sn_state(m, case.name, legacy)):
                b.copy_(unit(b.numel(), b.dtype, seed=50 + i))
    oracle = copy.deepcopy(theirs).double()
    errors = {}
    for step in range(steps + 1):
        if step == steps:
            for m in (theirs, ours, oracle):
                m.eval()
        x = make_input(case, torch.float64, seed=step)
        results = []
        for m, low in ((ours, True), (theirs, True), (oracle, False)):
            xin = x.to(torch.float64 if not low else module_dtype)
            with torch.autocast("cpu", dtype=dtype, enabled=autocast and low):
                out = m(xin)
            (out * randn(*out.shape, dtype=torch.float64, seed=10 + step).to(out.dtype)).sum().backward()
            weight = m.weight_orig if legacy else m.parametrizations[case.name].original
            results.append(
                {
                    "output": out.detach(),
                    "grad": weight.grad.clone(),
                    "u": sn_state(m, case.name, legacy)[0].clone(),
                    "v": sn_state(m, case.name, legacy)[1].clone(),
                }
            )
            weight.grad = None
        ours_r, theirs_r, oracle_r = results
        for key in oracle_r:
            errors.setdefault(key, []).append(
                (rel_err(ours_r[key], oracle_r[key]), rel_err(theirs_r[key], oracle_r[key]), ours_r[key].dtype)
            )
    return errors


def _assert_flash_rule(errors, what):
    for key, rows in errors.items():
        for step, (ours, theirs, dtype) in enumerate(rows):
            bound = 2 * theirs + _rounding(dtype)
            assert ours <= bound, (
                f"{what}: {key} at step {step}: sn_ext's error {ours:.2e} > 2 x torch's "
                f"{theirs:.2e} + {_rounding(dtype):.1e}"
            )


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("case", PRECISION_CASES, ids=repr)
@pytest.mark.parametrize("dtype", LOW, ids=_dtype_id)
def test_low_precision_module_flash_rule(dtype, case, legacy):
    errors = _steps(case, dtype, autocast=False, legacy=legacy)
    assert all(rows[0][2] == dtype for key, rows in errors.items() if key != "grad")
    _assert_flash_rule(errors, f"{case.id} in {dtype}")


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("case", PRECISION_CASES, ids=repr)
@pytest.mark.parametrize("dtype", LOW, ids=_dtype_id)
def test_autocast_module_flash_rule(dtype, case, legacy):
    errors = _steps(case, dtype, autocast=True, legacy=legacy)
    # Spectral norm itself stays in float32 under autocast: u, v keep the weight's dtype (only the layer's
    # convolution / matmul runs in the autocast dtype).
    assert errors["u"][0][2] == errors["v"][0][2] == torch.float32
    _assert_flash_rule(errors, f"{case.id} under {dtype} autocast")


# ---------------------------------------------------------------------------------------------------------------
# eps and tiny weights in float16


def _tiny_weights():
    yield "scale_1e-5", randn(8, 16, seed=1) * 1e-5  # float16 subnormals and small normals
    yield "scale_1e-7", randn(8, 16, seed=2) * 1e-7  # float16 subnormals (and zeros)
    one = torch.zeros(8, 16)
    one[3, 5] = 2.0**-24  # the smallest float16 subnormal, alone
    yield "single_subnormal", one


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("name,weight", list(_tiny_weights()), ids=[n for n, _ in _tiny_weights()])
def test_tiny_float16_weight_is_finite_with_eps_1e_12(name, weight, legacy):
    weight16 = weight.half()
    assert weight16.any()
    exact64 = weight16.double()
    # The float32 math on the same values is finite: W / sigma with sigma = the largest singular value.
    expected = exact64 / torch.linalg.matrix_norm(exact64, 2)
    layer = nn.Linear(16, 8, bias=False).half()
    with torch.no_grad():
        layer.weight.copy_(weight16)
    torch.manual_seed(0)
    (sn_ext.legacy.spectral_norm if legacy else sn_ext.spectral_norm)(layer, n_power_iterations=30, eps=EPS)
    x = torch.eye(16, dtype=torch.float16)
    out = layer(x)  # W_sn^T, in train mode: 30 more power-iteration rounds
    for vector in sn_state(layer, legacy=legacy):
        assert torch.isfinite(vector).all() and abs(vector.double().norm().item() - 1) < 2e-3
    assert torch.isfinite(out).all(), "eps=1e-12 must not underflow in float16"
    assert_rel(out.t(), expected, TOL[torch.float16], f"{name}: W_sn vs float64")
    layer.eval()
    assert_rel(layer(x).t(), expected, TOL[torch.float16], f"{name}: eval W_sn vs float64")


@pytest.mark.parametrize("dtype", LOW, ids=_dtype_id)
def test_low_precision_sigma_is_float32(dtype):
    weight, u, v, dim = _op_inputs(dtype)
    weight_sn, sigma, u_new, v_new = ops.spectral_normalize_(weight * 1e-4, u.clone(), v.clone(), dim, 2, EPS)
    assert sigma.dtype == torch.float32 and weight_sn.dtype == u_new.dtype == v_new.dtype == dtype
    exact = weight.double() * 1e-4
    sigma64 = ops.spectral_normalize_(exact, u.double(), v.double(), dim, 2, EPS)[1]
    assert abs(sigma.item() - sigma64.item()) <= TOL[dtype] * sigma64.item()
