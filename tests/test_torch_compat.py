"""What torch's own spectral-norm tests exercise, written from torch's documented behaviour: a second spectral norm
stacked on a tensor, complex weights, and removal of the legacy version leaving nothing behind. Each is compared
with the installed torch (the oracle) on every backend that runs here, on fresh random inputs and odd sizes."""

import copy
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

import sn_ext
from sn_ext import backends

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
    with pytest.raises(RuntimeError, match=r"'weight' of .*Linear has 2 stacked parametrizations"):
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


def test_legacy_removal_leaves_what_torchs_leaves():
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
        sn_ext.legacy.remove_spectral_norm(ours)
        # torch leaves its load_state_dict pre-hook behind (its isinstance check misses the _WrappedHook that
        # torch wraps it in), one more per cycle; sn_ext leaves nothing, and every other kind of hook as torch.
        assert _hook_kinds(ours) == {k: 0 for k in _hook_kinds(ours)}
        assert {k: n for k, n in _hook_kinds(theirs).items() if k != "_load_state_dict_pre_hooks"} == {
            k: 0 for k in _hook_kinds(theirs) if k != "_load_state_dict_pre_hooks"
        }
        state_t, state_o = theirs.state_dict(), ours.state_dict()
        assert list(state_o) == list(state_t) and state_o._metadata == state_t._metadata
        _close(state_o["weight"], state_t["weight"], torch.float32, "baked weight")
