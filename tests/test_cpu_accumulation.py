"""The CPU kernels' sums (csrc/cpu/common.h, power_iteration.h) against float64 oracles on fresh random inputs.

The kernels' dot products multiply a weight by a vector element of its dtype exactly (float32 in double, float16 and
bfloat16 in float: lane_t in common.h), so only the sums round; W^T y sums in the same types (float for the 2-byte
dtypes, as torch's own matrix-vector products accumulate). Their error against float64 must stay within max(TOL, 2 x
torch's own error in the weight's dtype) on every case, ill-conditioned ones included. The case that caught float32
sums (branch cpu-float32-sums, d88e3c1, reverted) is here: n_power_iterations = 0 on tiny weights such as 3x3x3x3,
with u chosen so that sigma = u^T W v cancels; float sums of float32 products there reached 4.2x torch's error
(float sums of bfloat16 products stay far inside bfloat16's). The row blocks (4 rows per sweep, 8 double or 16 float
lanes per row) must also give the same bits on 1 and 2 threads.
"""

import numpy as np
import pytest
import torch
from helpers import TOL, numpy_matrix, numpy_power_iteration, randn, unit
from op_cases import EPS

from sn_ext import _library

ops = torch.ops.sn_ext
pytestmark = pytest.mark.skipif(not _library.has_compiled_kernel("CPU"), reason="tests the compiled CPU kernels")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _dense(*shape):
    return lambda dtype, seed: randn(*shape, dtype=dtype, seed=seed)


def _transposed(rows, cols):  # the matrix's rows are strided: s_inner != 1
    return lambda dtype, seed: randn(cols, rows, dtype=dtype, seed=seed).t()


def _every_other_column(rows, cols):
    return lambda dtype, seed: randn(rows, 2 * cols, dtype=dtype, seed=seed)[:, ::2]


def _channels_last(*shape):
    return lambda dtype, seed: randn(*shape, dtype=dtype, seed=seed).to(memory_format=torch.channels_last)


# (id, make(dtype, seed) -> weight, dim): tiny, 1xN, Nx1, wide, tall, row counts off the 4-row blocks, row lengths off
# the 8 and 16 lanes, several row partitions, dim != 0, non-contiguous and channels_last views.
CASES = [
    ("3x3x3x3", _dense(3, 3, 3, 3), 0),
    ("1x37", _dense(1, 37), 0),
    ("37x1", _dense(37, 1), 0),
    ("2x7001_wide", _dense(2, 7001), 0),
    ("4099x5_tall", _dense(4099, 5), 0),
    ("67x99", _dense(67, 99), 0),
    ("301x2003", _dense(301, 2003), 0),  # matvec_and_gram: 9 row partitions of 34 rows, the last one short
    ("65x33x3x3_dim1", _dense(65, 33, 3, 3), 1),
    ("257x35_transposed", _transposed(257, 35), 0),
    ("40x600_strided", _every_other_column(40, 600), 0),
    ("17x9x5x5_channels_last", _channels_last(17, 9, 5, 5), 0),
]
IDS = [case[0] for case in CASES]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _torch_sigma(mat, u, v):
    """sigma as torch computes it in eval mode (n = 0), in the weight's dtype: u . (W v)."""
    return torch.dot(u, torch.mv(mat, v))


def _cancelling_u(mat64, v64, seed):
    """A unit u nearly orthogonal to W v: sigma = u^T W v is about 1e-3 of its terms' magnitude."""
    u = randn(mat64.shape[0], dtype=torch.float64, seed=seed)
    y = mat64 @ v64
    if y.norm() > 0 and mat64.shape[0] > 1:
        u = u - (u @ y) / (y @ y) * y * (1 - 1e-3)
    return u / u.norm()


