"""What torch's own spectral-norm tests exercise, written from torch's documented behaviour: a second spectral norm
stacked on a tensor, complex weights, and removal of the legacy version leaving nothing behind. Each is compared
with the installed torch (the oracle) on every backend that runs here, on fresh random inputs and odd sizes."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import parametrize
from torch.nn.utils import remove_spectral_norm as torch_remove_legacy
from torch.nn.utils import spectral_norm as torch_legacy
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook

import sn_ext
from sn_ext import backends
from sn_ext.nn.legacy_hook import SpectralNorm as LegacyHook

# The Triton kernels run in their own tests (the triton cases of test_<op>.py, in the interpreter child of
# test_triton.py); every other usable backend here.
BACKENDS = [name for name in backends.BACKENDS if name != "triton" and not backends.get(name).unavailable_reasons()]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(make, dtype, seed):
    torch.manual_seed(seed)
    base = make().to(device=DEVICE, dtype=dtype)
    return copy.deepcopy(base), copy.deepcopy(base)


def _close(ours, theirs, dtype, what):
    assert_rel(ours, theirs, 1e-12 if dtype in (torch.float64, torch.complex128) else 2e-5, what)


LAYERS = {
    "conv2d_5x3x3x3": lambda: nn.Conv2d(3, 5, 3),
    "conv_transpose_dim1": lambda: nn.ConvTranspose2d(4, 3, (2, 3)),
    "linear_7x13": lambda: nn.Linear(13, 7),
}
INPUTS = {"conv2d_5x3x3x3": (2, 3, 6, 5), "conv_transpose_dim1": (2, 4, 3, 3), "linear_7x13": (3, 13)}


def _steps(theirs, ours, layer, dtype, original, steps=3):
    """Train steps (two forwards, one backward) then an eval forward; outputs, gradients and buffers compared."""
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        x = torch.randn(INPUTS[layer], generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        out_t, out_o = theirs(x) + theirs(2 * x), ours(x) + ours(2 * x)
        _close(out_o, out_t, dtype, f"output at step {step}")
        out_t.abs().sum().backward()
        out_o.abs().sum().backward()
        _close(original(ours).grad, original(theirs).grad, dtype, f"gradient at step {step}")
    for key, value in theirs.state_dict().items():
        _close(ours.state_dict()[key], value, dtype, f"state_dict[{key!r}]")
    theirs.eval(), ours.eval()
    x = torch.randn(INPUTS[layer], generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    _close(ours(x), theirs(x), dtype, "eval output")


def _original(module):
    return module.parametrizations.weight.original


# ---------------------------------------------------------------------------------------------------------------
# Stacking


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", ["torch", "sn_ext"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_second_spectral_norm_stacks_as_torchs(layer, first, backend):
    theirs, ours = _pair(LAYERS[layer], torch.float64, seed=1)
    torch.manual_seed(2)
    torch_param.spectral_norm(theirs)
    torch_param.spectral_norm(theirs, n_power_iterations=2)
    torch.manual_seed(2)
    if first == "torch":
        torch_param.spectral_norm(ours)
    else:
        sn_ext.spectral_norm(ours, backend=backend)
    with pytest.warns(UserWarning, match="already has a spectral norm; a second one is stacked"):
        sn_ext.spectral_norm(ours, n_power_iterations=2, backend=backend)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [k for k in ours.state_dict() if k.endswith("_u")] == [
        "parametrizations.weight.0._u",
        "parametrizations.weight.1._u",
    ]
    assert len(ours.parametrizations.weight) == 2
    _steps(theirs, ours, layer, torch.float64, _original)


def test_stacked_spectral_norm_loads_torchs_checkpoint_and_removes():
    theirs, ours = _pair(LAYERS["conv2d_5x3x3x3"], torch.float64, seed=3)
    for register, module in ((torch_param.spectral_norm, theirs), (sn_ext.spectral_norm, ours)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            register(register(module))
    theirs(torch.randn(INPUTS["conv2d_5x3x3x3"], dtype=torch.float64))  # a step: buffers differ from ours now
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = torch.randn(INPUTS["conv2d_5x3x3x3"], dtype=torch.float64)
    _close(ours(x), theirs(x), torch.float64, "eval output after loading torch's checkpoint")
    parametrize.remove_parametrizations(ours, "weight")
    parametrize.remove_parametrizations(theirs, "weight")
    _close(ours.weight, theirs.weight, torch.float64, "baked weight")
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_grouped_mode_refuses_a_stacked_layer_before_any_change():
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sn_ext.spectral_norm(sn_ext.spectral_norm(model[1]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        RuntimeError, match=r"'1' \(Linear\), tensor 'weight' has 2 parametrization\(s\) \(SpectralNorm, SpectralNorm\)"
    ):
        sn_ext.grouped_spectral_norm(model)
    assert not hasattr(model, "_sn_ext_group") and not parametrize.is_parametrized(model[0])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------------------------
# Complex weights


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_complex_weights_give_torchs_numbers(layer, dtype):
    theirs, ours = _pair(LAYERS[layer], dtype, seed=4)
    torch.manual_seed(5)
    torch_param.spectral_norm(theirs)
    torch.manual_seed(5)
    sn_ext.spectral_norm(ours)
    sn = ours.parametrizations.weight[0]
    assert sn._u.dtype == dtype and sn._v.dtype == dtype
    assert ours.parametrizations.weight[0]._kernels.backend.name == "reference"
    _steps(theirs, ours, layer, dtype, _original)


def test_complex_gradients_pass_gradcheck():
    """Wirtinger gradients: of the op (n = 0: sigma = u^H W v with u, v fixed, as torch differentiates it) and of the
    module's W -> W / sigma in eval mode; the backward is (G - <W_sn, G> u v^H) / conj(sigma)."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(4, 3, 2, generator=gen, dtype=torch.complex128, requires_grad=True)
    u = F.normalize(torch.randn(3, generator=gen, dtype=torch.complex128), dim=0)
    v = F.normalize(torch.randn(8, generator=gen, dtype=torch.complex128), dim=0)
    op = torch.ops.sn_ext.reference_spectral_normalize_.default
    assert torch.autograd.gradcheck(lambda w: op(w, u, v, 1, 0, 1e-12)[0], (weight,))
    layer = sn_ext.spectral_norm(nn.Conv1d(3, 4, 2, dtype=torch.complex128)).eval()
    norm = layer.parametrizations.weight[0]
    assert torch.autograd.gradcheck(norm, (_original(layer).detach().clone().requires_grad_(),))


