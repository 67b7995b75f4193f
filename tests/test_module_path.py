"""The fast `module.<name>` of sn_ext's parametrization (sn_ext/nn/_parametrize.py): the same tensors, gradients and
buffers as torch.nn.utils.parametrize's own property in every case, with its short path only where torch's would do
nothing more (hooks, parametrize.cached(), stacked parametrizations, torch.jit.trace all keep torch's behaviour)."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_ext
from sn_ext.nn import _parametrize


def _layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sn_ext.spectral_norm(nn.Conv2d(3, 7, (3, 2)))


def _reference_weight(module: nn.Module) -> torch.Tensor:
    """module.weight as torch's property computes it: the ParametrizationList called."""
    return module.parametrizations.weight()


def test_the_fast_property_is_installed_and_keeps_the_setter():
    layer = _layer()
    prop = type(layer).__dict__["weight"]
    assert getattr(prop.fget, "sn_ext_fast", False)
    assert prop.fset is not None
    value = torch.randn_like(layer.parametrizations.weight.original)
    layer.weight = value  # torch's setter: right_inverse, which sets W itself
    torch.testing.assert_close(layer.parametrizations.weight.original, value, rtol=0, atol=0)


def test_the_short_path_skips_the_list_and_the_fallback_takes_it(monkeypatch):
    calls = []
    forward = parametrize.ParametrizationList.forward
    monkeypatch.setattr(parametrize.ParametrizationList, "forward", lambda self: calls.append(1) or forward(self))
    layer = _layer()
    calls.clear()
    layer.weight
    assert not calls
    with parametrize.cached():
        layer.weight
    assert calls


@pytest.mark.parametrize("training", [True, False])
def test_same_weight_gradient_and_buffers_as_torchs_path(training):
    fast, slow = _layer(1), _layer(1)
    fast.train(training), slow.train(training)
    for _ in range(3):
        a, b = fast.weight, _reference_weight(slow)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        grad = torch.randn_like(a)
        a.backward(grad), b.backward(grad)
    torch.testing.assert_close(fast.parametrizations.weight.original.grad, slow.parametrizations.weight.original.grad)
    for (name, x), (_, y) in zip(fast.named_buffers(), slow.named_buffers()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def _hook_cases():
    def on_parametrization(layer, hook):
        return layer.parametrizations.weight[0].register_forward_hook(hook)

    def on_list(layer, hook):
        return layer.parametrizations.weight.register_forward_hook(hook)

    def pre_on_parametrization(layer, hook):
        return layer.parametrizations.weight[0].register_forward_pre_hook(lambda m, args: hook(m, args, None))

    def global_hook(layer, hook):
        return nn.modules.module.register_module_forward_hook(hook)

    return {
        "parametrization": on_parametrization,
        "list": on_list,
        "pre": pre_on_parametrization,
        "global": global_hook,
    }


@pytest.mark.parametrize("where", list(_hook_cases()))
def test_hooks_added_after_registration_still_run(where):
    layer = _layer()
    calls = []
    handle = _hook_cases()[where](layer, lambda m, args, out: calls.append(type(m).__name__))
    try:
        layer.weight
    finally:
        handle.remove()
    assert calls, f"a {where} hook did not run"
    calls.clear()
    layer.weight
    assert not calls


def test_cached_returns_one_tensor_per_context():
    layer = _layer()
    with parametrize.cached():
        first, second = layer.weight, layer.weight
        assert first is second
    assert layer.weight is not first


def test_a_stacked_parametrization_is_applied():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    layer = _layer().eval()
    single = layer.weight
    parametrize.register_parametrization(layer, "weight", Double())
    torch.testing.assert_close(layer.weight, 2 * single, rtol=0, atol=0)


def test_a_parametrization_swapped_in_place_is_the_one_called():
    """restore_torch_spectral_norm swaps parametrizations[name][0]: the property has no memory of the old one."""
    layer = _layer().eval()
    sn_ext.restore_torch_spectral_norm(layer)
    assert type(layer.parametrizations.weight[0]).__module__ == "torch.nn.utils.parametrizations"
    torch.testing.assert_close(layer.weight, _reference_weight(layer), rtol=0, atol=0)


def test_deep_copies():
    layer = _layer().eval()
    twin = copy.deepcopy(layer)
    twin.parametrizations.weight.original.data.add_(torch.randn_like(twin.parametrizations.weight.original))
    torch.testing.assert_close(twin.weight, _reference_weight(twin), rtol=0, atol=0)  # the twin's own tensors
    assert not torch.allclose(twin.weight, layer.weight)


def test_removal():
    layer = _layer().eval()
    expected = layer.weight
    parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is nn.Conv2d and isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)


def test_jit_trace_takes_torchs_path():
    layer = _layer().eval()
    x = torch.randn(2, 3, 6, 6)
    traced = torch.jit.trace(layer, x, check_trace=False)
    torch.testing.assert_close(traced(x), layer(x))