@pytest.mark.parametrize("cancel", [False, True], ids=["random_u", "cancelling_u"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_sigma_within_twice_torch_error(case, dtype, cancel):
    # Bound: |sigma - exact| <= max(TOL * |exact|, 2 * |torch's sigma - exact|) on each of 20 fresh inputs. Float32
    # sums failed this on the cancelling 3x3x3x3 inputs; double sums of exact products leave only the final
    # rounding of sigma to the dtype. (Float64 weights: the float64 oracle is no more precise than the kernel, so
    # TOL relative to |u|^T |W| |v|.)
    _, make, dim = case
    for seed in range(20):
        weight = make(dtype, seed)
        mat64 = torch.from_numpy(numpy_matrix(weight, dim))
        v = unit(mat64.shape[1], dtype, 1000 + seed)
        u64 = _cancelling_u(mat64, v.double(), 2000 + seed) if cancel else unit(mat64.shape[0], torch.float64, seed)
        u = u64.to(dtype)
        exact = float(u.double() @ mat64 @ v.double())
        sigma = ops.power_iteration_(weight, u.clone(), v.clone(), dim, 0, EPS, False).item()
        theirs = _torch_sigma(mat64.to(dtype), u, v).double().item()
        bound = max(TOL[dtype] * abs(exact), 2 * abs(theirs - exact))
        if dtype == torch.float64:  # the oracle rounds like the kernel: TOL relative to the terms' magnitude
            bound = TOL[dtype] * float(u.double().abs() @ mat64.abs() @ v.double().abs())
        assert abs(sigma - exact) <= bound, f"seed {seed}: error {abs(sigma - exact):.3e} > {bound:.3e}"


@pytest.mark.parametrize("v_first", [False, True], ids=["u_first", "v_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_power_iteration_matches_float64(case, dtype, v_first):
    # One round (matvec_and_gram for u-first, rmatvec then matvec for v-first): relative error <= TOL; the vectors
    # are rounded to the dtype between half-steps, as torch does, so this is the rounding of the results.
    _, make, dim = case
    weight = make(dtype, 7)
    mat = numpy_matrix(weight, dim)
    u, v = unit(mat.shape[0], dtype, 8), unit(mat.shape[1], dtype, 9)
    u_new, v_new = u.clone(), v.clone()
    sigma = ops.power_iteration_(weight, u_new, v_new, dim, 1, EPS, v_first)
    want = numpy_power_iteration(mat, u.double().numpy(), v.double().numpy(), 1, EPS, v_first)
    for name, ours, theirs in zip(("sigma", "u", "v"), (sigma, u_new, v_new), want):
        err = np.abs(ours.double().numpy() - theirs).max() / np.abs(theirs).max()
        # u and v are rounded to the dtype: half a unit in the last place of their largest element at most.
        tol = TOL[dtype] if name == "sigma" else max(TOL[dtype], torch.finfo(dtype).eps)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("shape", [(301, 2003), (1030, 130), (96, 64, 3, 3)], ids=str)
def test_same_bits_for_any_thread_count(shape, dtype):
    # Big enough that matvec, rmatvec, matvec_and_gram and the backward split their work across 2 threads.
    weight = randn(*shape, dtype=dtype, seed=11)
    u, v = unit(shape[0], dtype, 12), unit(weight.numel() // shape[0], dtype, 13)
    grad = randn(*shape, dtype=dtype, seed=14)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = []
            for n, v_first in ((0, False), (1, False), (1, True), (2, False)):
                runs += list(ops.spectral_normalize_(weight, u.clone(), v.clone(), 0, n, EPS, v_first))
            runs.append(ops.spectral_normalize_backward(grad, runs[0], runs[2], runs[3], runs[1], 0))
            results.append(runs)
    finally:
        torch.set_num_threads(saved)
    for one, two in zip(*results):
        assert torch.equal(one, two), "a result depends on the thread count"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
def test_same_bits_for_contiguous_and_strided_rows(dtype):
    # Contiguous float32 and bfloat16 rows go through dot_rows' AVX2 loop, strided rows (and float16) through the
    # generic loops: both must add the same lanes in the same order, so every result is equal bit for bit.
    rows, cols = 67, 1003  # off the 4-row blocks and the 8 or 16 lanes
    dense = randn(rows, cols, dtype=dtype, seed=21)
    strided = torch.zeros(rows, 2 * cols, dtype=dtype)[:, ::2]
    strided.copy_(dense)
    u, v = unit(rows, dtype, 22), unit(cols, dtype, 23)
    for n, v_first in ((0, False), (1, False), (1, True)):
        ours = ops.spectral_normalize_(dense, u.clone(), v.clone(), 0, n, EPS, v_first)
        theirs = ops.spectral_normalize_(strided, u.clone(), v.clone(), 0, n, EPS, v_first)
        for name, a, b in zip(("weight_sn", "sigma", "u", "v"), ours, theirs):
            assert torch.equal(a, b), f"n={n}, v_first={v_first}: {name} depends on the row stride"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_outputs_of_32_mib_or_more(dtype):
    # glibc maps outputs of 32 MiB or more afresh on every call (untouched pages): the forward's W / sigma and the
    # backward's gradient must still hold every value (torch's formulas, one rounding), the largest rows included.
    rows, cols = 4100, (32 << 20) // (4100 * dtype.itemsize) + 1
    weight = randn(rows, cols, dtype=dtype, seed=31)
    u, v = unit(rows, dtype, 32), unit(cols, dtype, 33)
    weight_sn, sigma, u_used, v_used = ops.spectral_normalize_(weight, u, v, 0, 0, EPS, False)
    assert weight_sn.untyped_storage().nbytes() >= 32 << 20
    want = (weight.float() / sigma).to(dtype)
    torch.testing.assert_close(weight_sn, want, rtol=torch.finfo(dtype).eps, atol=0)
    grad = randn(rows, cols, dtype=dtype, seed=34)
    lam = (grad.double() * weight_sn.double()).sum()
    want = ((grad.double() - lam * torch.outer(u_used.double(), v_used.double())) / sigma.double()).to(dtype)
    got = ops.spectral_normalize_backward(grad, weight_sn, u_used, v_used, sigma, 0)
    torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-6 * float(want.abs().max()))
