"""The CPU kernels' sums (csrc/cpu/common.h, power_iteration.h): float accumulation for float32/float16/bfloat16
weights, blocked and pairwise, against float64 oracles on fresh random values.

- sigma = u^T W v (n = 0) within the error bound docs/guarantees.md states for a row's dot product;
- one round of power iteration (u-first, v-first) and the backward within TOL of float64, on sizes that cross the
  block (256), lane (16) and row-partition (32) boundaries, tall and wide weights, dim != 0, non-contiguous views;
- the same bits whatever the thread count (the splits depend on the shape only).
"""

import math

import numpy as np
import pytest
import torch
from helpers import TOL, numpy_matrix, numpy_power_iteration, randn, unit
from op_cases import EPS, numpy_backward

from sn_ext import _library

ops = torch.ops.sn_ext
pytestmark = pytest.mark.skipif(not _library.has_compiled_kernel("CPU"), reason="tests the compiled CPU kernels")

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# common.h's blocking: kLanes accumulators over blocks of kBlock elements.
LANES, BLOCK = 16, 256


def _dense(*shape, seed):
    return lambda dtype: randn(*shape, dtype=dtype, seed=seed)


def _transposed(rows, cols, seed):  # the matrix's rows are strided: s_inner != 1
    return lambda dtype: randn(cols, rows, dtype=dtype, seed=seed).t()


def _every_other_column(rows, cols, seed):
    return lambda dtype: randn(rows, 2 * cols, dtype=dtype, seed=seed)[:, ::2]


def _channels_last(*shape, seed):
    return lambda dtype: randn(*shape, dtype=dtype, seed=seed).to(memory_format=torch.channels_last)


# (id, make(dtype) -> weight, dim): odd sizes around the kernels' block boundaries.
CASES = [
    ("3x257", _dense(3, 257, seed=1), 0),
    ("33x4099", _dense(33, 4099, seed=2), 0),
    ("70x1500", _dense(70, 1500, seed=3), 0),  # 3 row partitions: fused on 1 thread, split by columns on 2
    ("4099x5_tall", _dense(4099, 5, seed=4), 0),
    ("2x70001_wide", _dense(2, 70001, seed=5), 0),
    ("65x33x3x3", _dense(65, 33, 3, 3, seed=6), 0),
    ("65x33x3x3_dim1", _dense(65, 33, 3, 3, seed=7), 1),
    ("257x35_transposed", _transposed(257, 35, seed=8), 0),
    ("40x600_strided", _every_other_column(40, 600, seed=9), 0),
    ("17x9x5x5_channels_last", _channels_last(17, 9, 5, 5, seed=10), 0),
]
IDS = [case[0] for case in CASES]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _inputs(make, dim, dtype, seed=20):
    weight = make(dtype)
    h = weight.shape[dim]
    return weight, unit(h, dtype, seed), unit(weight.numel() // h, dtype, seed + 1), dim


def _row_dot_roundings(weight, dim) -> int:
    """How many roundings a row's dot product goes through at most (docs/guarantees.md): kBlock / kLanes in a lane,
    log2(kLanes) adding the lanes, then the pairwise sums of a segment's blocks and of the row's segments."""
    outer = math.prod(weight.shape[:dim])
    inner = weight.numel() // (outer * weight.shape[dim])
    return (
        BLOCK // LANES
        + int(math.log2(LANES))
        + math.ceil(math.log2(math.ceil(inner / BLOCK)))
        + math.ceil(math.log2(outer))
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sigma_within_stated_bound(case, dtype):
    # n = 0 (eval): sigma = u^T (W v), W v summed in float. The bound: k roundings of float32 on the sum of the
    # terms' magnitudes |u|^T |W| |v|, plus the final rounding of sigma to float32.
    _, make, dim = case
    weight, u, v, dim = _inputs(make, dim, dtype)
    sigma = ops.power_iteration_(weight, u.clone(), v.clone(), dim, 0, EPS, False)
    mat = numpy_matrix(weight, dim)
    un, vn = u.double().numpy(), v.double().numpy()
    exact = un @ mat @ vn
    magnitude = abs(un) @ abs(mat) @ abs(vn)
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    k = _row_dot_roundings(weight, dim)
    bound = k * unit_roundoff / (1 - k * unit_roundoff) * magnitude + unit_roundoff * abs(exact)
    assert abs(sigma.item() - exact) <= bound, f"|error| {abs(sigma.item() - exact):.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("v_first", [False, True], ids=["u_first", "v_first"])
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_power_iteration_matches_float64(case, dtype, v_first):
    _, make, dim = case
    weight, u, v, dim = _inputs(make, dim, dtype)
    u_new, v_new = u.clone(), v.clone()
    sigma = ops.power_iteration_(weight, u_new, v_new, dim, 1, EPS, v_first)
    want = numpy_power_iteration(numpy_matrix(weight, dim), u.double().numpy(), v.double().numpy(), 1, EPS, v_first)
    for name, ours, theirs in zip(("sigma", "u", "v"), (sigma, u_new, v_new), want):
        err = np.abs(ours.double().numpy() - theirs).max() / np.abs(theirs).max()
        assert err <= TOL[dtype], f"{name}: relative error {err:.3e} > {TOL[dtype]:.1e}"


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_float64(case, dtype):
    # <G, W_sn> is a sum over the whole weight: the longest sum the kernels do.
    _, make, dim = case
    weight, u, v, dim = _inputs(make, dim, dtype)
    grad = randn(*weight.shape, dtype=dtype, seed=30)
    sigma = torch.tensor(1.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    weight_sn = (weight / sigma).to(dtype)
    ours = ops.spectral_normalize_backward(grad, weight_sn, u, v, sigma, dim)
    want = numpy_backward(grad, weight_sn, u, v, sigma.item(), dim)
    got = numpy_matrix(ours, dim)
    err = abs(got - want).max() / abs(want).max()
    assert err <= TOL[dtype], f"grad_W: relative error {err:.3e} > {TOL[dtype]:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_bits_for_any_thread_count(case, dtype):
    _, make, dim = case
    weight, u, v, dim = _inputs(make, dim, dtype)
    grad = randn(*weight.shape, dtype=dtype, seed=31)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = []
            for v_first in (False, True):
                u_new, v_new = u.clone(), v.clone()
                runs += [ops.power_iteration_(weight, u_new, v_new, dim, 1, EPS, v_first), u_new, v_new]
            runs.append(ops.spectral_normalize_backward(grad, weight, u, v, runs[0], dim))
            results.append(runs)
    finally:
        torch.set_num_threads(saved)
    for one, two in zip(*results):
        assert torch.equal(one, two), "a result depends on the thread count"
