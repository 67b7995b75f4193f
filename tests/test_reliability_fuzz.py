"""Property tests (hypothesis) over shape (1-4 dims, sizes 1..9), dim, dtype (float32/float64), n_power_iterations
(1..3), eps, memory layout (contiguous, transposed, sliced, permuted views) and train/eval/update sequences:

- the dispatcher ops (the compiled kernels, or the reference with SN_EXT_DISABLE_EXT=1) equal sn_ext.reference;
- sn_ext.spectral_norm equals torch.nn.utils.parametrizations.spectral_norm, and sn_ext.legacy.spectral_norm equals
  torch.nn.utils.spectral_norm, step by step (W_sn and its layout, u, v, gradients).

Deterministic in CI: derandomized (the examples depend only on the test's source), no example database, no
deadline. Run with HYPOTHESIS_PROFILE=sn_ext_explore for a longer, random search on a workstation.
"""

import copy
import os

import torch
from helpers import TOL, assert_rel, randn, sn_state, unit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import spectral_norm as torch_legacy_sn

import sn_ext
from sn_ext import _matrix, reference

settings.register_profile(
    "sn_ext_ci",
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "sn_ext_explore",
    max_examples=5000,
    derandomize=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "sn_ext_ci"))

ops = torch.ops.sn_ext
LAYOUTS = ["contiguous", "transposed", "sliced", "permuted"]
EPSILONS = [1e-12, 0.0, 1e-4, 0.5]


@st.composite
def weights(draw, min_dims=1):
    """(weight, dim, eps, n_power_iterations): a float weight of 1-4 dims, sizes 1..9, in some memory layout."""
    ndim = draw(st.integers(min_dims, 4))
    shape = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))
    if layout == "transposed":  # stored in the reverse order of its dims
        weight = randn(*reversed(shape), dtype=dtype, seed=seed).permute(*reversed(range(ndim)))
    elif layout == "sliced":  # every other element of the last dim: not dense
        weight = randn(*shape[:-1], 2 * shape[-1], dtype=dtype, seed=seed)[..., ::2]
    elif layout == "permuted":  # stored in a random order of its dims
        order = draw(st.permutations(range(ndim)))
        weight = randn(*[shape[d] for d in order], dtype=dtype, seed=seed).permute(
            *sorted(range(ndim), key=order.__getitem__)
        )
    else:
        weight = randn(*shape, dtype=dtype, seed=seed)
    assert list(weight.shape) == shape
    dim = draw(st.integers(-ndim, ndim - 1))
    return weight, dim, draw(st.sampled_from(EPSILONS)), draw(st.integers(1, 3))


def _assert_close(got, want, tol, scale, what):
    """max|got - want| <= tol * max(max|want|, scale): relative, unless the result cancelled below `scale`, the size
    of the terms it was computed from (then an error relative to the result would measure only that cancellation)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(want.abs().max().item(), scale), f"{what}: error {err:.3e}, scale {scale:.3e}"


def _layout(t):
    """The strides that matter: those of dims longer than 1."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size > 1]


