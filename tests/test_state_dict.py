"""Checkpoints across the four spectral norms (torch's parametrization and legacy versions, sn_ext's two):
plain strict load_state_dict works in every direction the brief names, and the loaded module then gives the
source module's eval output (and, in the same family, the same next train step)."""

import pytest
import torch
from helpers import APPLY, LEGACY, TOL, apply_to_layers, assert_rel, randn
from torch import nn

NETS = {
    "linear": (lambda: nn.Linear(7, 5), (3, 7)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 4, 5)),  # dim=1
    "nested": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(3 * 3 * 4, 2)),
        (2, 2, 5, 6),
    ),
}

PAIRS = [
    ("torch", "sn_ext"),
    ("torch_legacy", "sn_ext"),
    ("sn_ext", "torch"),
    ("torch", "sn_ext_legacy"),
    ("torch_legacy", "sn_ext_legacy"),
    ("sn_ext_legacy", "torch_legacy"),
    ("sn_ext", "sn_ext_legacy"),
    ("sn_ext_legacy", "sn_ext"),
    ("sn_ext", "sn_ext"),
    ("sn_ext_legacy", "sn_ext_legacy"),
]


def _build(kind: str, net: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return apply_to_layers(NETS[net][0](), APPLY[kind], seed + 1)


def _input(net: str, seed: int) -> torch.Tensor:
    return randn(*NETS[net][1], seed=seed)


def _trained(kind: str, net: str) -> nn.Module:
    """A source module a few steps into training: buffers and weights are neither the initial ones nor zero."""
    module = _build(kind, net, seed=1)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for step in range(3):
        (module(_input(net, step)) * randn(1, seed=step)).sum().backward()
        opt.step()
        opt.zero_grad()
    return module


def _sn_tensors(module: nn.Module, kind: str) -> list[torch.Tensor]:
    """(original weight, u, v) of every spectral-normed layer, in module order, whatever the layout."""
    out = []
    for layer in module.modules():
        if kind in LEGACY and hasattr(layer, "weight_orig"):
            out += [layer.weight_orig, layer.weight_u, layer.weight_v]
        elif kind not in LEGACY and torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
            sn = layer.parametrizations.weight
            out += [sn.original, sn[0]._u, sn[0]._v]
    assert out
    return out


def _check_loaded(source, src_kind, target, dst_kind, net):
    for got, want in zip(_sn_tensors(target, dst_kind), _sn_tensors(source, src_kind), strict=True):
        assert torch.equal(got, want)
    x = _input(net, 10)
    source.eval()
    target.eval()
    assert_rel(target(x), source(x), TOL[torch.float32], "eval output after loading")
    if (src_kind in LEGACY) == (dst_kind in LEGACY):  # same algorithm: training continues identically
        source.train()
        target.train()
        for step in range(2):
            assert_rel(target(x), source(x), TOL[torch.float32], f"train step {step} after loading")


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("src_kind,dst_kind", PAIRS, ids=lambda k: k)
def test_load_state_dict(src_kind, dst_kind, net):
    source = _trained(src_kind, net)
    target = _build(dst_kind, net, seed=7)
    result = target.load_state_dict(source.state_dict())  # strict by default
    assert not result.missing_keys and not result.unexpected_keys
    _check_loaded(source, src_kind, target, dst_kind, net)


@pytest.mark.parametrize(
    "src_kind,dst_kind",
    [("sn_ext", "torch"), ("torch_legacy", "sn_ext"), ("sn_ext_legacy", "torch_legacy"), ("torch", "sn_ext_legacy")],
    ids=lambda k: k,
)
def test_round_trip_through_file(tmp_path, src_kind, dst_kind):
    net = "nested"
    source = _trained(src_kind, net)
    path = tmp_path / "state.pt"
    torch.save(source.state_dict(), path)
    state = torch.load(path, weights_only=True)
    target = _build(dst_kind, net, seed=7)
    target.load_state_dict(state)
    _check_loaded(source, src_kind, target, dst_kind, net)


@pytest.mark.parametrize("kind", ["sn_ext", "sn_ext_legacy"])
@pytest.mark.parametrize("layout", ["torch", "torch_legacy"])
def test_strict_load_still_reports_missing_and_unexpected_keys(kind, layout):
    state = _trained(layout, "linear").state_dict()
    u_key = "weight_u" if layout in LEGACY else "parametrizations.weight.0._u"
    missing = dict(state)
    del missing[u_key]
    with pytest.raises(RuntimeError, match="Missing key"):
        _build(kind, "linear", seed=7).load_state_dict(missing)
    extra = dict(state)
    extra["not_a_key"] = torch.ones(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _build(kind, "linear", seed=7).load_state_dict(extra)
