"""sn_ext.convert_spectral_norm, restore_torch_spectral_norm and patch_torch, with torch itself as the oracle.

Models are built the way GAN code bases build theirs: PyTorch-StudioGAN's wrappers (snconv2d, snlinear,
sn_embedding: torch's legacy spectral_norm with eps=1e-6, a projection discriminator), torch-mimicry's SNConv2d
(torch's legacy spectral_norm, default eps), a ConvTranspose2d (dim 1) with n_power_iterations=2, and the same
layers with torch's parametrization version. Conversion must keep the Parameter objects, u, v and the state dict
bit for bit, give torch's eval outputs and torch's train steps (to rounding), and refuse, before changing anything,
what it cannot convert. Inputs are random, never zeros.
"""

import copy
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import CASES, LEGACY_CASES, TOL, assert_rel, make_input
from torch import nn
from torch.nn.utils import parametrize, spectral_norm  # spectral_norm as StudioGAN's ops.py imports it
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as TorchLegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook

import sn_ext
from sn_ext.nn.legacy_hook import SpectralNorm as SnExtLegacyHook

# torch's functions, in a container: patch_torch rebinds module-level names, so these would be patched too.
TORCH = {
    "param": torch.nn.utils.parametrizations.spectral_norm,
    "legacy": torch.nn.utils.spectral_norm,
    "remove": torch.nn.utils.remove_spectral_norm,
}
STEP_TOL = 10 * TOL[torch.float32]  # float32 sums (torch) against float64 ones (sn_ext), carried over steps


# ---------------------------------------------------------------------------------------------------------------
# Models as StudioGAN and mimicry build them


def snconv2d(in_channels, out_channels, kernel_size, stride=1, padding=0):
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding), eps=1e-6)


def snlinear(in_features, out_features, bias=True):
    return spectral_norm(nn.Linear(in_features, out_features, bias=bias), eps=1e-6)


def sn_embedding(num_embeddings, embedding_dim):
    return spectral_norm(nn.Embedding(num_embeddings, embedding_dim), eps=1e-6)


def SNConv2d(*args, **kwargs):  # torch-mimicry's default
    return nn.utils.spectral_norm(nn.Conv2d(*args, **kwargs))


class ProjectionD(nn.Module):
    """A StudioGAN-style class-conditional discriminator: legacy spectral norm (eps 1e-6) everywhere, a mimicry
    SNConv2d, a ConvTranspose2d with n_power_iterations=2 (dim 1) and a projection embedding."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = snconv2d(3, 8, 3, padding=1)
        self.up = spectral_norm(nn.ConvTranspose2d(8, 6, 2, stride=2), n_power_iterations=2)
        self.conv2 = SNConv2d(6, 8, 4, stride=2, padding=1)
        self.linear = snlinear(8, 1)
        self.embedding = sn_embedding(classes, 8)

    def forward(self, x, y):
        h = F.leaky_relu(self.conv1(x), 0.1)
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.up(h), 0.1)), 0.1)
        h = h.sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embedding(y) * h).sum(1)


class Kernel(nn.Module):
    """A parameter with another name than `weight`."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return x @ self.kernel.t()


