"""sn_ext.spectral_norm vs torch.nn.utils.parametrizations.spectral_norm, and sn_ext.legacy.spectral_norm vs
torch.nn.utils.spectral_norm: same W_sn, same u/v after train steps, same gradients, same module plumbing.

The installed torch is the oracle; both sides start from equal weights and (where the warm-up's rounding would
otherwise differ) equal u, v buffers.
"""

import copy

import pytest
import torch
from helpers import (
    CASES,
    DTYPES,
    LEGACY_CASES,
    assert_rel,
    has_vectors,
    make_input,
    make_pair,
    original,
    perturb_,
    randn,
    sn_state,
    tol_for,
)
from torch.nn.utils import parametrize
from torch.nn.utils import remove_spectral_norm as torch_remove_spectral_norm

import sn_ext

STEPS = 3


def _compare_vectors(ours, theirs, case, dtype, legacy=False, what=""):
    if not has_vectors(theirs, case.name, legacy):
        assert not has_vectors(ours, case.name, legacy), "1-D weights have no u, v buffers in torch"
        return
    for label, o, t in zip("uv", sn_state(ours, case.name, legacy), sn_state(theirs, case.name, legacy)):
        assert o.dtype == t.dtype == dtype
        assert o.shape == t.shape
        assert_rel(o, t, tol_for(dtype), f"{what} {label}")


