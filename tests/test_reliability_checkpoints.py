"""Checkpoints beyond tests/test_state_dict.py (strict loads between the four spectral norms):

- round trips sn_ext -> torch -> sn_ext -> sn_ext legacy -> torch legacy -> sn_ext -> sn_ext legacy -> sn_ext, each
  hop through a file loaded with a map_location, strict and non-strict: bit-identical tensors and eval outputs;
- non-strict loads report missing and unexpected keys under the target module's names, whatever the source layout;
- legacy checkpoints from before torch's version 1 (`weight` = W_sn stored, no `weight_v`), which torch's legacy
  spectral norm still loads: sn_ext's two versions load them too, to the same numbers as torch's;
- a model built on the meta device and loaded with assign=True (the large-model pattern), and a checkpoint in
  another dtype.
"""

import collections
import copy
import functools
import io

import pytest
import torch
from helpers import APPLY, LEGACY, TOL, apply_to_layers, assert_rel, randn
from torch import nn

NETS = {
    "linear": (lambda: nn.Linear(7, 5), (3, 7)),
    "nested": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(3, 2, 2),  # dim=1
            nn.Flatten(),
            nn.Linear(2 * 3 * 4, 2),
        ),
        (2, 2, 4, 5),
    ),
}
MAP_LOCATIONS = {
    "cpu": "cpu",
    "device": torch.device("cpu"),
    "dict": {"cpu": "cpu"},
    "callable": lambda storage, location: storage,
}


def _build(kind: str, net: str = "nested", seed: int = 7) -> nn.Module:
    torch.manual_seed(seed)
    return apply_to_layers(NETS[net][0](), APPLY[kind], seed + 1)


@functools.cache
def _trained_state(kind: str, net: str) -> dict:
    module = _build(kind, net, seed=1)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for step in range(3):
        (module(randn(*NETS[net][1], seed=step)) * randn(1, seed=step)).sum().backward()
        opt.step()
        opt.zero_grad()
    return copy.deepcopy(module.state_dict())


def _trained(kind: str, net: str = "nested") -> nn.Module:
    """A source module a few steps into training: buffers and weights are neither the initial ones nor zero."""
    module = _build(kind, net, seed=1)
    module.load_state_dict(copy.deepcopy(_trained_state(kind, net)))  # the same layout: trained once per session
    return module


def _sn_tensors(module: nn.Module) -> list[torch.Tensor]:
    """(original weight, u, v) of every spectral-normed layer, in module order, whatever the layout."""
    out = []
    for layer in module.modules():
        if hasattr(layer, "weight_orig"):
            out += [layer.weight_orig, layer.weight_u, layer.weight_v]
        elif torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
            sn = layer.parametrizations.weight
            out += [sn.original, sn[0]._u, sn[0]._v]
    return out


def _eval_out(module: nn.Module, net: str = "nested") -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(randn(*NETS[net][1], dtype=_sn_tensors(module)[0].dtype, seed=10))


def _through_file(state: dict, map_location) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=map_location, weights_only=True)


@pytest.mark.parametrize("map_location,strict", [("cpu", True), ("device", False), ("dict", True), ("callable", False)])
def test_round_trip_chain(map_location, strict):
    # torch's two versions cannot load each other's layout; sn_ext's load both.
    chain = ["sn_ext", "torch", "sn_ext", "sn_ext_legacy", "torch_legacy", "sn_ext", "sn_ext_legacy", "sn_ext"]
    source = _trained(chain[0])
    tensors, out = [t.detach().clone() for t in _sn_tensors(source)], _eval_out(source)
    module = source
    for hop, kind in enumerate(chain[1:], start=1):
        target = _build(kind, seed=20 + hop)
        result = target.load_state_dict(_through_file(module.state_dict(), MAP_LOCATIONS[map_location]), strict=strict)
        assert not result.missing_keys and not result.unexpected_keys, f"hop {hop} to {kind}: {result}"
        for got, want in zip(_sn_tensors(target), tensors, strict=True):
            assert torch.equal(got, want), f"hop {hop} to {kind}: a tensor changed"
        assert_rel(_eval_out(target), out, TOL[torch.float32], f"hop {hop} to {kind}: eval output")
        module = target


def _layer_keys(kind: str, prefix: str) -> tuple[str, str, str]:
    if kind in LEGACY:
        return f"{prefix}weight_orig", f"{prefix}weight_u", f"{prefix}weight_v"
    return (
        f"{prefix}parametrizations.weight.original",
        f"{prefix}parametrizations.weight.0._u",
        f"{prefix}parametrizations.weight.0._v",
    )


