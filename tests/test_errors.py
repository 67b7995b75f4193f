"""Errors that name the bad argument (module level and op level, compiled kernels and reference alike), and the
documented degenerate behaviour: a zero or non-finite weight shows in W_sn but never poisons u and v."""

import copy
import math

import pytest
import torch
from helpers import CASES, make_input, randn, sn_state, unit
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import parametrize
from torch.nn.utils import spectral_norm as torch_legacy_sn

import sn_ext
from sn_ext import reference

REGISTER = {"parametrization": sn_ext.spectral_norm, "legacy": sn_ext.legacy.spectral_norm}
TORCH_REGISTER = {"parametrization": torch_param.spectral_norm, "legacy": torch_legacy_sn}


def _linear():
    torch.manual_seed(0)
    return nn.Linear(6, 4)


# ---------------------------------------------------------------------------------------------------------------
# Module level


def _int_weight_module(kind):
    module = nn.Module()
    weight = torch.randint(-3, 4, (4, 6))
    if kind == "legacy":  # the legacy version only takes parameters
        module.weight = nn.Parameter(weight, requires_grad=False)
    else:
        module.register_buffer("weight", weight)
    return module


@pytest.mark.parametrize("kind", list(REGISTER))
def test_integer_weight_is_a_type_error(kind):
    module = _int_weight_module(kind)
    with pytest.raises(TypeError, match=r"(?i)weight.*int64"):
        REGISTER[kind](module)
    assert not parametrize.is_parametrized(module) and not module._forward_pre_hooks


@pytest.mark.parametrize("n", [0, -1])
@pytest.mark.parametrize("kind", list(REGISTER))
def test_non_positive_iterations_is_a_value_error(kind, n):
    with pytest.raises(ValueError, match="n_power_iterations"):
        TORCH_REGISTER[kind](_linear(), n_power_iterations=n)  # torch's own type, for reference
    module = _linear()
    with pytest.raises(ValueError, match=f"n_power_iterations={n}"):
        REGISTER[kind](module, n_power_iterations=n)
    assert not parametrize.is_parametrized(module) and not module._forward_pre_hooks


@pytest.mark.parametrize("dim", [2, -3, 5])
@pytest.mark.parametrize("kind", list(REGISTER))
def test_dim_out_of_range_is_an_index_error(kind, dim):
    if kind == "parametrization":
        with pytest.raises(IndexError):
            TORCH_REGISTER[kind](_linear(), dim=dim)
    module = _linear()
    with pytest.raises(IndexError, match=rf"(?i)dim.*\[-2, 1\].*got {dim}"):
        REGISTER[kind](module, dim=dim)
    assert not parametrize.is_parametrized(module) and not module._forward_pre_hooks


@pytest.mark.parametrize("kind", list(REGISTER))
def test_missing_attribute_is_a_value_error(kind):
    with pytest.raises(ValueError, match="nope"):
        REGISTER[kind](_linear(), name="nope")
    if kind == "parametrization":
        with pytest.raises(ValueError, match="nope"):
            TORCH_REGISTER[kind](_linear(), name="nope")


def test_non_tensor_attribute_is_a_value_error():
    module = _linear()
    module.not_a_tensor = 3.0
    with pytest.raises(ValueError, match="not_a_tensor"):
        sn_ext.spectral_norm(module, name="not_a_tensor")


def test_registering_the_legacy_version_twice_is_a_runtime_error():
    # The parametrization version stacks instead, as torch's (tests/test_torch_compat.py).
    module = REGISTER["legacy"](_linear())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match="weight"):
        REGISTER["legacy"](module)
    after = module.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_legacy_twice_matches_torch_error():
    module = torch_legacy_sn(_linear())
    with pytest.raises(RuntimeError, match="two spectral_norm hooks"):
        torch_legacy_sn(module)
    module = sn_ext.legacy.spectral_norm(_linear())
    with pytest.raises(RuntimeError, match="two spectral_norm hooks"):
        sn_ext.legacy.spectral_norm(module)