class ParametrizedD(nn.Module):
    """The same layers with torch's parametrization version (any name, dim, eps, n_power_iterations)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        P = nn.utils.parametrizations
        self.conv1 = P.spectral_norm(nn.Conv2d(3, 8, 3, padding=1), eps=1e-6)
        self.up = P.spectral_norm(nn.ConvTranspose2d(8, 6, 2, stride=2), n_power_iterations=2)
        self.conv2 = P.spectral_norm(nn.Conv2d(6, 8, 4, stride=2, padding=1), dim=1)
        self.kernel = P.spectral_norm(Kernel(), name="kernel")
        self.linear = P.spectral_norm(nn.Linear(8, 1))
        self.embedding = P.spectral_norm(nn.Embedding(classes, 8), eps=1e-6)

    def forward(self, x, y):
        h = F.leaky_relu(self.conv1(x), 0.1)
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.up(h), 0.1)), 0.1)
        h = self.kernel(h.sum(dim=(2, 3))[:, :6])
        return self.linear(h).squeeze(1) + (self.embedding(y) * h).sum(1)


MODELS = {"studiogan_legacy": ProjectionD, "parametrization": ParametrizedD}


def _build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]()


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)


@torch.no_grad()  # a legacy layer's `weight` then has no autograd history: copy.deepcopy works
def _warm(model: nn.Module, steps: int = 2) -> None:
    """A few train-mode forwards, so that u and v are no longer the registration's."""
    model.train()
    for i in range(steps):
        model(*_batch(50 + i))


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_identical(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


def _norm_types(model: nn.Module) -> list[type]:
    found = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            found += [type(p) for plist in module.parametrizations.values() for p in plist]
        found += [type(h) for h in module._forward_pre_hooks.values()]
    return found


def _d_step(model, opt, seed):
    x, y = _batch(seed)
    fake = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 1000))
    loss = F.relu(1 - model(x, y)).mean() + F.relu(1 + model(fake, y)).mean()  # two calls, one backward
    opt.zero_grad()
    loss.backward()
    opt.step()


def _sn_ext_objects(model: nn.Module) -> list:
    """Everything of sn_ext's that a model holds: parametrizations, hooks of every kind, the group."""
    found = []
    for module in model.modules():
        tables = (
            module._forward_pre_hooks,
            module._forward_hooks,
            module._state_dict_hooks,
            module._load_state_dict_pre_hooks,
        )
        hooks = [getattr(hook, "hook", hook) for table in tables for hook in table.values()]  # unwrap _WrappedHook
        for obj in [module, getattr(module, "_sn_ext_group", None), *hooks]:
            obj = getattr(obj, "func", obj)  # functools.partial
            if (getattr(obj, "__module__", None) or "").startswith("sn_ext"):  # a class's, function's or instance's
                found.append(obj)
    return found


# ---------------------------------------------------------------------------------------------------------------
# convert_spectral_norm


@pytest.mark.parametrize("kind", MODELS)
def test_convert_keeps_parameters_buffers_state_dict_and_eval_outputs(kind):
    model = _build(kind)
    _warm(model)
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    before = _snapshot(model)
    metadata = copy.deepcopy(model.state_dict()._metadata)
    model.eval()
    x, y = _batch(1)
    with torch.no_grad():
        expected = model(x, y)
    rng = torch.get_rng_state()
    assert sn_ext.convert_spectral_norm(model) is model
    assert torch.equal(torch.get_rng_state(), rng)  # no random draw
    types = _norm_types(model)
    assert TorchSpectralNorm not in types and TorchLegacySpectralNorm not in types
    assert types.count(sn_ext.SpectralNorm if kind == "parametrization" else SnExtLegacyHook) == len(types) >= 5
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    _assert_state_identical(_snapshot(model), before)
    assert model.state_dict()._metadata == metadata
    with torch.no_grad():
        ours = model(x, y)
    assert_rel(ours, expected, TOL[torch.float32], "eval output")
    _assert_state_identical(_snapshot(model), before)  # eval: no power iteration


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_steps_after_conversion_match_torch_with_an_optimizer_made_before(kind, optimizer):
    torch_model = _build(kind)
    _warm(torch_model)
    model = copy.deepcopy(torch_model)
    make_opt = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.9)),
    }[optimizer]
    torch_opt, opt = make_opt(torch_model), make_opt(model)
    _d_step(torch_model, torch_opt, 0)  # the optimizers hold state before the conversion
    _d_step(model, opt, 0)
    sn_ext.convert_spectral_norm(model)
    assert TorchSpectralNorm not in _norm_types(model) and TorchLegacySpectralNorm not in _norm_types(model)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    for step in range(1, 5):
        _d_step(torch_model, torch_opt, step)
        _d_step(model, opt, step)
        ours, ref = model.state_dict(), torch_model.state_dict()
        assert list(ours) == list(ref)
        for key in ref:
            assert_rel(ours[key], ref[key], STEP_TOL, f"step {step}: {key}")
    model.eval(), torch_model.eval()
    x, y = _batch(9)
    assert_rel(model(x, y), torch_model(x, y), STEP_TOL, "eval output after training")


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_every_layer_case_converts(case, legacy):
    """helpers.CASES: every layer type, name, dim and n_power_iterations of the parity tests."""
    if legacy and case not in LEGACY_CASES:
        pytest.skip("torch's legacy spectral_norm does not take this case")
    apply = TORCH["legacy"] if legacy else TORCH["param"]
    torch.manual_seed(0)
    ref = apply(case.make(), name=case.name, **case.kwargs)
    ours = copy.deepcopy(ref)
    sn_ext.convert_spectral_norm(ours)
    assert (SnExtLegacyHook if legacy else sn_ext.SpectralNorm) in _norm_types(ours)
    _assert_state_identical(_snapshot(ours), _snapshot(ref))
    x = make_input(case, torch.float32)
    for mode in ("train", "train", "eval"):
        getattr(ours, mode)(), getattr(ref, mode)()
        assert_rel(ours(x), ref(x), STEP_TOL, mode)
        for key, value in ref.state_dict().items():
            assert_rel(ours.state_dict()[key], value, STEP_TOL, f"{mode}: {key}")