def test_complex_sigma_is_real_after_a_round_and_torchs_vdot_in_eval():
    weight = torch.randn(6, 5, dtype=torch.complex128)
    u = F.normalize(torch.randn(6, dtype=torch.complex128), dim=0)
    v = F.normalize(torch.randn(5, dtype=torch.complex128), dim=0)
    op = torch.ops.sn_ext.reference_spectral_normalize_.default
    _, sigma, u1, v1 = op(weight, u, v, 0, 3, 1e-12)
    assert sigma.imag.item() == 0 and sigma.real.item() > 0
    _close(sigma, torch.vdot(u1, weight @ v1), torch.complex128, "sigma = u^H W v")
    _, sigma0, _, _ = op(weight, u, v, 0, 0, 1e-12)
    assert sigma0 == torch.vdot(u, weight @ v)  # eval: exactly torch's complex vdot


def test_complex_weights_are_refused_by_the_kernels_saying_why():
    assert sn_ext.info()["auto"]["cpu"]["complex64"] == "reference"
    if "cpu" in BACKENDS:  # the compiled library is loaded
        reasons = backends.get("cpu").not_supported_reasons("cpu", torch.complex64)
        assert any("complex weights run on the reference backend only" in r for r in reasons), reasons
        layer = sn_ext.spectral_norm(nn.Linear(3, 4, dtype=torch.complex64), backend="cpu")
        with pytest.raises(backends.BackendUnavailable, match="complex weights run on the reference backend"):
            layer.weight
    with pytest.raises(TypeError, match=r"complex weights: sn_ext.spectral_norm"):
        sn_ext.legacy.spectral_norm(nn.Linear(3, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex weights run on the reference backend only, per layer"):
        sn_ext.grouped_spectral_norm(nn.Sequential(nn.Linear(3, 4, dtype=torch.complex64)))


# ---------------------------------------------------------------------------------------------------------------
# Removal of the legacy version


def _hook_kinds(module: nn.Module) -> dict[str, int]:
    return {
        name: len(getattr(module, name))
        for name in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_state_dict_hooks",
            "_state_dict_pre_hooks",
            "_load_state_dict_pre_hooks",
            "_load_state_dict_post_hooks",
        )
    }


@pytest.mark.parametrize("remove", ["torch", "sn_ext"])
def test_legacy_removal_leaves_what_torchs_leaves(remove):
    """Either function (sn_ext.legacy.remove_spectral_norm is torch's) on sn_ext's hook, against torch's on its own."""
    remove_ours = torch_remove_legacy if remove == "torch" else sn_ext.legacy.remove_spectral_norm
    theirs, ours = _pair(LAYERS["conv_transpose_dim1"], torch.float32, seed=8)
    for _ in range(3):  # register/remove cycles must not pile anything up
        torch.manual_seed(9)
        torch_legacy(theirs)
        torch.manual_seed(9)
        sn_ext.legacy.spectral_norm(ours)
        x = torch.randn(INPUTS["conv_transpose_dim1"])
        theirs(x), ours(x)
        assert ours.state_dict()._metadata[""] == theirs.state_dict()._metadata[""]
        torch_remove_legacy(theirs)
        remove_ours(ours)
        _assert_removed_as_torchs(ours, theirs)


# sn_ext's legacy spectral norm on a layer, made each way a user makes it; in a model (nn.Sequential) that is
# grouped in the "grouped" case.
def _converted(make):
    return sn_ext.convert_spectral_norm(nn.Sequential(torch_legacy(make())))


def _grouped(make):
    return sn_ext.convert_spectral_norm(nn.Sequential(torch_legacy(make())), grouped=True)


def _patched(make):
    with sn_ext.patch_torch():
        return nn.Sequential(torch.nn.utils.spectral_norm(make()))  # torch's name, patched


SN_EXT_LEGACY = {
    "sn_ext.legacy": lambda make: nn.Sequential(sn_ext.legacy.spectral_norm(make())),
    "converted": _converted,
    "grouped": _grouped,
    "patched": _patched,
}


def _hooks(module: nn.Module) -> dict[str, list]:
    return {name: list(getattr(module, name).values()) for name in _hook_kinds(module)}


def _assert_removed_as_torchs(ours: nn.Module, theirs: nn.Module) -> None:
    """The same attributes, parameters, buffers, hooks and state dict as torch's removal of torch's hook left; and
    no object of sn_ext's anywhere on the module."""
    assert type(ours) is type(theirs) and sorted(vars(ours)) == sorted(vars(theirs))
    assert [(n, type(p)) for n, p in ours.named_parameters()] == [(n, type(p)) for n, p in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()] == []
    for (name, p_ours), (_, p_theirs) in zip(ours.named_parameters(), theirs.named_parameters()):
        _close(p_ours, p_theirs, torch.float32, name)
    hooks_ours, hooks_theirs = _hooks(ours), _hooks(theirs)
    # torch leaves its load_state_dict pre-hook behind (its isinstance check misses the _WrappedHook that torch
    # wraps it in; it then makes a strict load of the module's own state dict fail): sn_ext leaves none.
    stale = [
        h for h in hooks_theirs["_load_state_dict_pre_hooks"] if isinstance(h.hook, SpectralNormLoadStateDictPreHook)
    ]
    hooks_theirs["_load_state_dict_pre_hooks"] = [
        h for h in hooks_theirs["_load_state_dict_pre_hooks"] if h not in stale
    ]
    assert hooks_ours == hooks_theirs == {name: [] for name in hooks_ours}
    state_ours, state_theirs = ours.state_dict(), theirs.state_dict()
    assert list(state_ours) == list(state_theirs) and state_ours._metadata == state_theirs._metadata
    ours.load_state_dict(state_theirs)  # strict


@pytest.mark.parametrize("made", list(SN_EXT_LEGACY))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_torchs_remove_spectral_norm_on_sn_ext_legacy_layers(layer, made):
    """torch.nn.utils.remove_spectral_norm itself, as packages call it from their export code: on sn_ext's hook,
    however it was made, it leaves what it leaves of torch's hook, and nothing of sn_ext's."""
    torch.manual_seed(10)
    theirs = torch_legacy(LAYERS[layer]())
    torch.manual_seed(10)
    model = SN_EXT_LEGACY[made](LAYERS[layer])
    ours = model[0]
    assert any(isinstance(h, LegacyHook) for h in ours._forward_pre_hooks.values())
    assert hasattr(model, "_sn_ext_group") == (made == "grouped")
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):  # train steps: u and v move
        x = torch.randn(INPUTS[layer], generator=gen)
        _close(model(x), theirs(x), torch.float32, "train output")
    torch_remove_legacy(theirs)
    torch_remove_legacy(ours)
    _assert_removed_as_torchs(ours, theirs)
    x = torch.randn(INPUTS[layer], generator=gen)
    _close(model(x), theirs(x), torch.float32, "output after removal")
    with pytest.raises(ValueError, match="spectral_norm of 'weight' not found in"):
        torch_remove_legacy(ours)  # a second removal, as torch's