def test_negative_eps_is_a_value_error():
    with pytest.raises(ValueError, match="eps"):
        sn_ext.spectral_norm(_linear(), eps=-1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Op level: the dispatcher op (the compiled kernel when it is loaded) and the reference, same errors.

IMPLS = {
    "op": (
        torch.ops.sn_ext.power_iteration_,
        torch.ops.sn_ext.spectral_normalize_,
        torch.ops.sn_ext.spectral_normalize_backward,
    ),
    "reference": (reference.power_iteration_, reference.spectral_normalize_, reference.spectral_normalize_backward),
}


def _good(dtype=torch.float32):
    weight = randn(4, 3, 2, dtype=dtype, seed=1)  # dim=1: h=3, w=8
    return weight, unit(3, dtype, 2), unit(8, dtype, 3)


FORWARD_BAD = {
    # name: (build args from the good ones, exception, pattern)
    "u_size": (lambda w, u, v: (w, unit(4), v, 1, 1, 1e-12), ValueError, r"\bu\b.*size 3"),
    "v_size": (lambda w, u, v: (w, u, unit(7), 1, 1, 1e-12), ValueError, r"\bv\b.*size 8"),
    "u_2d": (lambda w, u, v: (w, u.reshape(3, 1), v, 1, 1, 1e-12), ValueError, r"\bu\b"),
    "u_dtype": (lambda w, u, v: (w, u.double(), v, 1, 1, 1e-12), TypeError, r"\bu\b.*dtype"),
    "v_dtype": (lambda w, u, v: (w, u, v.half(), 1, 1, 1e-12), TypeError, r"\bv\b.*dtype"),
    "weight_int": (lambda w, u, v: (w.long(), u.long(), v.long(), 1, 1, 1e-12), TypeError, r"weight"),
    "negative_eps": (lambda w, u, v: (w, u, v, 1, 1, -1e-12), ValueError, r"eps"),
    "negative_n": (lambda w, u, v: (w, u, v, 1, -1, 1e-12), ValueError, r"n_power_iterations"),
    "dim_range": (lambda w, u, v: (w, u, v, 3, 1, 1e-12), IndexError, r"dim"),
    "empty": (lambda w, u, v: (torch.empty(0, 3), torch.empty(0), unit(3), 0, 1, 1e-12), ValueError, r"weight"),
    "weight_0d": (lambda w, u, v: (torch.tensor(1.5), unit(1), unit(1), 0, 1, 1e-12), ValueError, r"weight"),
    "weight_complex": (
        lambda w, u, v: (w.to(torch.complex64), u.to(torch.complex64), v.to(torch.complex64), 1, 1, 1e-12),
        TypeError,
        r"weight.*(?i:complex)",
    ),
    "nan_eps": (lambda w, u, v: (w, u, v, 1, 1, float("nan")), ValueError, r"eps.*nan"),
}


@pytest.mark.parametrize("bad", list(FORWARD_BAD))
@pytest.mark.parametrize("op_index", [0, 1], ids=["power_iteration_", "spectral_normalize_"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_op_errors(impl, op_index, bad):
    build, error, pattern = FORWARD_BAD[bad]
    args = build(*_good())
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(error, match=pattern):
        IMPLS[impl][op_index](*args)
    for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], before):
        assert torch.equal(a, b), "a failed call must not write its arguments"


def _good_backward(dtype=torch.float32):
    weight, u, v = _good(dtype)
    return randn(*weight.shape, dtype=dtype, seed=4), weight, u, v, torch.tensor(1.5)


BACKWARD_BAD = {
    "u_size": (lambda g, s, u, v, sig: (g, s, unit(2), v, sig, 1), ValueError, r"\bu\b.*size 3"),
    "v_size": (lambda g, s, u, v, sig: (g, s, u, unit(9), sig, 1), ValueError, r"\bv\b.*size 8"),
    "u_dtype": (lambda g, s, u, v, sig: (g, s, u.double(), v, sig, 1), TypeError, r"\bu\b.*dtype"),
    "grad_dtype": (lambda g, s, u, v, sig: (g.double(), s, u, v, sig, 1), TypeError, r"grad.*dtype"),
    "grad_shape": (lambda g, s, u, v, sig: (g.reshape(3, 4, 2), s, u, v, sig, 1), ValueError, r"grad.*shape"),
    "sigma_shape": (lambda g, s, u, v, sig: (g, s, u, v, torch.ones(2), 1), ValueError, r"sigma"),
    "dim_range": (lambda g, s, u, v, sig: (g, s, u, v, sig, -4), IndexError, r"dim"),
}


@pytest.mark.parametrize("bad", list(BACKWARD_BAD))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_backward_op_errors(impl, bad):
    build, error, pattern = BACKWARD_BAD[bad]
    with pytest.raises(error, match=pattern):
        IMPLS[impl][2](*build(*_good_backward()))


# The scaled forms' arguments (coeff, gamma): the forward and the scaled backward op, compiled and reference.

SCALED_IMPLS = {
    "op": (torch.ops.sn_ext.spectral_normalize_, torch.ops.sn_ext.spectral_normalize_scaled_backward),
    "reference": (reference.spectral_normalize_, reference.spectral_normalize_scaled_backward),
}
SCALING_BAD = {
    # name: ((coeff, gamma), exception, pattern)
    "coeff_zero": ((0.0, None), ValueError, r"coeff must be a positive finite number"),
    "coeff_negative": ((-1.0, None), ValueError, r"coeff must be a positive finite number"),
    "coeff_nan": ((float("nan"), None), ValueError, r"coeff must be a positive finite number"),
    "coeff_inf": ((float("inf"), None), ValueError, r"coeff must be a positive finite number"),
    "gamma_two_values": ((None, torch.ones(2)), ValueError, r"gamma must hold one value"),
    "gamma_int": ((None, torch.tensor(2)), TypeError, r"gamma must be float16, bfloat16, float32 or float64"),
    "gamma_device": ((None, torch.ones((), device="meta")), RuntimeError, r"gamma must be on the weight's device"),
}


@pytest.mark.parametrize("bad", list(SCALING_BAD))
@pytest.mark.parametrize("op_index", [0, 1], ids=["spectral_normalize_", "spectral_normalize_scaled_backward"])
@pytest.mark.parametrize("impl", list(SCALED_IMPLS))
def test_scaling_errors(impl, op_index, bad):
    (coeff, gamma), error, pattern = SCALING_BAD[bad]
    weight, u, v = _good()
    if op_index == 0:
        args = (weight, u, v, 1, 1, 1e-12, False, coeff, gamma, True)
    else:
        args = (torch.ones_like(weight), weight, u, v, torch.tensor(1.5), 1, coeff, gamma, True)
    before = [a.clone() for a in (u, v)]
    with pytest.raises(error, match=pattern):
        SCALED_IMPLS[impl][op_index](*args)
    assert all(torch.equal(a, b) for a, b in zip((u, v), before)), "a failed call must not write its arguments"


def test_scaled_form_of_complex_weight_is_a_type_error():
    weight, u, v = (t.to(torch.complex64) for t in _good())
    with pytest.raises(TypeError, match="coeff and gamma take real weights"):
        torch.ops.sn_ext.reference_spectral_normalize_(weight, u, v, 1, 1, 1e-12, False, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Degenerate weights


def _assert_unit_and_equal(vectors, before):
    for vec, vec0 in zip(vectors, before):
        assert torch.equal(vec, vec0), "u, v must be left as they were"
        assert torch.isfinite(vec).all()
        assert math.isclose(vec.double().norm().item(), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(REGISTER))
def test_zero_weight_gives_nan_and_keeps_vectors(kind, train):
    legacy = kind == "legacy"
    case = CASES[2]  # conv2d
    torch.manual_seed(0)
    module = REGISTER[kind](case.make())
    x = make_input(case, torch.float32)
    module(x)  # one normal step first
    module.train(train)
    before = [t.clone() for t in sn_state(module, legacy=legacy)]
    with torch.no_grad():
        (module.weight_orig if legacy else module.parametrizations.weight.original).zero_()
    for _ in range(2):
        out = module(x)
        assert torch.isnan(module.weight).all(), "0 / 0 must show as NaN in W_sn"
        assert torch.isnan(out).all()
        _assert_unit_and_equal(sn_state(module, legacy=legacy), before)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", list(REGISTER))
def test_non_finite_step_does_not_poison_vectors(kind, bad_value):
    legacy = kind == "legacy"
    case = CASES[2]  # conv2d
    torch.manual_seed(0)
    module = REGISTER[kind](case.make())
    twin = copy.deepcopy(module)  # never sees the bad step (deepcopy before a forward: torch's legacy needs it)
    x = make_input(case, torch.float32)
    module(x)
    twin(x)
    before = [t.clone() for t in sn_state(module, legacy=legacy)]
    weight = module.weight_orig if legacy else module.parametrizations.weight.original
    good = weight.detach().clone()
    with torch.no_grad():
        weight[1, 2, 0, 1] = bad_value
    out = module(x)
    assert not torch.isfinite(out).all(), "the bad step must show in the output"
    _assert_unit_and_equal(sn_state(module, legacy=legacy), before)
    with torch.no_grad():
        weight.copy_(good)
    out_restored, out_twin = module(x), twin(x)
    assert torch.equal(out_restored, out_twin), "after restoring the weight, the bad step must leave no trace"
    for a, b in zip(sn_state(module, legacy=legacy), sn_state(twin, legacy=legacy)):
        assert torch.equal(a, b)
    assert torch.equal(module.weight, twin.weight)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("fill", [0.0, float("nan")], ids=["zero", "nan"])
def test_ops_on_degenerate_weight_return_input_vectors(impl, fill):
    weight, u, v = _good()
    weight = torch.full_like(weight, fill)
    u0, v0 = u.clone(), v.clone()
    weight_sn, sigma, u_new, v_new = IMPLS[impl][1](weight, u, v, 1, 3, 1e-12)
    assert torch.equal(u_new, u0) and torch.equal(v_new, v0)
    assert torch.isnan(weight_sn).all()
    if fill == 0.0:
        assert sigma.item() == 0.0
    IMPLS[impl][0](weight, u, v, 1, 3, 1e-12)
    assert torch.equal(u, u0) and torch.equal(v, v0)