def test_install_is_idempotent_and_ignores_plain_attributes():
    layer = _layer()
    prop = type(layer).__dict__["weight"]
    _parametrize.install(layer, "weight")
    assert type(layer).__dict__["weight"] is prop
    _parametrize.install(layer, "bias")  # a parameter, not a property: nothing to replace
    assert "bias" not in type(layer).__dict__


USABLE = [
    b
    for b in sn_ext.backends.BACKENDS
    if b != "triton" and not sn_ext.backends.get(b).not_supported_reasons("cpu", torch.float32)
]


@pytest.mark.parametrize("backend", USABLE)
@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("needs_grad", ["weight", "u", "grad"])
def test_the_ops_record_a_graph_exactly_when_autograd_would(backend, grad_mode, needs_grad):
    """The Autograd kernels call the ops directly when nothing is recorded (no_grad, or no input requiring grad),
    else through their autograd Functions: outputs with a grad_fn exactly in the second case, for the forward and
    the backward op (which a backward with create_graph=True records)."""
    be = sn_ext.backends.get(backend)
    gen = torch.Generator().manual_seed(5)
    weight, grad = torch.randn(6, 2, 3, generator=gen), torch.randn(6, 2, 3, generator=gen)
    u, v = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    {"weight": weight, "u": u, "grad": grad}[needs_grad].requires_grad_()
    records = grad_mode and needs_grad != "grad"
    with torch.set_grad_enabled(grad_mode):
        weight_sn, sigma, u_used, v_used = be.forward(weight, u, v, 0, 1, 1e-12, False)
        assert (weight_sn.grad_fn is not None) == records and (sigma.grad_fn is not None) == records
        assert u_used.grad_fn is None and v_used.grad_fn is None
        out = be.backward(grad, weight_sn, u_used, v_used, sigma, 0)
        assert (out.grad_fn is not None) == (grad_mode and (records or grad.requires_grad))
    reference = (grad - (grad * weight_sn).sum() * torch.outer(u_used, v_used).reshape(6, 2, 3)) / sigma
    torch.testing.assert_close(out.detach(), reference.detach())


@pytest.mark.parametrize("backend", USABLE)
@pytest.mark.parametrize("grad_mode", [True, False])
def test_a_dual_weight_is_refused_not_stripped_of_its_tangent(backend, grad_mode):
    """Forward-mode AD: the ops' autograd Functions have no jvp, so a dual weight must raise (as Function.apply
    does), also under no_grad, where the Autograd kernels would otherwise call the op directly and return a weight
    without the tangent: a silently wrong Jacobian-vector product."""
    import torch.autograd.forward_ad as fwAD

    be = sn_ext.backends.get(backend)
    gen = torch.Generator().manual_seed(6)
    weight, tangent = torch.randn(6, 2, 3, generator=gen), torch.randn(6, 2, 3, generator=gen)
    u, v = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        dual = fwAD.make_dual(weight, tangent)
        with pytest.raises(RuntimeError, match="(?i)jvp|forward"):
            be.forward(dual, u, v, 0, 1, 1e-12, False)


@pytest.mark.parametrize("backend", USABLE)
def test_the_forwards_graph_keeps_autogrades_guards(backend):
    """The forward's backward node (csrc/autograd.cpp's SpectralNormalizeNode where the compiled library is loaded)
    keeps what autograd guarantees for its saved tensors: a second backward without retain_graph is refused, one
    with it gives the same gradient, an in-place change of W_sn before the backward is caught, and
    saved_tensors_hooks see every saved tensor, whose unpacked copies give the same gradient."""
    be = sn_ext.backends.get(backend)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    u, v, grad = torch.randn(5, generator=gen), torch.randn(6, generator=gen), torch.randn(5, 2, 3, generator=gen)
    u, v, grad = u.double(), v.double(), grad.double()

    def gradient(**backward) -> torch.Tensor:
        weight_sn, sigma, _, _ = be.forward(weight, u.clone(), v.clone(), 0, 1, 1e-12, False)
        (gw,) = torch.autograd.grad((weight_sn * grad).sum() + 2 * sigma, weight, **backward)
        return gw

    expected = gradient()
    weight_sn, sigma, _, _ = be.forward(weight, u.clone(), v.clone(), 0, 1, 1e-12, False)
    loss = (weight_sn * grad).sum() + 2 * sigma
    torch.testing.assert_close(torch.autograd.grad(loss, weight, retain_graph=True)[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, weight)[0], expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, weight)

    weight_sn, _, _, _ = be.forward(weight, u.clone(), v.clone(), 0, 1, 1e-12, False)
    loss = (weight_sn * grad).sum()
    weight_sn.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        weight_sn, sigma, u_used, v_used = be.forward(weight, u.clone(), v.clone(), 0, 1, 1e-12, False)
    saved = {t.data_ptr() for t in (weight_sn, sigma, u_used, v_used)}  # hooks may get detached aliases
    assert len(packed) == 4 and saved == {t.data_ptr() for t in packed}
    (gw,) = torch.autograd.grad((weight_sn * grad).sum() + 2 * sigma, weight)
    torch.testing.assert_close(gw, expected, rtol=0, atol=0)