def test_torch_functions_see_sn_ext_legacy_layers_as_torchs():
    """What else of torch finds spectral norms by type or attribute gives the same answers for sn_ext's legacy layers:
    parametrize's functions, registering a second hook, copy.deepcopy and pickling of the whole module."""
    torch.manual_seed(12)
    theirs = torch_legacy(nn.Linear(13, 7))
    torch.manual_seed(12)
    ours = sn_ext.legacy.spectral_norm(nn.Linear(13, 7))
    for module in (theirs, ours):
        assert not parametrize.is_parametrized(module) and not parametrize.is_parametrized(module, "weight")
        assert parametrize.type_before_parametrizations(module) is nn.Linear
    errors = []
    for module in (theirs, ours):
        with pytest.raises(ValueError) as info:
            parametrize.remove_parametrizations(module, "weight")
        errors.append(str(info.value))
        with pytest.raises(RuntimeError, match="Cannot register two spectral_norm hooks on the same parameter weight"):
            torch_legacy(module)  # torch's own check finds sn_ext's hook
    assert errors[0] == errors[1]
    x = torch.randn(3, 13)
    with torch.no_grad():  # a legacy layer's weight with autograd history cannot be deep-copied (torch's too)
        theirs(x), ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(ours), torch.load(buffer, weights_only=False)):
        hook = next(iter(twin._forward_pre_hooks.values()))
        assert type(hook) is LegacyHook and hook is not next(iter(ours._forward_pre_hooks.values()))
        twin.eval(), ours.eval()
        assert torch.equal(twin(x), ours(x))
        twin.train()
        twin(x)
        assert not torch.equal(twin.weight_u, ours.weight_u)  # its own buffers
        torch_remove_legacy(twin)
        assert not twin._forward_pre_hooks and not twin._state_dict_hooks and not twin._load_state_dict_pre_hooks
