"""Choosing the kernels (sn_ext.backends): the `backend=` argument and $SN_EXT_BACKEND, what "auto" picks, that
every backend gives the same numbers, that a choice costs nothing per step, and the errors that say why a named
backend cannot run. The Triton kernels themselves are tested by op (the triton cases of test_<op>.py) and in
test_triton.py."""

import copy
import io

import pytest
import torch
from helpers import small_backend_net
from torch import nn
from torch.nn.utils import parametrize

import sn_ext
from sn_ext import backends

USABLE = [name for name in backends.BACKENDS if name != "triton" and not backends.get(name).unavailable_reasons()]
UNUSABLE = [name for name in backends.BACKENDS if name != "triton" and backends.get(name).unavailable_reasons()]
REGISTER = {"parametrization": sn_ext.spectral_norm, "legacy": sn_ext.legacy.spectral_norm}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _hooks(net: nn.Module) -> list:
    """The spectral norm objects (parametrization modules or legacy hooks) of a net."""
    found = []
    for module in net.modules():
        if parametrize.is_parametrized(module, "weight"):
            found += [p for p in module.parametrizations.weight if isinstance(p, sn_ext.SpectralNorm)]
        found += [h for h in module._forward_pre_hooks.values() if isinstance(h, sn_ext.legacy.SpectralNorm)]
    return found


def _net(kind: str, backend=None, device="cpu", dtype=torch.float64) -> nn.Module:
    return small_backend_net(REGISTER[kind], backend, device, dtype)


def _expected_auto(device_type: str) -> str:
    if device_type == "cuda":
        return next(n for n in ("cuda", "triton", "reference") if not backends.get(n).unavailable_reasons())
    return "cpu" if not backends.get("cpu").unavailable_reasons() else "reference"


@pytest.mark.parametrize("kind", list(REGISTER))
def test_default_is_auto(kind, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    hooks = _hooks(_net(kind, device=DEVICE))
    assert len(hooks) == 3
    for hook in hooks:
        assert hook.backend == "auto"
        assert hook._kernels.backend.name == _expected_auto(DEVICE)


@pytest.mark.parametrize("backend", USABLE)
@pytest.mark.parametrize("kind", list(REGISTER))
def test_every_backend_gives_the_same_numbers(kind, backend):
    """Train steps (with weight updates), then eval: outputs, gradients and buffers as the default choice's."""
    nets = [_net(kind), _net(kind, backend=backend)]
    assert all(h._kernels.backend.name == backend for h in _hooks(nets[1]))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for step in range(4):
        if step == 3:
            for net in nets:
                net.eval()
        outs = [net(x) for net in nets]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=0)
        for net, out in zip(nets, outs):
            net.zero_grad()
            out.square().sum().backward()
            with torch.no_grad():
                for param in net.parameters():
                    param -= 0.1 * param.grad
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
        for a, b in zip(nets[0].buffers(), nets[1].buffers()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(REGISTER))
def test_environment_variable_when_no_argument(kind, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert {h._kernels.backend.name for h in _hooks(_net(kind))} == {"reference"}
    explicit = "cpu" if "cpu" in USABLE else "auto"
    assert {h.backend for h in _hooks(_net(kind, backend=explicit))} == {explicit}  # the argument wins
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"unknown backend 'fastest' \(from SN_EXT_BACKEND\)"):
        _net(kind)


@pytest.mark.parametrize("kind", list(REGISTER))
def test_unknown_backend_is_a_value_error(kind):
    layer = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*auto, cpu, cuda, triton, reference"):
        REGISTER[kind](layer, backend="gpu")
    assert not parametrize.is_parametrized(layer) and not layer._forward_pre_hooks


@pytest.mark.skipif(not UNUSABLE, reason="every compiled backend can run here")
@pytest.mark.parametrize("kind", list(REGISTER))
@pytest.mark.parametrize("backend", UNUSABLE)
def test_unusable_backend_says_why(kind, backend):
    layer = nn.Linear(3, 4)
    reasons = backends.get(backend).unavailable_reasons()
    with pytest.raises(backends.BackendUnavailable, match=f"'{backend}' backend cannot run here") as info:
        REGISTER[kind](layer, backend=backend)
    assert all(reason in str(info.value) for reason in reasons)
    assert not parametrize.is_parametrized(layer) and not layer._forward_pre_hooks
    with pytest.raises(backends.BackendUnavailable, match=f"'{backend}' backend cannot take"):
        backends.select(backend, "cpu", torch.float32)


