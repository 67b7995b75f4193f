"""Averaged models (EMA / SWA) with spectral norm: torch.optim.swa_utils.AveragedModel.

With use_buffers=True the averaged model averages u and v too: averages of unit vectors are shorter than 1, every
layer's sigma = u^T W v comes out too small and the eval output blows up (multiplicatively over layers). With
use_buffers=False its u and v are the copies made when it was built, stale for the averaged weights.
sn_ext.renormalize_buffers_(model) makes them unit vectors again, and with n_power_iterations also aligns them with
the averaged weights. "Correctly normalized" below: every layer's u, v are the exact top singular vectors of its
averaged weight (so sigma is its largest singular value).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_rel, randn, rel_err
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import parametrize
from torch.nn.utils import spectral_norm as torch_legacy_sn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import sn_ext
from sn_ext._matrix import to_matrix

APPLY = {
    "sn_ext": sn_ext.spectral_norm,
    "sn_ext_legacy": sn_ext.legacy.spectral_norm,
    "torch": torch_param.spectral_norm,
    "torch_legacy": torch_legacy_sn,
}
DEPTH, WIDTH = 6, 12


def _net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(DEPTH):  # convolutions on (batch, WIDTH, 1), then linear layers on (batch, WIDTH)
        if i == DEPTH // 2:
            layers.append(nn.Flatten())
        layer = nn.Conv1d(WIDTH, WIDTH, 1) if i < DEPTH // 2 else nn.Linear(WIDTH, WIDTH)
        layers += [APPLY[kind](layer), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, APPLY[kind](nn.Linear(WIDTH, 1)))


def _spectral_norms(model: nn.Module):
    """(weight, u, v, dim) of every spectral norm in model, of any kind."""
    for layer in model.modules():
        if hasattr(layer, "weight_orig"):
            hook = next(h for h in layer._forward_pre_hooks.values() if hasattr(h, "n_power_iterations"))
            yield layer.weight_orig, layer.weight_u, layer.weight_v, hook.dim
        elif parametrize.is_parametrized(layer, "weight"):
            sn = layer.parametrizations.weight
            yield sn.original, sn[0]._u, sn[0]._v, sn[0].dim


def _train_with_ema(kind: str, use_buffers: bool, steps: int = 30):
    model = _net(kind)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for step in range(steps):
        real, fake = randn(2, 16, WIDTH, 1, seed=step)
        loss = F.softplus(-model(real)).mean() + F.softplus(model(fake)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
    return model, ema


def _correctly_normalized(ema: nn.Module) -> nn.Module:
    exact = copy.deepcopy(ema)
    with torch.no_grad():
        for weight, u, v, dim in _spectral_norms(exact):
            left, _, right = torch.linalg.svd(to_matrix(weight, dim).double())
            u.copy_(left[:, 0])
            v.copy_(right[0])
    return exact


def _eval(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(randn(64, WIDTH, 1, seed=1000))


def _sigma_ratios(model: nn.Module) -> list[float]:
    """Per layer: the sigma the layer divides by in eval mode (u^T W v), over its weight's largest singular value."""
    ratios = []
    for weight, u, v, dim in _spectral_norms(model):
        mat = to_matrix(weight.detach(), dim).double()
        ratios.append((u.double() @ mat @ v.double()).item() / torch.linalg.matrix_norm(mat, 2).item())
    return ratios


def _vector_norms(model: nn.Module) -> list[float]:
    return [t.double().norm().item() for _, u, v, _ in _spectral_norms(model) for t in (u, v) if t.numel() > 1]


@pytest.fixture(scope="module", params=list(APPLY))
def trained(request):
    return request.param, _train_with_ema(request.param, use_buffers=True)


def test_averaged_buffers_underestimate_sigma(trained):
    # The failure renormalize_buffers_ exists for: shrunk u, v and a blown-up eval output.
    kind, (_, ema) = trained
    assert max(_vector_norms(ema)) < 1 and min(_vector_norms(ema)) < 0.995, "the averaged u, v should have shrunk"
    ratios = _sigma_ratios(ema)
    assert max(ratios) < 1 + 1e-6, "sigma from averaged u, v can only be too small"
    # Each layer's sigma is a few % too small; together the layers' outputs are scaled up by more than 5%.
    assert torch.tensor(ratios).prod() < 0.95
    assert rel_err(_eval(ema), _eval(_correctly_normalized(ema))) > 0.05


@pytest.mark.parametrize("n", [0, 15])
def test_renormalize_buffers_after_ema(trained, n):
    kind, (_, ema) = trained
    ema = copy.deepcopy(ema)
    exact = _eval(_correctly_normalized(ema))
    raw_error = torch.linalg.vector_norm(_eval(ema) - exact).item()
    assert sn_ext.renormalize_buffers_(ema, n_power_iterations=n) is ema
    for norm in _vector_norms(ema):
        assert abs(norm - 1) < 1e-6, "u, v must be unit vectors again"
    fixed = _eval(ema)
    if n == 0:
        # Unit vectors again: every sigma is a lower bound of the largest singular value, now close to it.
        # (The legacy versions start without a warm-up, so their averaged directions are rougher: 3% here.)
        assert torch.tensor(_sigma_ratios(ema)).prod() > 0.99
        assert_rel(fixed, exact, 5e-2, "eval output after renormalizing")
        assert torch.linalg.vector_norm(fixed - exact).item() < raw_error / 5
    else:
        assert_rel(fixed, exact, 1e-5, "eval output after renormalizing and 15 power iterations")


def test_renormalize_buffers_aligns_stale_buffers():
    # use_buffers=False: the averaged model keeps the u, v copied when it was built (unit, but stale).
    _, ema = _train_with_ema("sn_ext", use_buffers=False)
    exact = _eval(_correctly_normalized(ema))
    stale_error = torch.linalg.vector_norm(_eval(ema) - exact).item()
    sn_ext.renormalize_buffers_(ema, n_power_iterations=15)
    assert_rel(_eval(ema), exact, 1e-5, "eval output after 15 power iterations")
    assert torch.linalg.vector_norm(_eval(ema) - exact).item() < stale_error / 100


@pytest.mark.parametrize("kind", list(APPLY))
def test_renormalize_buffers_leaves_a_trained_model_as_it_is(kind):
    # On a model whose u, v are unit vectors already, the call changes them by at most a rounding.
    model = _net(kind)
    model(randn(4, WIDTH, 1, seed=1))
    out = _eval(model)
    before = [t.clone() for _, u, v, _ in _spectral_norms(model) for t in (u, v)]
    sn_ext.renormalize_buffers_(model)
    for t, t0 in zip([t for _, u, v, _ in _spectral_norms(model) for t in (u, v)], before):
        assert_rel(t, t0, TOL[torch.float32], "u, v")
    assert_rel(_eval(model), out, TOL[torch.float32], "eval output")
    model.train()
    model(randn(4, WIDTH, 1, seed=2)).sum().backward()  # and training goes on


def test_renormalize_buffers_keeps_zero_and_non_finite_vectors():
    layer = sn_ext.spectral_norm(nn.Linear(5, 4))
    sn = layer.parametrizations.weight[0]
    with torch.no_grad():
        sn._u.zero_()
        sn._v.fill_(float("nan"))
    sn_ext.renormalize_buffers_(layer)
    assert not sn._u.any() and torch.isnan(sn._v).all()
    with pytest.raises(ValueError, match="n_power_iterations"):
        sn_ext.renormalize_buffers_(layer, n_power_iterations=-1)