def test_grouped_conversion_matches_torch():
    torch_model = _build("parametrization")
    model = copy.deepcopy(torch_model)
    before = _snapshot(model)
    sn_ext.convert_spectral_norm(model, grouped=True)
    group = model._sn_ext_group
    assert len(group.layers) == 6 and ("kernel", "kernel") in [(n, n) for _, n in group.layers]
    _assert_state_identical(_snapshot(model), before)
    torch_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (torch_model, model))
    calls = []
    group_compute = group.compute
    group.compute = lambda: (calls.append(1), group_compute())[1]
    for step in range(3):
        _d_step(torch_model, torch_opt, step)
        _d_step(model, opt, step)
        for key, value in torch_model.state_dict().items():
            assert_rel(model.state_dict()[key], value, STEP_TOL, f"step {step}: {key}")
    assert len(calls) == 6  # the grouped op ran on every forward of the model


class MixedD(ProjectionD):
    """ProjectionD with torch's parametrization version on conv2 and linear: both power-iteration orders in one
    model."""

    def __init__(self, classes: int = 5):
        super().__init__(classes)
        self.conv2 = TORCH["param"](nn.Conv2d(6, 8, 4, stride=2, padding=1))
        self.linear = TORCH["param"](nn.Linear(8, 1))


GROUPED_MODELS = {"studiogan_legacy": ProjectionD, "mixed": MixedD}


@pytest.mark.parametrize("kind", GROUPED_MODELS)
def test_grouped_conversion_of_legacy_layers_matches_per_layer_and_torch(kind):
    """A StudioGAN / mimicry-style discriminator (torch's legacy spectral_norm on Conv2d, ConvTranspose2d, Embedding
    and Linear; "mixed": two of them with the parametrization version), grouped: bit for bit sn_ext's per-layer
    conversion and, to rounding, torch, over Adam steps (two calls of D before each backward) and in eval."""
    torch.manual_seed(0)
    torch_model = GROUPED_MODELS[kind]()
    _warm(torch_model)
    per_layer = sn_ext.convert_spectral_norm(copy.deepcopy(torch_model))
    grouped = copy.deepcopy(torch_model)
    params, before = [id(p) for p in grouped.parameters()], _snapshot(grouped)
    metadata = copy.deepcopy(grouped.state_dict()._metadata)
    sn_ext.convert_spectral_norm(grouped, grouped=True)
    assert [id(p) for p in grouped.parameters()] == params
    _assert_state_identical(_snapshot(grouped), before)
    assert grouped.state_dict()._metadata == metadata
    members = grouped._sn_ext_group.members
    assert [member.layer for member in members] == [
        grouped.conv1,
        grouped.up,
        grouped.conv2,
        grouped.linear,
        grouped.embedding,
    ]
    legacy = {"conv1", "up", "embedding"} | ({"conv2", "linear"} if kind == "studiogan_legacy" else set())
    assert [member.v_first for member in members] == [
        name in legacy for name in ("conv1", "up", "conv2", "linear", "embedding")
    ]
    models = (torch_model, per_layer, grouped)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.9)) for m in models]
    for step in range(4):
        for model, opt in zip(models, opts):
            _d_step(model, opt, step)
        _assert_state_identical(_snapshot(grouped), _snapshot(per_layer))
        for key, value in torch_model.state_dict().items():
            assert_rel(grouped.state_dict()[key], value, STEP_TOL, f"step {step}: {key}")
    for model in models:
        model.eval()
    x, y = _batch(9)
    assert torch.equal(grouped(x, y), per_layer(x, y))
    assert_rel(grouped(x, y), torch_model(x, y), STEP_TOL, "eval output")
    _assert_state_identical(_snapshot(grouped), _snapshot(per_layer))  # eval: no power iteration