def test_a_parametrized_buffer():
    """torch keeps a parametrized buffer's original as a buffer of the ParametrizationList: read from there."""
    module = nn.Module()
    module.register_buffer("weight", torch.randn(5, 4, generator=torch.Generator().manual_seed(2)))
    sn_ext.spectral_norm(module).eval()
    assert "original" in module.parametrizations.weight._buffers
    torch.testing.assert_close(module.weight, _reference_weight(module), rtol=0, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(module.weight, 2), torch.tensor(1.0), rtol=1e-3, atol=0)


# ---- the direct binding of spectral_normalize_ (sn_ext.ops.eager_forward, csrc/python_module.cpp) ----

needs_binding = pytest.mark.skipif(not sn_ext.ops.library_status.loaded, reason="the compiled library's binding")
OP = torch.ops.sn_ext.spectral_normalize_.default


def _args(seed: int = 8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 7, 2, generator=gen, dtype=dtype).transpose(0, 1)  # non-contiguous, odd sizes
    u, v = torch.randn(7, generator=gen, dtype=dtype), torch.randn(6, generator=gen, dtype=dtype)
    return weight, u, v


@needs_binding
def test_modules_call_the_binding_and_it_is_the_op():
    """The compiled backend's Kernels call the binding, which returns the op's results bit for bit, updates u and v
    in place (bumping their versions) and records the same graph (same gradient)."""
    kernels = sn_ext.backends.select("cpu", "cpu", torch.float32)
    assert kernels.forward is sn_ext.ops.eager_forward("spectral_normalize_") and kernels.forward is not OP
    weight, u, v = _args()
    leaf = weight.clone().requires_grad_()
    u1, v1, u2, v2 = u.clone(), v.clone(), u.clone(), v.clone()
    versions = u1._version, v1._version
    by_binding = kernels.forward(leaf, u1, v1, 0, 2, 1e-12)
    by_op = OP(leaf, u2, v2, 0, 2, 1e-12, False)
    assert (u1._version, v1._version) != versions
    for a, b in zip((*by_binding, u1, v1), (*by_op, u2, v2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert by_binding[0].grad_fn is not None and by_binding[2].grad_fn is None
    grad = torch.randn_like(weight)
    (g1,) = torch.autograd.grad((by_binding[0] * grad).sum() + by_binding[1], leaf)
    (g2,) = torch.autograd.grad((by_op[0] * grad).sum() + by_op[1], leaf)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@needs_binding
@pytest.mark.parametrize("dim, eps, v_first", [(0, 0, False), (0, 1e-12, 0), (-3, 1e-12, True)])
def test_the_binding_hands_other_argument_types_to_torch_ops(dim, eps, v_first):
    """An int eps or v_first (not the exact float / bool the binding takes), or a negative dim, gives the op's
    result; a wrong type gives torch.ops' error naming the argument."""
    forward = sn_ext.ops.eager_forward("spectral_normalize_")
    weight, u, v = _args()
    u2, v2 = u.clone(), v.clone()
    for a, b in zip(forward(weight, u, v, dim, 1, eps, v_first), OP(weight, u2, v2, dim, 1, float(eps), bool(v_first))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="dim"):
        forward(weight, u, v, "0", 1, 1e-12, False)


class _Logged(torch.Tensor):
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _FunctionMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


class _DispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@needs_binding
def test_modes_subclasses_and_tracers_see_the_op():
    """What must see the op still does with the binding: a __torch_function__ subclass and a torch function mode
    (handed to torch.ops), a dispatch mode, FakeTensorMode, meta tensors, autocast, jit.trace and vmap (through
    the dispatcher either way)."""
    forward = sn_ext.ops.eager_forward("spectral_normalize_")
    weight, u, v = _args()
    _Logged.seen.clear()
    forward(weight.as_subclass(_Logged), u.clone(), v.clone(), 0, 1, 1e-12)
    assert OP in _Logged.seen
    for mode in (_FunctionMode(), _DispatchMode()):
        with mode:
            forward(weight, u.clone(), v.clone(), 0, 1, 1e-12)
        assert OP in mode.seen, type(mode).__name__
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode() as fake_mode:
        out = forward(*(fake_mode.from_tensor(t) for t in (weight, u, v)), 0, 1, 1e-12)
    assert all(isinstance(t, FakeTensor) for t in out) and out[0].shape == weight.shape
    out = forward(*(t.to("meta") for t in (weight, u, v)), 0, 1, 1e-12)
    assert out[0].device.type == "meta" and out[1].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert forward(weight, u.clone(), v.clone(), 0, 1, 1e-12)[0].dtype == torch.float32
    traced = torch.jit.trace(lambda w, u, v: forward(w, u, v, 0, 1, 1e-12)[0], (weight, u.clone(), v.clone()))
    assert "sn_ext::spectral_normalize_" in str(traced.graph)
    with pytest.raises(RuntimeError, match="(?i)batch"):
        torch.vmap(lambda w: forward(w, u.clone(), v.clone(), 0, 1, 1e-12)[0])(torch.stack([weight, weight]))
