"""The per-layer sn_ext ops (power_iteration_, spectral_normalize, spectral_normalize_backward) on CPU:
torch.library.opcheck, and values against sn_ext.reference and against an independent float64 numpy computation
(tolerance table keyed by dtype, tests/helpers.py TOL); the grouped ops are tested in tests/test_grouped.py."""

import numpy as np
import pytest
import torch
from helpers import TOL, assert_rel, numpy_matrix, numpy_power_iteration, randn, unit

from sn_ext import reference

ops = torch.ops.sn_ext
EPS = 1e-12


def _weight(layout: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, int]:
    """A random weight in the given memory layout, and the dim to normalize over."""
    if layout == "contiguous":
        return randn(5, 7, dtype=dtype, seed=seed), 0
    if layout == "transposed":  # a Linear weight stored as the transpose of a (in, out) tensor
        return randn(7, 5, dtype=dtype, seed=seed).t(), 0
    if layout == "channels_last":  # conv weight, dim 0: no (outer, rows, inner) view exists
        return randn(4, 3, 2, 3, dtype=dtype, seed=seed).to(memory_format=torch.channels_last), 0
    if layout == "slice":  # not dense: every other column
        return randn(5, 14, dtype=dtype, seed=seed)[:, ::2], 1
    if layout == "permuted":  # 3-D, permuted, dim=1
        return randn(3, 2, 5, dtype=dtype, seed=seed).permute(2, 0, 1), 1
    if layout == "conv_dim_neg":  # 4-D contiguous, negative dim
        return randn(3, 4, 2, 5, dtype=dtype, seed=seed), -3
    if layout == "column":  # N x 1
        return randn(11, 1, dtype=dtype, seed=seed), 0
    if layout == "row":  # 1 x N
        return randn(1, 13, dtype=dtype, seed=seed), 0
    if layout == "vector":  # 1-D
        return randn(9, dtype=dtype, seed=seed), 0
    raise ValueError(layout)