@pytest.mark.parametrize("dst_kind", ["sn_ext", "sn_ext_legacy"])
@pytest.mark.parametrize("src_kind", list(APPLY))
def test_non_strict_load_reports_keys_in_target_names(src_kind, dst_kind):
    source = _trained(src_kind)
    state = source.state_dict()
    del state[_layer_keys(src_kind, "2.")[1]]  # the ConvTranspose2d's u
    state["not_a_key"] = torch.ones(1)
    target = _build(dst_kind)
    u_before = _sn_tensors(target)[4].clone()
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == [_layer_keys(dst_kind, "2.")[1]]
    assert result.unexpected_keys == ["not_a_key"]
    got, want = _sn_tensors(target), _sn_tensors(source)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, u_before if i == 4 else w), f"tensor {i}"
    with pytest.raises(RuntimeError, match="Missing key.*2.*_u"):
        _build(dst_kind).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Legacy checkpoints from before torch's version 1


def _version_0_state(net: str, metadata: str) -> tuple[dict, torch.Tensor]:
    """A legacy state dict as torch < 1.1 wrote it: `weight` (W_sn after the last training forward), `weight_orig`,
    `weight_u`, no `weight_v`, and no version (or version 0) in the metadata. Returns it and the eval output of
    torch's legacy spectral norm after loading it (torch upgrades such checkpoints itself)."""
    source = _trained("torch_legacy", net)
    source.train()
    source(randn(*NETS[net][1], seed=5))  # a training forward: `weight` is W_sn for the stored u
    state = collections.OrderedDict()
    for key, value in source.state_dict().items():
        if key.endswith("weight_v"):
            layer = source.get_submodule(key[: -len("weight_v")].rstrip("."))
            state[key[: -len("_v")]] = layer.weight.detach().clone()
        else:
            state[key] = value.clone()
    state._metadata = copy.deepcopy(source.state_dict()._metadata)
    for _prefix, meta in state._metadata.items():
        if metadata == "absent":
            meta.pop("spectral_norm", None)
        elif "spectral_norm" in meta:
            meta["spectral_norm"] = {"weight.version": 0}
    oracle = _build("torch_legacy", net)
    oracle.load_state_dict(copy.deepcopy(state))
    return state, oracle


@pytest.mark.parametrize("metadata", ["absent", "version_0"])
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("kind", ["sn_ext_legacy", "sn_ext"])
def test_legacy_version_0_checkpoint_loads_as_in_torch(kind, net, metadata):
    state, oracle = _version_0_state(net, metadata)
    assert not any(k.endswith("weight_v") for k in state)
    target = _build(kind, net)
    result = target.load_state_dict(copy.deepcopy(state))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    for got, want in zip(_sn_tensors(target), _sn_tensors(oracle), strict=True):
        assert_rel(got, want, TOL[torch.float32], "tensor after loading a version-0 checkpoint")
    assert_rel(_eval_out(target, net), _eval_out(oracle, net), TOL[torch.float32], "eval output")
    if kind in LEGACY:  # same algorithm: training continues as torch's
        for module in (target, oracle):
            module.train()
        x = randn(*NETS[net][1], seed=11)
        for step in range(2):
            assert_rel(target(x), oracle(x), 10 * TOL[torch.float32], f"train step {step}")
    # A version-1 state dict that merely lacks the metadata (hand-made) loads as it is.
    plain = _trained("torch_legacy", net).state_dict()
    plain = collections.OrderedDict(plain)  # no _metadata at all
    _build(kind, net).load_state_dict(plain)


# ---------------------------------------------------------------------------------------------------------------
# Other loading patterns


@pytest.mark.parametrize("src_kind", ["torch", "torch_legacy", "sn_ext"])
@pytest.mark.parametrize("kind", ["sn_ext", "sn_ext_legacy"])
def test_meta_device_model_loads_with_assign(kind, src_kind):
    source = _trained(src_kind)
    with torch.device("meta"):
        target = _build(kind)
    assert all(t.is_meta for t in _sn_tensors(target))
    result = target.load_state_dict(copy.deepcopy(source.state_dict()), assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    for got, want in zip(_sn_tensors(target), _sn_tensors(source), strict=True):
        assert not got.is_meta and torch.equal(got, want)
    assert_rel(_eval_out(target), _eval_out(source), TOL[torch.float32], "eval output")
    target.train()
    target(randn(*NETS["nested"][1], seed=3)).sum().backward()  # and it trains
    assert all(torch.isfinite(t).all() for t in _sn_tensors(target))


@pytest.mark.parametrize("kind", ["sn_ext", "sn_ext_legacy"])
def test_checkpoint_in_another_dtype_loads(kind):
    source = _trained("torch_legacy" if kind == "sn_ext" else "torch").double()
    target = _build(kind)  # float32
    target.load_state_dict(_through_file(source.state_dict(), "cpu"))
    for got, want in zip(_sn_tensors(target), _sn_tensors(source), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want.float())
    assert_rel(_eval_out(target), _eval_out(source), TOL[torch.float32], "eval output")