def _parametrization_twin(model: nn.Module) -> nn.Module:
    """`model` with torch's parametrization version in place of each legacy spectral norm: the same weights, u, v,
    dim and eps (a checkpoint of the other layout)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, TorchLegacySpectralNorm)]
        for hook in hooks:
            weight, u, v = (getattr(module, "weight" + s).detach().clone() for s in ("_orig", "_u", "_v"))
            TORCH["remove"](module)
            with torch.no_grad():
                module.weight.copy_(weight)
            TORCH["param"](module, n_power_iterations=hook.n_power_iterations, eps=hook.eps, dim=hook.dim)
            with torch.no_grad():
                module.parametrizations.weight[0]._u.copy_(u)
                module.parametrizations.weight[0]._v.copy_(v)
    return twin


def test_a_grouped_legacy_model_loads_checkpoints_of_both_layouts():
    grouped = sn_ext.convert_spectral_norm(_build("studiogan_legacy"), grouped=True)
    source = _build("studiogan_legacy", seed=3)
    _warm(source)
    source.eval()
    x, y = _batch(7)
    for checkpoint in (source, _parametrization_twin(source)):
        other = _build("studiogan_legacy", seed=4)  # other weights and vectors in between
        grouped.load_state_dict(other.state_dict())
        grouped.load_state_dict(checkpoint.state_dict())  # strict
        _assert_state_identical(_snapshot(grouped), _snapshot(source))
        grouped.eval()
        assert_rel(grouped(x, y), source(x, y), STEP_TOL, "eval output after loading")


def test_grouped_conversion_names_what_cannot_be_grouped_and_changes_nothing():
    """Spectral norms that convert but cannot be grouped: the error says so (not "cannot be converted"), names each
    with its qualified name and says what to do instead."""
    torch.manual_seed(0)
    model = nn.Sequential(
        TORCH["legacy"](nn.Linear(4, 4)),
        nn.Sequential(TORCH["param"](nn.Linear(4, 3))),
        TORCH["param"](nn.Linear(3, 2, dtype=torch.complex64)),
    )
    parametrize.register_parametrization(model[1][0], "weight", _Identity())  # after the spectral norm
    before, types = _snapshot(model), _norm_types(model)
    with pytest.raises(ValueError) as info:
        sn_ext.convert_spectral_norm(model, grouped=True)
    message = str(info.value)
    assert message.startswith(
        "convert_spectral_norm(grouped=True): 2 spectral norm(s) can be converted but not grouped, so nothing was "
        "changed (grouped=False converts every one, per layer):"
    )
    assert "'1.0' (Linear), tensor 'weight': 2 stacked parametrizations" in message
    assert "'2' (Linear), tensor 'weight': torch.complex64 (complex weights run on the reference backend" in message
    assert "'0'" not in message and "cannot" not in message
    assert _norm_types(model) == types and not hasattr(model, "_sn_ext_group")
    _assert_state_identical(_snapshot(model), before)
    with pytest.raises(ValueError, match=r"already grouped, nothing was changed \(sn_ext.ungroup_spectral_norm"):
        sn_ext.convert_spectral_norm(sn_ext.convert_spectral_norm(_build("studiogan_legacy"), grouped=True), True)


# ---------------------------------------------------------------------------------------------------------------
# Failure cases: the error names the layer; nothing changes


class _MySpectralNorm(TorchSpectralNorm):
    pass


class _Identity(nn.Module):
    def forward(self, x):
        return x


class CoefficientSpectralNorm(TorchLegacySpectralNorm):
    """As DUE's SpectralNorm: a subclass of torch's legacy hook that normalizes to a coefficient instead of 1."""

    coeff: float


def _bad_models():
    torch.manual_seed(0)
    subclass = nn.Sequential(TORCH["param"](nn.Linear(4, 4)), nn.Linear(4, 3))
    parametrize.register_parametrization(subclass[1], "weight", _MySpectralNorm(subclass[1].weight))
    legacy_subclass = nn.Sequential(TORCH["param"](nn.Linear(4, 4)), nn.Linear(4, 3))
    hook = TorchLegacySpectralNorm.apply(legacy_subclass[1], "weight", 1, 0, 1e-12)
    hook.__class__, hook.coeff = CoefficientSpectralNorm, 0.95
    stacked = nn.Sequential(TORCH["legacy"](nn.Linear(4, 4)), nn.Linear(4, 3))
    parametrize.register_parametrization(stacked[1], "weight", _Identity())
    TORCH["param"](stacked[1])
    complex_legacy = nn.Sequential(TORCH["param"](nn.Linear(4, 4)), nn.Linear(4, 3, dtype=torch.complex64))
    TORCH["legacy"](complex_legacy[1])
    return {
        "subclass": (subclass, "test_convert._MySpectralNorm, a subclass of torch's _SpectralNorm"),
        "legacy_subclass": (
            legacy_subclass,
            "test_convert.CoefficientSpectralNorm, a subclass of torch's SpectralNorm",
        ),
        "stacked": (stacked, "comes after 1 other parametrization"),
        "complex_legacy": (complex_legacy, "complex64"),
    }


@pytest.mark.parametrize("case", ["subclass", "legacy_subclass", "stacked", "complex_legacy"])
def test_a_layer_that_cannot_be_converted_raises_naming_it_and_nothing_changes(case):
    model, reason = _bad_models()[case]
    before, types = _snapshot(model), _norm_types(model)
    hooks = [(dict(m._forward_pre_hooks), dict(m._state_dict_hooks), dict(m._load_state_dict_pre_hooks)) for m in model]
    with pytest.raises(ValueError, match=r"'1' \(Linear\), tensor 'weight': .*" + reason) as info:
        sn_ext.convert_spectral_norm(model)
    assert "1 spectral norm(s) cannot be converted, so nothing was changed (remove them first" in str(info.value)
    assert _norm_types(model) == types
    assert TorchSpectralNorm in types or TorchLegacySpectralNorm in types  # layer 0 was convertible, still torch's
    now = [(dict(m._forward_pre_hooks), dict(m._state_dict_hooks), dict(m._load_state_dict_pre_hooks)) for m in model]
    assert now == hooks
    _assert_state_identical(_snapshot(model), before)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_model_without_torch_spectral_norm_warns(grouped):
    """sn_ext's own spectral norms (its legacy hook is an instance of torch's class too) are left as they are."""
    model = nn.Sequential(sn_ext.spectral_norm(nn.Linear(3, 4)), sn_ext.legacy.spectral_norm(nn.Linear(4, 2)))
    hooks = dict(model[1]._forward_pre_hooks)
    hint = r", nor grouped \(sn_ext.grouped_spectral_norm\(model\) groups sn_ext's own\)" if grouped else "$"
    with pytest.warns(UserWarning, match="no spectral norm of torch's: nothing was converted" + hint):
        sn_ext.convert_spectral_norm(model, grouped)
    assert type(model[0].parametrizations.weight[0]) is sn_ext.SpectralNorm
    assert dict(model[1]._forward_pre_hooks) == hooks and not hasattr(model, "_sn_ext_group")


# ---------------------------------------------------------------------------------------------------------------
# restore_torch_spectral_norm and state_dict round trips


@pytest.mark.parametrize("kind", MODELS)
def test_round_trip_torch_sn_ext_torch_is_bit_identical(kind):
    original = _build(kind)
    _warm(original)
    model = copy.deepcopy(original)
    before, metadata = _snapshot(model), copy.deepcopy(model.state_dict()._metadata)
    assert not _sn_ext_objects(model)
    sn_ext.convert_spectral_norm(model)
    assert len(_sn_ext_objects(model)) >= 10  # the check below sees sn_ext's objects
    sn_ext.restore_torch_spectral_norm(model)
    assert _norm_types(model) == _norm_types(original)  # torch's classes, in torch's order
    _assert_state_identical(_snapshot(model), before)
    assert model.state_dict()._metadata == metadata
    if kind == "studiogan_legacy":  # torch's state-dict hooks are back (and sn_ext's gone)
        for name in ("conv1", "up", "conv2", "linear", "embedding"):
            layer = getattr(model, name)
            assert [type(h) for h in layer._state_dict_hooks.values()] == [SpectralNormStateDictHook]
            loads = [type(getattr(h, "hook", h)) for h in layer._load_state_dict_pre_hooks.values()]
            assert loads == [SpectralNormLoadStateDictPreHook]
    assert not _sn_ext_objects(model)  # exportable to people without sn_ext
    # torch's own code again: bit for bit the model never converted, step for step
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (original, model)]
    for step in range(3):
        _d_step(original, opts[0], step)
        _d_step(model, opts[1], step)
        _assert_state_identical(_snapshot(model), _snapshot(original))


@pytest.mark.parametrize("kind", MODELS)
def test_round_trip_sn_ext_torch_sn_ext_and_checkpoints_load_across(kind):
    with sn_ext.patch_torch():
        model = _build(kind)  # built with sn_ext's spectral norms
    assert TorchSpectralNorm not in _norm_types(model) and TorchLegacySpectralNorm not in _norm_types(model)
    _warm(model)
    before = _snapshot(model)
    exported = sn_ext.restore_torch_spectral_norm(copy.deepcopy(model))
    assert sn_ext.SpectralNorm not in _norm_types(exported) and SnExtLegacyHook not in _norm_types(exported)
    _assert_state_identical(_snapshot(exported), before)
    back = sn_ext.convert_spectral_norm(copy.deepcopy(exported))
    _assert_state_identical(_snapshot(back), before)
    assert _norm_types(back) == _norm_types(model)
    # a torch checkpoint loads into the converted model and the other way round (strict)
    other = _build(kind, seed=3)
    _warm(other)
    back.load_state_dict(other.state_dict())
    _assert_state_identical(_snapshot(back), _snapshot(other))
    exported.load_state_dict(model.state_dict())
    _assert_state_identical(_snapshot(exported), before)


def test_restore_ungroups_a_grouped_model():
    model = sn_ext.convert_spectral_norm(_build("parametrization"), grouped=True)
    sn_ext.restore_torch_spectral_norm(model)
    assert not hasattr(model, "_sn_ext_group") and not model._forward_pre_hooks
    assert sn_ext.SpectralNorm not in _norm_types(model)
    model(*_batch(0))


# ---------------------------------------------------------------------------------------------------------------
# patch_torch


def _names_are_torch() -> bool:
    this = sys.modules[__name__]
    return (
        this.spectral_norm is TORCH["legacy"]
        and torch.nn.utils.spectral_norm is TORCH["legacy"]
        and sys.modules["torch.nn.utils.spectral_norm"].spectral_norm is TORCH["legacy"]
        and torch.nn.utils.parametrizations.spectral_norm is TORCH["param"]
        and torch.nn.utils.remove_spectral_norm is TORCH["remove"]
    )


@pytest.mark.parametrize("kind", MODELS)
def test_patch_torch_builds_sn_ext_same_numbers_as_sn_ext_itself(kind):
    assert _names_are_torch()
    with sn_ext.patch_torch() as patch:
        assert patch.active and not _names_are_torch()
        model = _build(kind)  # StudioGAN's wrappers call this module's `spectral_norm`, bound before the patch
    assert not patch.active and _names_are_torch()
    types = _norm_types(model)
    assert TorchSpectralNorm not in types and TorchLegacySpectralNorm not in types
    # the same model as converting torch's (same draws), and as sn_ext's own functions build it
    converted = sn_ext.convert_spectral_norm(_build(kind))
    if kind == "studiogan_legacy":  # no warm-up in the legacy version: the same draws, bit for bit
        _assert_state_identical(_snapshot(model), _snapshot(converted))
    for key, value in _snapshot(converted).items():  # the warm-up's sums: float32 (torch), float64 (sn_ext)
        assert_rel(model.state_dict()[key], value, STEP_TOL, key)


def test_patch_torch_plain_call_undo_nesting_and_remove():
    patch = sn_ext.patch_torch()
    try:
        with pytest.raises(RuntimeError, match="already active"):
            sn_ext.patch_torch()
        layer = torch.nn.utils.spectral_norm(nn.Linear(4, 3))
        assert any(isinstance(h, SnExtLegacyHook) for h in layer._forward_pre_hooks.values())
        torch.nn.utils.remove_spectral_norm(layer)  # sn_ext's hook, removed by the patched function
        assert not layer._forward_pre_hooks and isinstance(layer.weight, nn.Parameter)
    finally:
        patch.undo()
    patch.undo()  # a second undo does nothing
    assert _names_are_torch()
    torch_layer = TORCH["legacy"](nn.Linear(4, 3))
    with sn_ext.patch_torch():
        torch.nn.utils.remove_spectral_norm(torch_layer)  # torch's hook, made before the patch
    assert not torch_layer._forward_pre_hooks


def test_patch_torch_reaches_modules_imported_while_active_and_not_captured_references(tmp_path, monkeypatch):
    (tmp_path / "convert_patch_probe.py").write_text(
        "import torch\n"
        "from torch.nn.utils import spectral_norm\n"
        "from torch.nn.utils.parametrizations import spectral_norm as param_sn\n"
        "def build():\n"
        "    return spectral_norm(torch.nn.Linear(4, 3)), param_sn(torch.nn.Linear(4, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def captured(module, sn=TORCH["legacy"]):  # a default argument: documented as not patched
        return sn(module)

    try:
        with sn_ext.patch_torch():
            probe = importlib.import_module("convert_patch_probe")
            legacy_layer, param_layer = probe.build()
            assert isinstance(param_layer.parametrizations.weight[0], sn_ext.SpectralNorm)
            assert any(isinstance(h, SnExtLegacyHook) for h in legacy_layer._forward_pre_hooks.values())
            kept = captured(nn.Linear(4, 3))
            assert any(isinstance(h, TorchLegacySpectralNorm) for h in kept._forward_pre_hooks.values())
        assert probe.spectral_norm is TORCH["legacy"] and probe.param_sn is TORCH["param"]  # undone there too
    finally:
        sys.modules.pop("convert_patch_probe", None)


# ---------------------------------------------------------------------------------------------------------------
# DDP after conversion (gloo on the CPU, as tests/test_reliability_ddp.py)


def _ddp_discriminator(kind: str) -> nn.Module:
    """test_reliability_ddp's input shape (N, 3, 6, 6); StudioGAN-style legacy layers and a parametrization."""
    torch.manual_seed(0)
    D = nn.Sequential(
        snconv2d(3, 6, 3),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.ConvTranspose2d(6, 4, 2, stride=2), n_power_iterations=2),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        TORCH["param"](nn.Linear(4 * 8 * 8, 1)),
    )
    return sn_ext.convert_spectral_norm(D) if kind == "converted" else D


def test_ddp_after_conversion_matches_torch(tmp_path):
    from test_reliability_ddp import WORLD, run_ddp

    states = run_ddp(str(tmp_path), _ddp_discriminator, ("converted", "torch"))
    initial = _ddp_discriminator("torch").state_dict()
    for rank in range(1, WORLD):
        _assert_state_identical(states["converted", rank], states["converted", 0])
    ours, ref = states["converted", 0], states["torch", 0]
    assert list(ours) == list(ref) == list(initial)
    for key in ref:
        if ref[key].numel() > 1:
            assert not torch.equal(ref[key], initial[key]), f"{key} did not train"
        assert_rel(ours[key], ref[key], STEP_TOL, key)
