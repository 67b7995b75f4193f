"""Bad arguments and inputs: a clear error that names the argument, raised before any state changes (the module's
parameters, buffers, hooks and parametrizations, and the global RNG, which registration draws u and v from).

Extends tests/test_errors.py (integer weights, n_power_iterations <= 0, dim out of range, a missing attribute,
registering twice, op-level errors) with: complex (legacy version) and bool weights, 0-d and empty weights, NaN and
negative eps for both versions, lazy parameters, spectral norm registered over another implementation's, the whole-state
check for every case, dtype conversion after registration, and a module whose buffers no longer match its weight.
"""

import pytest
import torch
from helpers import CASES, TOL, assert_rel, make_input, make_pair, original, sn_state
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import parametrize
from torch.nn.utils import spectral_norm as torch_legacy_sn

import sn_ext

REGISTER = {"parametrization": sn_ext.spectral_norm, "legacy": sn_ext.legacy.spectral_norm}


def _snapshot(module: nn.Module) -> dict:
    """Everything a failed registration must leave as it was."""
    return {
        "state": {
            k: v if isinstance(v, nn.parameter.UninitializedTensorMixin) else v.clone()
            for k, v in module.state_dict().items()
        },
        "params": {k: id(p) for k, p in module.named_parameters()},
        "buffers": {k: id(b) for k, b in module.named_buffers()},
        "hooks": list(module._forward_pre_hooks.values()),
        "load_hooks": len(module._load_state_dict_pre_hooks),
        "class": type(module),
        "parametrizations": (
            {k: list(v) for k, v in module.parametrizations.items()} if parametrize.is_parametrized(module) else None
        ),
        "rng": torch.get_rng_state(),
    }


def _assert_unchanged(module: nn.Module, before: dict) -> None:
    after = _snapshot(module)
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        if isinstance(value, nn.parameter.UninitializedTensorMixin):
            assert after["state"][key] is value, f"{key} changed"
        else:
            assert torch.equal(after["state"][key], value), f"{key} changed"
    for what in ("params", "buffers", "hooks", "load_hooks", "class", "parametrizations"):
        assert after[what] == before[what], f"{what} changed"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG was drawn from"


def _module_with(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point() or weight.is_complex())
    return module


def _linear():
    torch.manual_seed(0)
    return nn.Linear(6, 4)


BAD_WEIGHTS = {
    # name: (weight, exception, pattern naming what is wrong)
    "complex64": (lambda: torch.randn(4, 6, dtype=torch.complex64), TypeError, r"weight.*complex64"),
    "complex128": (lambda: torch.randn(4, 6, dtype=torch.complex128), TypeError, r"weight.*complex128"),
    "bool": (lambda: torch.ones(4, 6, dtype=torch.bool), TypeError, r"weight.*bool"),
    "0d": (lambda: torch.tensor(1.5), ValueError, r"weight.*shape \(\)"),
    "empty_rows": (lambda: torch.empty(0, 3), ValueError, r"weight.*shape \(0, 3\)"),
    "empty_cols": (lambda: torch.empty(3, 0), ValueError, r"weight.*shape \(3, 0\)"),
    "empty_1d": (lambda: torch.empty(0), ValueError, r"weight.*shape \(0,\)"),
}


# Complex weights are bad for the legacy version only (the parametrization takes them as torch's does:
# tests/test_torch_compat.py).
@pytest.mark.parametrize(
    "kind,bad",
    [(kind, bad) for kind in REGISTER for bad in BAD_WEIGHTS if kind == "legacy" or not bad.startswith("complex")],
)
def test_bad_weight_is_rejected_before_any_change(kind, bad):
    make, error, pattern = BAD_WEIGHTS[bad]
    module = _module_with(make())
    before = _snapshot(module)
    with pytest.raises(error, match=pattern):
        REGISTER[kind](module)
    _assert_unchanged(module, before)


BAD_ARGUMENTS = {
    "dim_too_large": ({"dim": 2}, IndexError, r"(?i)dim.*got 2"),
    "dim_too_small": ({"dim": -3}, IndexError, r"(?i)dim.*got -3"),
    "n_zero": ({"n_power_iterations": 0}, ValueError, r"n_power_iterations=0"),
    "n_negative": ({"n_power_iterations": -2}, ValueError, r"n_power_iterations=-2"),
    "eps_negative": ({"eps": -1e-3}, ValueError, r"eps=-0.001"),
    "eps_nan": ({"eps": float("nan")}, ValueError, r"eps=nan"),
    "missing_attribute": ({"name": "nope"}, ValueError, r"nope"),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS))