def _vectors(weight: torch.Tensor, dim: int, seed: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    h = weight.shape[dim]
    return unit(h, weight.dtype, seed), unit(weight.numel() // h, weight.dtype, seed + 1)


def _sigma_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


ALL_LAYOUTS = [
    "contiguous",
    "transposed",
    "channels_last",
    "slice",
    "permuted",
    "conv_dim_neg",
    "column",
    "row",
    "vector",
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# opcheck: every layout in float32, a few in the other dtypes (its checks pass for float16/bfloat16 too).
OPCHECK_CASES = (
    [(torch.float32, layout) for layout in ALL_LAYOUTS if layout not in ("row", "column")]
    + [(torch.float64, layout) for layout in ("contiguous", "permuted")]
    + [(torch.float16, "transposed"), (torch.bfloat16, "slice")]
)


@pytest.mark.parametrize("dtype,layout", OPCHECK_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_opcheck(dtype, layout):
    weight, dim = _weight(layout, dtype)
    u, v = _vectors(weight, dim)
    sigma = torch.tensor(1.3, dtype=_sigma_dtype(dtype), requires_grad=True)
    torch.library.opcheck(ops.power_iteration_.default, (weight, u.clone(), v.clone(), dim, 2, EPS, False))
    torch.library.opcheck(
        ops.spectral_normalize.default, (weight.detach().requires_grad_(), u, v, dim, 1, EPS, layout == "permuted")
    )
    grad = randn(*weight.shape, dtype=dtype, seed=5).requires_grad_()
    torch.library.opcheck(
        ops.spectral_normalize_backward.default, (grad, weight.detach().requires_grad_(), u, v, sigma, dim)
    )


def _oracle(weight, u, v, dim, n, v_first):
    """float64 numpy: (sigma, u, v, W_sn)."""
    mat = numpy_matrix(weight, dim)
    sigma, uo, vo = numpy_power_iteration(mat, u.double().numpy(), v.double().numpy(), n, EPS, v_first)
    return sigma, torch.from_numpy(uo), torch.from_numpy(vo), weight.double() / sigma


@pytest.mark.parametrize("v_first", [False, True], ids=["u_first", "v_first"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(
    "layout",
    ["contiguous", "transposed", "channels_last", "slice", "permuted", "conv_dim_neg", "column", "row", "vector"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spectral_normalize_values(dtype, layout, n, v_first):
    weight, dim = _weight(layout, dtype, seed=n)
    u, v = _vectors(weight, dim, seed=20 + n)
    u0, v0 = u.clone(), v.clone()
    tol = TOL[dtype]
    weight_sn, sigma, u_new, v_new = ops.spectral_normalize(weight, u, v, dim, n, EPS, v_first)
    assert torch.equal(u, u0) and torch.equal(v, v0), "spectral_normalize must not write its inputs"
    assert weight_sn.dtype == weight.dtype and weight_sn.shape == weight.shape
    assert weight_sn.stride() == torch.empty_like(weight).stride()
    assert sigma.dtype == _sigma_dtype(dtype) and sigma.shape == ()
    assert u_new.dtype == dtype and v_new.dtype == dtype

    s_o, u_o, v_o, w_o = _oracle(weight, u, v, dim, n, v_first)
    assert abs(sigma.item() - s_o) <= tol * s_o, f"sigma {sigma.item()} vs {s_o}"
    assert_rel(u_new, u_o, tol, "u vs float64")
    assert_rel(v_new, v_o, tol, "v vs float64")
    assert_rel(weight_sn, w_o, tol, "W_sn vs float64")

    r_sn, r_sigma, r_u, r_v = reference.spectral_normalize(weight, u, v, dim, n, EPS, v_first)
    assert_rel(weight_sn, r_sn, tol, "W_sn vs reference")
    assert_rel(sigma, r_sigma, tol, "sigma vs reference")
    assert_rel(u_new, r_u, tol, "u vs reference")
    assert_rel(v_new, r_v, tol, "v vs reference")

    # power_iteration_ does the same rounds, in place, and returns the same sigma.
    u_in, v_in = u.clone(), v.clone()
    ptr_u, ptr_v = u_in.data_ptr(), v_in.data_ptr()
    s_in = ops.power_iteration_(weight, u_in, v_in, dim, n, EPS, v_first)
    assert u_in.data_ptr() == ptr_u and v_in.data_ptr() == ptr_v
    assert torch.equal(u_in, u_new) and torch.equal(v_in, v_new)
    assert torch.equal(s_in, sigma)
    u_ref, v_ref = u.clone(), v.clone()
    s_ref = reference.power_iteration_(weight, u_ref, v_ref, dim, n, EPS, v_first)
    assert_rel(s_in, s_ref, tol, "power_iteration_ sigma vs reference")
    assert_rel(u_in, u_ref, tol, "power_iteration_ u vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_u_first_and_v_first_differ(dtype):
    # Far from converged (random u, v, one round), the two orders give different vectors: the flag is honoured.
    weight, dim = _weight("contiguous", dtype, seed=4)
    u, v = _vectors(weight, dim, seed=40)
    uf = ops.spectral_normalize(weight, u, v, dim, 1, EPS, False)
    vf = ops.spectral_normalize(weight, u, v, dim, 1, EPS, True)
    assert TOL[dtype] < (uf[2].double() - vf[2].double()).abs().max()
    assert TOL[dtype] < (uf[3].double() - vf[3].double()).abs().max()
    # v-first: the final v is N(W^T u_old) and the final u is N(W v); u-first: u = N(W v_old), v = N(W^T u).
    mat = torch.from_numpy(numpy_matrix(weight, dim))
    v_expected = torch.nn.functional.normalize(mat.T @ u.double(), dim=0)
    assert_rel(vf[3], v_expected, TOL[dtype], "v-first v")
    u_expected = torch.nn.functional.normalize(mat @ v.double(), dim=0)
    assert_rel(uf[2], u_expected, TOL[dtype], "u-first u")


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "permuted", "conv_dim_neg", "vector"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_iterations_sigma_is_u_w_v(dtype, layout):
    # n=0: no update, sigma = u^T W v for the given (not converged) u, v.
    weight, dim = _weight(layout, dtype, seed=7)
    u, v = _vectors(weight, dim, seed=70)
    u0, v0 = u.clone(), v.clone()
    expected = float(u.double().numpy() @ numpy_matrix(weight, dim) @ v.double().numpy())
    weight_sn, sigma, u_new, v_new = ops.spectral_normalize(weight, u, v, dim, 0, EPS)
    tol = TOL[dtype]
    assert abs(sigma.item() - expected) <= tol * abs(expected)
    assert torch.equal(u_new, u0) and torch.equal(v_new, v0)
    assert u_new.data_ptr() != u.data_ptr(), "u_new must be a fresh tensor"
    assert_rel(weight_sn, weight.double() / expected, tol, "W_sn")
    s = ops.power_iteration_(weight, u, v, dim, 0, EPS)
    assert torch.equal(u, u0) and torch.equal(v, v0)
    assert abs(s.item() - expected) <= tol * abs(expected)
    r = reference.spectral_normalize(weight, u, v, dim, 0, EPS)
    assert_rel(sigma, r[1], tol, "sigma vs reference")
    assert_rel(weight_sn, r[0], tol, "W_sn vs reference")


@pytest.mark.parametrize(
    "layout", ["contiguous", "transposed", "channels_last", "slice", "permuted", "conv_dim_neg", "vector"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_values(dtype, layout):
    weight_sn, dim = _weight(layout, dtype, seed=8)
    grad = randn(*weight_sn.shape, dtype=dtype, seed=9)
    u, v = _vectors(weight_sn, dim, seed=90)
    sigma = torch.tensor(2.3, dtype=_sigma_dtype(dtype))
    out = ops.spectral_normalize_backward(grad, weight_sn, u, v, sigma, dim)
    assert out.dtype == dtype and out.shape == weight_sn.shape
    assert out.stride() == torch.empty_like(weight_sn).stride()
    # float64 oracle: (G - <G, S> u v^T) / sigma, built in numpy on the matrix views.
    g, s = numpy_matrix(grad, dim), numpy_matrix(weight_sn, dim)
    un, vn = u.double().numpy(), v.double().numpy()
    expected_mat = (g - np.sum(g * s) * np.outer(un, vn)) / 2.3
    got_mat = numpy_matrix(out, dim)
    err = np.abs(got_mat - expected_mat).max() / np.abs(expected_mat).max()
    assert err <= TOL[dtype], f"backward vs float64: {err:.3e}"
    assert_rel(
        out,
        reference.spectral_normalize_backward(grad, weight_sn, u, v, sigma, dim),
        TOL[dtype],
        "backward vs reference",
    )


def test_power_iteration_writes_strided_vectors():
    # u and v that are strided views are updated in place, through their strides.
    weight, dim = _weight("contiguous", torch.float32, seed=3)
    u_store, v_store = randn(10, seed=1), randn(14, seed=2)
    u, v = u_store[::2], v_store[::2]
    with torch.no_grad():
        u /= u.norm()
        v /= v.norm()
    u0, v0 = u.clone(), v.clone()
    odd_u, odd_v = u_store[1::2].clone(), v_store[1::2].clone()
    sigma = ops.power_iteration_(weight, u, v, dim, 2, EPS)
    expected = ops.spectral_normalize(weight, u0, v0, dim, 2, EPS)
    assert torch.equal(u, expected[2]) and torch.equal(v, expected[3]) and torch.equal(sigma, expected[1])
    assert torch.equal(u_store[1::2], odd_u) and torch.equal(v_store[1::2], odd_v), "wrote outside the view"
