"""sn_ext::power_iteration_ (n rounds in place on u, v; returns sigma) on every backend (tests/op_cases.py; ids start
with the backend, and a backend that cannot run here skips, saying why): the same rounds, bit for bit, as
spectral_normalize_'s, written in place (through the strides of strided vectors, nothing outside them), against the
reference, and opcheck. n = 0 and degenerate weights: in test_spectral_normalize.py, with spectral_normalize_.
"""

import pytest
import torch
from helpers import assert_rel, randn, unit
from op_cases import (
    BACKEND_TOL,
    CPU_OPCHECK,
    CUDA_OPCHECK,
    CUDA_SMALL,
    CUDA_SPLIT,
    DEVICE,
    DTYPES,
    EPS,
    NO_TRITON_OP,
    VF,
    cpu_case,
    cpu_round_grid,
    dtype_id,
    forward,
    matrix_size,
    not_run,
    param,
    power_iteration_op,
    vectors,
)

from sn_ext import reference


def _params():
    # cpu, reference: contiguous vectors (seed 20 + n); cuda: strided ones
    return (
        [param(b, c, False, dt, n, vf, id=i) for b in ("cpu", "reference") for c, dt, n, vf, i in cpu_round_grid()]
        + [
            param("cuda", c, True, dt, n, vf, id=f"{c.id}-{dtype_id(dt)}-{n}-{VF[vf]}")
            for c in CUDA_SMALL + CUDA_SPLIT[:2]
            for dt in DTYPES
            for n in (0, 1, 2)
            for vf in (False, True)
        ]
        + [not_run("triton", NO_TRITON_OP, 5)]
    )


@pytest.mark.parametrize("backend,case,strided,dtype,n,v_first", _params())
def test_matches_spectral_normalize(backend, case, strided, dtype, n, v_first):
    """The same rounds as spectral_normalize_, so the same bits, written into u and v in place."""
    _, make, dim = case
    device = DEVICE[backend]
    weight = make(dtype, device)
    if strided:  # views into larger vectors: the write-back goes through their strides
        h, w = matrix_size(weight, dim)
        u = unit(2 * h, dtype, seed=20, device=device)[::2]
        v = unit(3 * w, dtype, seed=21, device=device)[1::3]
    else:
        u, v = vectors(weight, dim, seed=20 + n)
    _, sigma_f, u_f, v_f = forward(backend)(weight, u, v, dim, n, EPS, v_first)
    u0, v0 = u.clone(), v.clone()
    u_in, v_in = (u, v) if strided else (u.clone(), v.clone())
    bases = (u_in._base.clone(), v_in._base.clone()) if strided else None
    ptr_u, ptr_v = u_in.data_ptr(), v_in.data_ptr()
    sigma = power_iteration_op(backend)(weight, u_in, v_in, dim, n, EPS, v_first)
    assert u_in.data_ptr() == ptr_u and v_in.data_ptr() == ptr_v
    assert sigma.dtype == sigma_f.dtype
    assert torch.equal(sigma, sigma_f)
    assert torch.equal(u_in, u_f) and torch.equal(v_in, v_f)
    if strided:  # elements of the base tensors outside the views are untouched
        mask_u = torch.ones(2 * h, dtype=torch.bool, device=device)
        mask_u[::2] = False
        mask_v = torch.ones(3 * w, dtype=torch.bool, device=device)
        mask_v[1::3] = False
        assert torch.equal(u._base[mask_u], bases[0][mask_u]) and torch.equal(v._base[mask_v], bases[1][mask_v])
    if n == 0:
        assert torch.equal(u_in, u0) and torch.equal(v_in, v0)
    if backend in ("cpu", "reference"):
        tol = BACKEND_TOL[backend][dtype]
        u_ref, v_ref = u0.clone(), v0.clone()
        s_ref = reference.power_iteration_(weight, u_ref, v_ref, dim, n, EPS, v_first)
        assert_rel(sigma, s_ref, tol, "power_iteration_ sigma vs reference")
        assert_rel(u_in, u_ref, tol, "power_iteration_ u vs reference")


@pytest.mark.parametrize("backend", [param(b, id="5x7") for b in ("cpu", "reference")])
def test_writes_strided_vectors(backend):
    # u and v that are strided views are updated in place, through their strides.
    _, make, dim = cpu_case("contiguous", seed=3)
    weight = make(torch.float32, "cpu")
    u_store, v_store = randn(10, seed=1), randn(14, seed=2)
    u, v = u_store[::2], v_store[::2]
    with torch.no_grad():
        u /= u.norm()
        v /= v.norm()
    u0, v0 = u.clone(), v.clone()
    odd_u, odd_v = u_store[1::2].clone(), v_store[1::2].clone()
    sigma = power_iteration_op(backend)(weight, u, v, dim, 2, EPS)
    expected = forward(backend)(weight, u0, v0, dim, 2, EPS)
    assert torch.equal(u, expected[2]) and torch.equal(v, expected[3]) and torch.equal(sigma, expected[1])
    assert torch.equal(u_store[1::2], odd_u) and torch.equal(v_store[1::2], odd_v), "wrote outside the view"


def _opcheck_params():
    return (
        [param("cpu", cpu_case(layout, seed=0), dt, id=f"{dtype_id(dt)}-{layout}") for dt, layout in CPU_OPCHECK]
        + [param("cuda", c, dt, id=f"{c.id}-{dtype_id(dt)}") for c, dt in CUDA_OPCHECK]
        + [not_run("triton", NO_TRITON_OP, 2)]
    )


@pytest.mark.parametrize("backend,case,dtype", _opcheck_params())
def test_opcheck(backend, case, dtype):
    _, make, dim = case
    weight = make(dtype, DEVICE[backend])
    u, v = vectors(weight, dim, seed=10)
    torch.library.opcheck(power_iteration_op(backend), (weight, u.clone(), v.clone(), dim, 2, EPS, False))
