"""NaN, Inf and zero weights never corrupt u and v.

A step whose weight holds NaN or Inf (or is all zero) shows it in the output (NaN), leaves u and v exactly as they
were (finite unit vectors), and once the weight is finite again, training continues bit for bit as in a twin that
never saw the bad steps. torch instead writes NaN (or zeros) into u and v, and power iteration never recovers.
Extends tests/test_errors.py (one bad step, conv2d, n_power_iterations=1, no backward) to whole training steps:
two calls and one backward per step, an optimizer, consecutive bad steps, n_power_iterations 1 and 3, -Inf, all
dtypes at the op level, and registration on a bad weight.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randn, unit
from torch import nn

import sn_ext
from sn_ext import reference

REGISTER = {"parametrization": sn_ext.spectral_norm, "legacy": sn_ext.legacy.spectral_norm}
BAD = ["nan", "inf", "-inf", "zero"]


def _originals(net: nn.Module, legacy: bool) -> list[torch.Tensor]:
    if legacy:
        return [m.weight_orig for m in net.modules() if hasattr(m, "weight_orig")]
    return [m.parametrizations.weight.original for m in net.modules() if hasattr(m, "parametrizations")]


def _vectors(net: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in net.named_buffers() if name.endswith(("_u", "_v"))]


def _discriminator(kind: str, n: int) -> nn.Module:
    torch.manual_seed(0)
    apply = lambda m: REGISTER[kind](m, n_power_iterations=n)  # noqa: E731
    return nn.Sequential(apply(nn.Conv2d(2, 5, 3)), nn.LeakyReLU(0.2), nn.Flatten(), apply(nn.Linear(5 * 3 * 3, 1)))


def _corrupt_(weight: torch.Tensor, bad: str) -> None:
    with torch.no_grad():
        if bad == "zero":
            weight.zero_()
        else:
            weight.view(-1)[7] = float(bad)


def _step(net, opt, step, *, skip=False):
    """One discriminator step: D(real), D(fake), one backward; an optimizer step unless skipped (as GradScaler
    skips a step whose gradients are not finite)."""
    real, fake = randn(2, 3, 2, 5, 5, seed=step)
    out_real, out_fake = net(real), net(fake)
    loss = F.softplus(-out_real).mean() + F.softplus(out_fake).mean()
    opt.zero_grad()
    loss.backward()
    if not skip:
        opt.step()
    return out_real.detach(), out_fake.detach()


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", list(REGISTER))
def test_bad_steps_leave_no_trace(kind, n, bad):
    legacy = kind == "legacy"
    net = _discriminator(kind, n)
    twin = copy.deepcopy(net)  # never sees the bad steps (copied before any forward: legacy's weight is not a leaf)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (net, twin))
    good = 0  # the good steps see the same data in both
    for step in range(6):
        if step in (2, 3):  # two bad steps in a row, then the weights are restored (from a snapshot)
            snapshot = [w.detach().clone() for w in _originals(net, legacy)]
            before = [b.clone() for b in _vectors(net)]
            for weight in _originals(net, legacy):  # as after an optimizer step on NaN gradients
                _corrupt_(weight, bad)
            out_real, out_fake = _step(net, opt, 100 + step, skip=True)
            assert torch.isnan(out_real).all() and torch.isnan(out_fake).all(), "the bad step must show as NaN"
            for b, b0 in zip(_vectors(net), before):
                assert torch.equal(b, b0), "a bad step must leave u and v as they were"
                assert torch.isfinite(b).all() and math.isclose(b.double().norm().item(), 1.0, rel_tol=1e-6)
            with torch.no_grad():
                for w, w0 in zip(_originals(net, legacy), snapshot):
                    w.copy_(w0)
            continue
        outs, outs_twin = _step(net, opt, good), _step(twin, opt_twin, good)
        good += 1
        for a, b in zip(outs, outs_twin):
            assert torch.equal(a, b), f"step {step}: the output differs from the twin that never saw the bad steps"
        for a, b in zip(_vectors(net) + _originals(net, legacy), _vectors(twin) + _originals(twin, legacy)):
            assert torch.equal(a, b), f"step {step}: state differs from the twin"


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("kind", list(REGISTER))
def test_registration_on_a_bad_weight_keeps_unit_vectors(kind, bad):
    # The parametrization's 15 warm-up rounds meet the bad weight at once: u and v stay the (normalized) random
    # draws, torch's draws for the same seed, and training starts normally once the weight is finite.
    legacy = kind == "legacy"
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 5, 3)
    good = layer.weight.detach().clone()
    _corrupt_(layer.weight, bad)
    torch.manual_seed(1)
    REGISTER[kind](layer, n_power_iterations=3)
    torch.manual_seed(1)
    u0 = F.normalize(torch.empty(5).normal_(0, 1), dim=0)
    v0 = F.normalize(torch.empty(18).normal_(0, 1), dim=0)
    assert torch.equal(_vectors(layer)[0], u0) and torch.equal(_vectors(layer)[1], v0)
    x = randn(3, 2, 5, 5, seed=1)
    assert torch.isnan(layer(x)).all()
    assert torch.equal(_vectors(layer)[0], u0) and torch.equal(_vectors(layer)[1], v0)
    with torch.no_grad():
        _originals(layer, legacy)[0].copy_(good)
    for _ in range(3):
        out = layer(x)
    assert torch.isfinite(out).all()
    sigma = torch.linalg.matrix_norm(good.flatten(1).double(), 2).item()
    w_sn = layer.weight if legacy else layer.parametrizations.weight()  # legacy: from the last forward
    assert math.isclose(good.abs().max().item() / w_sn.abs().max().item(), sigma, rel_tol=1e-2)


def _degenerate(pattern: str, dtype: torch.dtype) -> torch.Tensor:
    weight = randn(4, 3, 2, dtype=dtype, seed=1)  # dim=1: h=3, w=8
    if pattern == "zero":
        return torch.zeros_like(weight)
    if pattern == "inf_and_minus_inf":
        weight[0, 1, 0], weight[2, 1, 1] = float("inf"), float("-inf")
    else:
        weight[3, 2, 1] = float(pattern)
    return weight


IMPLS = {
    "op": (torch.ops.sn_ext.power_iteration_, torch.ops.sn_ext.spectral_normalize_),
    "reference": (reference.power_iteration_, reference.spectral_normalize_),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["nan", "inf", "-inf", "inf_and_minus_inf", "zero"])
@pytest.mark.parametrize("v_first", [False, True], ids=["u_first", "v_first"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_ops_keep_vectors_on_non_finite_weight(impl, n, v_first, pattern, dtype):
    weight = _degenerate(pattern, dtype)
    u, v = unit(3, dtype, 2), unit(8, dtype, 3)
    u0, v0 = u.clone(), v.clone()
    weight_sn, sigma, u_new, v_new = IMPLS[impl][1](weight, u, v, 1, n, 1e-12, v_first)
    assert torch.equal(u_new, u0) and torch.equal(v_new, v0), "the new vectors must be the old ones"
    assert torch.equal(u, u0) and torch.equal(v, v0), "spectral_normalize_ must leave u and v as they were"
    assert torch.isnan(weight_sn).any(), "the bad weight must show in W_sn"
    if pattern == "zero":  # the documented result: sigma = 0, W_sn = 0 / 0
        assert sigma.item() == 0 and torch.isnan(weight_sn).all()
    IMPLS[impl][0](weight, u, v, 1, n, 1e-12, v_first)
    assert torch.equal(u, u0) and torch.equal(v, v0), "power_iteration_ must leave u and v as they were"