def _loss(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A loss whose gradient is a fresh random tensor (not all ones)."""
    return (out * randn(*out.shape, dtype=out.dtype, seed=seed)).sum()


def _compare_grads(ours, theirs, dtype, what=""):
    named_t = dict(theirs.named_parameters())
    named_o = dict(ours.named_parameters())
    assert named_o.keys() == named_t.keys()
    for key, p_t in named_t.items():
        p_o = named_o[key]
        assert p_t.grad is not None and p_o.grad is not None, key
        assert p_o.grad.shape == p_t.grad.shape
        assert_rel(p_o.grad, p_t.grad, tol_for(dtype), f"{what} grad of {key}")


# ---------------------------------------------------------------------------------------------------------------
# torch.nn.utils.parametrizations.spectral_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_registration_matches_torch(case, dtype):
    # Same seed, no copying: same random draws in the same order, then the 15 + n warm-up iterations.
    theirs, ours = make_pair(case, dtype, seed=3, copy_buffers=False)
    sn_t = theirs.parametrizations[case.name][0]
    sn_o = ours.parametrizations[case.name][0]
    assert isinstance(sn_o, sn_ext.SpectralNorm)
    assert sn_o.dim == sn_t.dim
    assert sn_o.eps == sn_t.eps
    assert getattr(sn_o, "n_power_iterations", None) == getattr(sn_t, "n_power_iterations", None)
    _compare_vectors(ours, theirs, case, dtype, what="after registration")
    assert_rel(getattr(ours, case.name), getattr(theirs, case.name), tol_for(dtype), "W_sn")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_train_steps_match_torch(case, dtype):
    theirs, ours = make_pair(case, dtype, seed=5)
    tol = tol_for(dtype)
    for step in range(STEPS):
        w_t = getattr(theirs, case.name)
        w_o = getattr(ours, case.name)  # every access is one more power iteration
        assert w_o.dtype == w_t.dtype
        assert w_o.stride() == w_t.stride(), "W_sn must keep the weight's layout, as torch's W / sigma"
        assert_rel(w_o, w_t, tol, f"W_sn at step {step}")
        _compare_vectors(ours, theirs, case, dtype, what=f"step {step}")
        perturb_([theirs, ours], case.name, legacy=False, seed=step)
    x = make_input(case, dtype)
    out_t, out_o = theirs(x), ours(x)
    assert_rel(out_o, out_t, tol, "output")
    _loss(out_t, 7).backward()
    _loss(out_o, 7).backward()
    _compare_grads(ours, theirs, dtype)
    _compare_vectors(ours, theirs, case, dtype, what="after backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_eval_matches_torch_and_keeps_buffers(case, dtype):
    theirs, ours = make_pair(case, dtype, seed=11)
    theirs.eval()
    ours.eval()
    before = [b.clone() for b in sn_state(ours, case.name)] if has_vectors(ours, case.name) else []
    for step in range(STEPS):
        assert_rel(getattr(ours, case.name), getattr(theirs, case.name), tol_for(dtype), f"eval W_sn {step}")
    for b, b0 in zip(sn_state(ours, case.name) if before else [], before):
        assert torch.equal(b, b0), "eval mode must not update u, v"
    _compare_vectors(ours, theirs, case, dtype, what="eval")
    x = make_input(case, dtype)
    _loss(theirs(x), 8).backward()
    _loss(ours(x), 8).backward()
    _compare_grads(ours, theirs, dtype, "eval")


PLUMBING_CASES = [c for c in CASES if c.id in ("linear", "conv_transpose2d", "bias_1d", "linear_n3")]


@pytest.mark.parametrize("case", PLUMBING_CASES, ids=repr)
def test_state_dict_keys_match_torch(case):
    theirs, ours = make_pair(case)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_o.keys()) == list(sd_t.keys())
    for key in sd_t:
        assert sd_o[key].shape == sd_t[key].shape and sd_o[key].dtype == sd_t[key].dtype, key


def test_same_parameter_object_stays_original():
    case = CASES[0]
    for apply in (torch.nn.utils.parametrizations.spectral_norm, sn_ext.spectral_norm):
        module = case.make()
        param = module.weight
        apply(module)
        assert module.parametrizations.weight.original is param
    # An optimizer built before registration keeps training the normalized layer.
    module = case.make()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    sn_ext.spectral_norm(module).eval()
    before = module.weight.detach().clone()
    _loss(module(make_input(case, torch.float32)), 1).backward()
    opt.step()
    assert not torch.equal(module.weight, before)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_parametrize_cached_matches_torch(train):
    case = CASES[0]
    theirs, ours = make_pair(case, train=train)
    with parametrize.cached():
        firsts = []
        for module in (theirs, ours):
            first = module.weight
            assert module.weight is first and module.weight is first, "cached() must reuse the first W_sn"
            firsts.append(first)
        _compare_vectors(ours, theirs, case, torch.float32, what="inside cached()")
        assert_rel(firsts[1], firsts[0], tol_for(torch.float32), "cached W_sn")
    # Outside cached() each access iterates again (in train mode).
    assert_rel(ours.weight, theirs.weight, tol_for(torch.float32), "W_sn after cached()")
    _compare_vectors(ours, theirs, case, torch.float32, what="after cached()")


def test_is_parametrized_matches_torch():
    case = CASES[0]
    theirs, ours = make_pair(case)
    for name in (None, "weight", "bias"):
        assert parametrize.is_parametrized(ours, name) == parametrize.is_parametrized(theirs, name), name
    assert parametrize.is_parametrized(ours, "weight") and not parametrize.is_parametrized(ours, "bias")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", PLUMBING_CASES, ids=repr)
def test_remove_parametrizations_matches_torch(case, train):
    theirs, ours = make_pair(case, torch.float64, train=train)
    perturb_([theirs, ours], case.name, legacy=False, seed=1)
    for module in (theirs, ours):
        parametrize.remove_parametrizations(module, case.name, leave_parametrized=True)
        assert not parametrize.is_parametrized(module)
        assert isinstance(getattr(module, case.name), torch.nn.Parameter)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_rel(getattr(ours, case.name), getattr(theirs, case.name), tol_for(torch.float64), "baked weight")
    x = make_input(case, torch.float64)
    assert_rel(ours(x), theirs(x), tol_for(torch.float64), "output after removal")


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_deepcopy_is_independent(legacy):
    case = CASES[1]  # conv1d
    theirs, ours = make_pair(case, torch.float64, legacy=legacy)
    x = make_input(case, torch.float64)
    clone = copy.deepcopy(ours)
    assert original(clone, legacy=legacy) is not original(ours, legacy=legacy)
    for b_c, b_o in zip(sn_state(clone, legacy=legacy), sn_state(ours, legacy=legacy)):
        assert b_c.data_ptr() != b_o.data_ptr() and torch.equal(b_c, b_o)
    snapshot = [t.clone() for t in (*sn_state(ours, legacy=legacy), original(ours, legacy=legacy))]
    # Train the copy: the original must not move.
    opt = torch.optim.SGD(clone.parameters(), lr=0.1)
    for step in range(STEPS):
        _loss(clone(x), step).backward()
        opt.step()
    for t, t0 in zip((*sn_state(ours, legacy=legacy), original(ours, legacy=legacy)), snapshot):
        assert torch.equal(t, t0), "training a deepcopy changed the original"
    for t, t0 in zip((*sn_state(clone, legacy=legacy), original(clone, legacy=legacy)), snapshot):
        assert not torch.equal(t, t0), "the copy did not train"
    # The original still tracks torch's module.
    assert_rel(ours(x), theirs(x), tol_for(torch.float64), "original after training its copy")
    _compare_vectors(ours, theirs, case, torch.float64, legacy=legacy, what="original after training its copy")


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_calls_then_one_backward_matches_torch(dtype, legacy):
    # The GAN pattern D(real), D(fake), one backward: the second call updates u, v before the first's backward.
    case = CASES[2]  # conv2d
    theirs, ours = make_pair(case, dtype, legacy=legacy)
    real, fake = make_input(case, dtype, seed=1), make_input(case, dtype, seed=2)
    for module in (theirs, ours):
        loss = _loss(module(real), 3) - _loss(module(fake), 4)
        loss.backward()
    _compare_grads(ours, theirs, dtype, "two calls")
    _compare_vectors(ours, theirs, case, dtype, legacy=legacy, what="two calls")


# ---------------------------------------------------------------------------------------------------------------
# torch.nn.utils.spectral_norm (legacy, forward pre-hook)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LEGACY_CASES, ids=repr)
def test_legacy_registration_matches_torch(case, dtype):
    theirs, ours = make_pair(case, dtype, seed=3, legacy=True, copy_buffers=False)
    # No warm-up in the legacy version: the same seed gives bit-identical buffers.
    for label, o, t in zip("uv", sn_state(ours, case.name, True), sn_state(theirs, case.name, True)):
        assert o.dtype == dtype and torch.equal(o, t), label
    assert torch.equal(getattr(ours, case.name), getattr(theirs, case.name))
    assert original(ours, case.name, True) is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LEGACY_CASES, ids=repr)
def test_legacy_train_steps_match_torch(case, dtype):
    theirs, ours = make_pair(case, dtype, seed=5, legacy=True)
    tol = tol_for(dtype)
    x = make_input(case, dtype)
    for step in range(STEPS):
        out_t, out_o = theirs(x), ours(x)  # every call is one more (v-first) power iteration
        assert_rel(out_o, out_t, tol, f"output at step {step}")
        assert_rel(getattr(ours, case.name), getattr(theirs, case.name), tol, f"W_sn at step {step}")
        _compare_vectors(ours, theirs, case, dtype, legacy=True, what=f"step {step}")
        perturb_([theirs, ours], case.name, legacy=True, seed=step)
    _loss(theirs(x), 7).backward()
    _loss(ours(x), 7).backward()
    _compare_grads(ours, theirs, dtype, "legacy")
    _compare_vectors(ours, theirs, case, dtype, legacy=True, what="after backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LEGACY_CASES, ids=repr)
def test_legacy_eval_matches_torch_and_keeps_buffers(case, dtype):
    theirs, ours = make_pair(case, dtype, seed=11, legacy=True)
    x = make_input(case, dtype)
    theirs(x), ours(x)  # one train step first, so the buffers are not the random draws
    theirs.eval()
    ours.eval()
    before = [b.clone() for b in sn_state(ours, case.name, True)]
    for step in range(STEPS):
        assert_rel(ours(x), theirs(x), tol_for(dtype), f"eval output {step}")
    for b, b0 in zip(sn_state(ours, case.name, True), before):
        assert torch.equal(b, b0), "eval mode must not update u, v"
    _loss(theirs(x), 8).backward()
    _loss(ours(x), 8).backward()
    _compare_grads(ours, theirs, dtype, "legacy eval")


@pytest.mark.parametrize(
    "case", [c for c in LEGACY_CASES if c.id in ("linear", "conv_transpose2d", "bias_1d")], ids=repr
)
def test_legacy_state_dict_matches_torch(case):
    theirs, ours = make_pair(case, legacy=True)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_o.keys()) == list(sd_t.keys())
    assert sd_o._metadata[""] == sd_t._metadata[""], "the legacy version metadata torch writes"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_legacy_remove_spectral_norm_matches_torch(train):
    case = CASES[2]  # conv2d
    theirs, ours = make_pair(case, torch.float64, legacy=True)
    x = make_input(case, torch.float64)
    theirs(x), ours(x)
    perturb_([theirs, ours], case.name, legacy=True, seed=2)
    theirs.train(train)
    ours.train(train)
    torch_remove_spectral_norm(theirs)
    sn_ext.legacy.remove_spectral_norm(ours)
    assert isinstance(ours.weight, torch.nn.Parameter)
    assert not ours._forward_pre_hooks
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_rel(ours.weight, theirs.weight, tol_for(torch.float64), "baked weight")
    assert_rel(ours(x), theirs(x), tol_for(torch.float64), "output after removal")
    with pytest.raises(ValueError, match="weight"):
        sn_ext.legacy.remove_spectral_norm(ours)