def _vectors(weight, dim, seed=7):
    h = weight.shape[dim]
    return unit(h, weight.dtype, seed), unit(weight.numel() // h, weight.dtype, seed + 1)


# ---------------------------------------------------------------------------------------------------------------
# The ops against sn_ext.reference


@PROFILE
@given(case=weights(), v_first=st.booleans(), data=st.data())
def test_ops_equal_reference(case, v_first, data):
    weight, dim, eps, n = case
    tol = TOL[weight.dtype]
    u, v = _vectors(weight, dim)
    got = ops.spectral_normalize_(weight, u.clone(), v.clone(), dim, n, eps, v_first)
    want = reference.spectral_normalize(weight, u, v, dim, n, eps, v_first)
    for g, w, what in zip(got, want, ("W_sn", "sigma", "u", "v")):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        assert_rel(g, w, tol, what)
    assert _layout(got[0]) == _layout(torch.empty_like(weight)), "W_sn must keep the weight's layout"
    u_in, v_in = u.clone(), v.clone()
    sigma = ops.power_iteration_(weight, u_in, v_in, dim, n, eps, v_first)
    assert torch.equal(sigma, got[1]) and torch.equal(u_in, got[2]) and torch.equal(v_in, got[3])
    grad = randn(*weight.shape, dtype=weight.dtype, seed=10**6 + data.draw(st.integers(0, 99), label="grad seed"))
    weight_sn, sigma = want[0], want[1]
    got_grad = ops.spectral_normalize_backward(grad, weight_sn, got[2], got[3], sigma, dim)
    want_grad = reference.spectral_normalize_backward(grad, weight_sn, got[2], got[3], sigma, dim)
    # (G - <G, W_sn> u v^T) / sigma may cancel (G nearly parallel to u v^T): errors scale with |G| / sigma.
    _assert_close(got_grad, want_grad, tol, grad.abs().max().item() / abs(sigma.item()), "backward")
    assert _layout(got_grad) == _layout(torch.empty_like(weight_sn))


# ---------------------------------------------------------------------------------------------------------------
# The modules against torch's


class _Holder(nn.Module):
    """A module whose only parameter is the given tensor, in its layout; calling it returns its weight."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x=None):
        return self.weight


def _pair(weight, dim, eps, n, legacy):
    base = _Holder(weight)
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    kwargs = dict(n_power_iterations=n, eps=eps, dim=dim)
    torch.manual_seed(1)
    if legacy:
        torch_legacy_sn(theirs, **{**kwargs, "dim": dim % weight.ndim})  # torch's legacy version needs dim >= 0
    else:
        torch_param.spectral_norm(theirs, **kwargs)
    torch.manual_seed(1)
    (sn_ext.legacy.spectral_norm if legacy else sn_ext.spectral_norm)(ours, **kwargs)
    if weight.ndim > 1 or legacy:  # equal start vectors (the warm-up rounds differently)
        with torch.no_grad():
            for o, t in zip(sn_state(ours, legacy=legacy), sn_state(theirs, legacy=legacy)):
                o.copy_(t)
    return theirs, ours


def _normalized_weight(module):
    return module()  # legacy: the pre-hook recomputes `weight`; parametrization: one access


def _sigma_condition(module, legacy: bool, dim: int) -> float:
    """How much rounding the sum sigma = u^T W v can amplify: sum |u_i W_ij v_j| / |u^T W v| for the vectors in use
    (1 when nothing cancels). Before a training step the legacy version's u, v are random, and sigma can nearly cancel
    (torch issue 51800): then W / sigma in float32 differs between two correct implementations by far more than
    float32's rounding of a well-conditioned sum."""
    original = module.weight_orig if legacy else module.parametrizations.weight.original
    if original.ndim == 1 and not legacy:
        return 1.0
    u, v = (t.detach().double() for t in sn_state(module, legacy=legacy))
    matrix = _matrix.to_matrix(original.detach().double(), dim % original.ndim)
    return max(1.0, (u.abs() @ matrix.abs() @ v.abs()).item() / abs((u @ matrix @ v).item()))


@PROFILE
@given(
    case=weights(),
    legacy=st.booleans(),
    actions=st.lists(st.sampled_from(["train", "eval", "update"]), min_size=1, max_size=5),
)
def test_module_equals_torch(case, legacy, actions):
    weight, dim, eps, n = case
    tol = TOL[weight.dtype]
    theirs, ours = _pair(weight, dim, eps, n, legacy)
    for step, action in enumerate(actions):
        if action == "update":  # an optimizer step: the same change to both weights
            change = 0.1 * randn(*weight.shape, dtype=weight.dtype, seed=100 + step)
            with torch.no_grad():
                for m in (theirs, ours):
                    (m.weight_orig if legacy else m.parametrizations.weight.original).add_(change)
            continue
        theirs.train(action == "train")
        ours.train(action == "train")
        w_t, w_o = _normalized_weight(theirs), _normalized_weight(ours)
        assert w_o.dtype == w_t.dtype and w_o.shape == w_t.shape
        assert _layout(w_o) == _layout(w_t), "W_sn must have the layout of torch's W / sigma"
        assert_rel(w_o, w_t, tol * _sigma_condition(theirs, legacy, dim), f"W_sn at step {step} ({action})")
        if weight.ndim > 1 or legacy:
            for label, o, t in zip("uv", sn_state(ours, legacy=legacy), sn_state(theirs, legacy=legacy)):
                assert_rel(o, t, tol, f"{label} at step {step} ({action})")
    g = randn(*weight.shape, dtype=weight.dtype, seed=10**6)
    w_t = _normalized_weight(theirs)
    (w_t * g).sum().backward()
    (_normalized_weight(ours) * g).sum().backward()
    original_t = theirs.weight_orig if legacy else theirs.parametrizations.weight.original
    original_o = ours.weight_orig if legacy else ours.parametrizations.weight.original
    # The gradient (G - <G, W_sn> u v^T) / sigma may cancel: compare on the scale of G / sigma.
    sigma = original_t.abs().max().item() / w_t.abs().max().item()
    tol *= _sigma_condition(theirs, legacy, dim)
    _assert_close(original_o.grad, original_t.grad, tol, g.abs().max().item() / sigma, "gradient")