@pytest.mark.skipif("cpu" not in USABLE, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("kind", list(REGISTER))
def test_backend_refuses_a_weight_it_cannot_take(kind):
    layer = _net(kind, backend="cpu")[0]
    layer.to("meta")
    with pytest.raises(
        backends.BackendUnavailable,
        match=r"'cpu' backend cannot take a torch.float64 weight on meta: it takes CPU tensors",
    ):
        layer(torch.empty(1, 3, 5, 5, device="meta", dtype=torch.float64))


@pytest.mark.skipif("cpu" not in USABLE, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("kind", list(REGISTER))
def test_built_where_the_backend_cannot_run_then_moved(kind):
    """A model built on one device for another: registering works (the warm-up uses "auto"), the module chooses
    again when it runs."""
    layer = REGISTER[kind](nn.Linear(5, 4, device="meta"), backend="cpu")
    (hook,) = _hooks(layer)
    assert hook._kernels.backend is None  # not chosen yet
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*layer.parameters(), *layer.buffers()]:
            tensor.copy_(torch.nn.functional.normalize(torch.randn(tensor.shape), dim=0))
    layer(torch.randn(2, 5))
    assert hook._kernels.backend.name == "cpu" and hook._kernels.device == torch.device("cpu")


@pytest.mark.parametrize("kind", list(REGISTER))
def test_the_choice_costs_nothing_per_step(kind, monkeypatch):
    net = _net(kind)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    net(x)
    calls = []
    real = backends._choose
    monkeypatch.setattr(backends, "_choose", lambda *args: calls.append(args) or real(*args))
    monkeypatch.setattr(backends, "_CHOSEN", {})  # a choice would show as a call
    for _ in range(3):
        net(x).sum().backward()
    assert calls == []
    net.float()  # cast: one new choice per (name, device, dtype), then none again
    for _ in range(3):
        net(x.float())
    assert calls == [("auto", torch.device("cpu"), torch.float32)]
    assert all(h._kernels.dtype == torch.float32 for h in _hooks(net))


def test_deepcopy_and_pickle():
    net = _net("legacy", backend="reference")
    (hook, *_) = _hooks(net)
    clone = copy.deepcopy(net)
    assert _hooks(clone)[0]._kernels is hook._kernels
    buffer = io.BytesIO()
    torch.save(net, buffer)  # ops do not pickle: the choice is made again when the module first runs
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _hooks(loaded)[0].backend == "reference" and _hooks(loaded)[0]._kernels.backend is None
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert _hooks(loaded)[0]._kernels.backend.name == "reference"


def test_info_lists_every_backend_and_the_automatic_choice():
    info = sn_ext.info()
    assert set(info["backends"]) == set(backends.BACKENDS)
    for name, entry in info["backends"].items():
        assert set(entry) == {"usable", "reason"} and entry["reason"], name
        assert entry["usable"] == (not backends.get(name).unavailable_reasons())
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    assert list(info["auto"]) == devices
    for device in devices:
        assert info["auto"][device] == {
            **{dtype: _expected_auto(device) for dtype in ("float32", "float64", "float16", "bfloat16")},
            "complex64": "reference",
            "complex128": "reference",
        }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_ops_opcheck(dtype):
    weight = torch.randn(4, 3, 2, 3, dtype=dtype)
    u = torch.nn.functional.normalize(torch.randn(3), dim=0).to(dtype)
    v = torch.nn.functional.normalize(torch.randn(24), dim=0).to(dtype)
    forward = torch.ops.sn_ext.reference_spectral_normalize_.default
    backward = torch.ops.sn_ext.reference_spectral_normalize_backward.default
    torch.library.opcheck(forward, (weight.requires_grad_(), u, v, 1, 1, 1e-12, False))
    sigma = torch.tensor(1.3, requires_grad=True)
    grad = torch.randn(4, 3, 2, 3, dtype=dtype, requires_grad=True)
    torch.library.opcheck(backward, (grad, weight.detach().requires_grad_(), u, v, sigma, 1))


def test_a_built_library_is_loaded():
    """A compiled library that exists for this interpreter but fails to load (built against another torch, a
    missing symbol) fails here with its reason, instead of every compiled-kernel test skipping."""
    import importlib.util
    import os

    if os.environ.get("SN_EXT_DISABLE_EXT") == "1":
        pytest.skip("SN_EXT_DISABLE_EXT=1: the fallback is tested")
    if importlib.util.find_spec("sn_ext._C") is None:
        pytest.skip("no compiled library was built for this interpreter")
    assert sn_ext.ops.library_status.loaded, sn_ext.ops.library_status.reason
    if torch.cuda.is_available() and sn_ext.ops.library_status.built_with_cuda:
        assert not backends.get("cuda").unavailable_reasons(), backends.get("cuda").unavailable_reasons()