@pytest.mark.parametrize("kind", list(REGISTER))
def test_bad_argument_is_rejected_before_any_change(kind, bad, train):
    kwargs, error, pattern = BAD_ARGUMENTS[bad]
    module = _linear().train(train)
    before = _snapshot(module)
    with pytest.raises(error, match=pattern):
        REGISTER[kind](module, **kwargs)
    _assert_unchanged(module, before)


@pytest.mark.parametrize("kind", list(REGISTER))
def test_lazy_parameter_is_rejected_before_any_change(kind):
    module = nn.LazyLinear(4)
    before = _snapshot(module)
    with pytest.raises(ValueError, match=r"(?i)uninitialized.*dummy forward"):
        REGISTER[kind](module)
    _assert_unchanged(module, before)
    module(torch.randn(2, 3))  # initialized: now it registers
    REGISTER[kind](module)


FIRST = {"torch": torch_param.spectral_norm, "torch_legacy": torch_legacy_sn, **REGISTER}


# A parametrization over a parametrization stacks, as torch's does (tests/test_torch_compat.py); every other pair of
# versions meets a legacy hook, which neither torch nor sn_ext stacks.
REFUSED = [
    (first, second)
    for first in FIRST
    for second in REGISTER
    if not (second == "parametrization" and first in ("torch", "parametrization"))
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("first,second", REFUSED)
def test_registering_over_a_legacy_spectral_norm_is_rejected_before_any_change(first, second, train):
    module = FIRST[first](_linear()).train(train)
    module(torch.randn(2, 6))  # a step first: the buffers are not the registration's
    before = _snapshot(module)
    with pytest.raises(RuntimeError, match=r"weight"):
        REGISTER[second](module)
    _assert_unchanged(module, before)
    module(torch.randn(2, 6))  # still works


# ---------------------------------------------------------------------------------------------------------------
# dtype: the buffers follow the module; an op never runs on mismatched vectors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_dtype_conversion_after_registration(legacy, dtype):
    case = next(c for c in CASES if c.id == "conv2d")
    theirs, ours = make_pair(case, torch.float32, seed=4, legacy=legacy)
    x = make_input(case, torch.float32)
    theirs(x), ours(x)  # a float32 step first
    for module in (theirs, ours):
        module.to(dtype)
    tol = 2 * max(TOL[dtype], TOL[torch.float32])
    assert all(b.dtype == dtype for b in sn_state(ours, legacy=legacy)), "u, v must follow the module's dtype"
    assert original(ours, legacy=legacy).dtype == dtype
    for step in range(2):
        out_t, out_o = theirs(x.to(dtype)), ours(x.to(dtype))
        assert out_o.dtype == dtype and torch.isfinite(out_o).all()
        # Two independent results, each within the table's tolerance of the exact one (float32's at least: the
        # buffers come from float32 steps).
        assert_rel(out_o, out_t, tol, f"output at step {step} after .to({dtype})")
        out_o.float().sum().backward()
        assert original(ours, legacy=legacy).grad.dtype == dtype
    for module in (theirs, ours):
        module.float()
    assert all(b.dtype == torch.float32 for b in sn_state(ours, legacy=legacy))
    assert_rel(ours(x), theirs(x), tol, "output back in float32")


@pytest.mark.parametrize("which", ["u", "v"])
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_mismatched_buffer_dtype_raises_naming_it(legacy, which):
    torch.manual_seed(0)
    module = (sn_ext.legacy.spectral_norm if legacy else sn_ext.spectral_norm)(nn.Linear(6, 4))
    owner = module if legacy else module.parametrizations.weight[0]
    attr = ("weight_" if legacy else "_") + which
    setattr(owner, attr, getattr(owner, attr).double())  # replaces the buffer: now float64, the weight float32
    x = torch.randn(2, 6)
    before = _snapshot(module)
    with pytest.raises(TypeError, match=rf"\b{which}\b must have the weight's dtype"):
        module(x)
    _assert_unchanged(module, before)
