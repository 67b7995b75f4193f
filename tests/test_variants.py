"""The spectral-norm variants as modules (docs/variants.md): bounded spectral norm (sn_ext.spectral_norm and
sn_ext.legacy.spectral_norm with coeff, sigma_grad; sn_ext.compat's spectral_norm_fc) and sigma-reparam
(sn_ext.sigma_reparam, sigma_reparam_model), against the published implementations written from their definitions
(tests/published_variants.py: DUE / i-ResNet, edward2's SNGP, Apple's and AMAGO's sigma-reparam) over several
optimizer steps (outputs, gradients, buffers, then eval), and against float64 references of their formulas; their
state dicts and checkpoints, gamma's start, grouped mode, convert / restore, torch.compile, sigmas and
spectral_report, and their errors."""

import copy
import warnings

import published_variants as published
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel, randn
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as TorchLegacySpectralNorm

import sn_ext
from sn_ext import backends

BACKENDS = [b for b in ("cpu", "reference") if not backends.get(b).unavailable_reasons()]


def _inputs(shape, seed, dtype=torch.float64):
    return randn(*shape, dtype=dtype, seed=seed)


def _train_and_compare(ours, theirs, x_shape, steps, tol, buffers, params=None, optimizer=torch.optim.SGD):
    """`steps` training steps of both (the same loss and optimizer), comparing outputs, gradients and buffers after
    each, then an eval forward. `buffers`: (ours' name, theirs' name) pairs; `params` likewise (default: same names)."""
    params = params or [(name, name) for name, _ in ours.named_parameters()]
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    opt_ours = optimizer([ours_params[a] for a, _ in params], lr=0.05)
    opt_theirs = optimizer([theirs_params[b] for _, b in params], lr=0.05)
    for step in range(steps):
        x = _inputs(x_shape, seed=100 + step, dtype=next(ours.parameters()).dtype)
        out_ours, out_theirs = ours(x), theirs(x)
        assert_rel(out_ours, out_theirs, tol, f"output, step {step}")
        for out, opt in ((out_ours, opt_ours), (out_theirs, opt_theirs)):
            opt.zero_grad()
            (out.tanh().sum() + out.square().mean()).backward()
        for a, b in params:
            assert_rel(ours_params[a].grad.reshape(-1), theirs_params[b].grad.reshape(-1), tol, f"grad {a}, {step}")
        opt_ours.step()
        opt_theirs.step()
        ours_buffers, theirs_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
        for a, b in buffers:
            assert_rel(ours_buffers[a].reshape(-1), theirs_buffers[b].reshape(-1), tol, f"buffer {a}, step {step}")
    ours.eval(), theirs.eval()
    x = _inputs(x_shape, seed=99, dtype=next(ours.parameters()).dtype)
    assert_rel(ours(x), theirs(x), tol, "eval output")


# ---------------------------------------------------------------------------------------------------------------
# Bounded spectral norm: DUE / i-ResNet / DDU (legacy layout), SNGP, and the parametrization's formula

# DUE computes max(1, sigma / coeff) in float32 whatever the weight's dtype (torch.ones(1), a float32 vector, wins the
# type promotion against the float64 0-d sigma / coeff), sn_ext in the accumulation dtype: float64 runs differ there
# at float32's rounding (docs/variants.md).
DUE_TOL = 2e-7

LAYERS = {  # factory, input shape; default init: sigma between 0.5 and 1.5
    "linear": (lambda: nn.Linear(9, 6), (4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 6, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 3, 2, stride=2), (2, 4, 3, 3)),  # dim 1
}


@pytest.mark.parametrize("coeff", [0.4, 5.0], ids=["bounded", "not_reached"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_due_spectral_norm_fc(backend, layer, coeff):
    """sn_ext.compat.due.spectral_norm_fc = DUE's: the same random u, v, state dict keys, outputs, gradients and
    buffers (weight_u, weight_v, weight_sigma) over several steps with 2 rounds each, and in eval."""
    make, x_shape = LAYERS[layer]
    torch.manual_seed(0)
    base = make().double()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    published.spectral_norm_fc(theirs, coeff, 2)
    torch.manual_seed(1)
    sn_ext.compat.due.spectral_norm_fc(ours, coeff, 2)
    ours._forward_pre_hooks[next(iter(ours._forward_pre_hooks))]._kernels = backends.select(
        backend, "cpu", torch.float64
    )
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    buffers = [(f"weight_{b}", f"weight_{b}") for b in ("u", "v", "sigma")]
    _train_and_compare(ours, theirs, x_shape, steps=4, tol=DUE_TOL if coeff < 1 else 1e-12, buffers=buffers)


def test_iresnet_argument_order():
    """i-ResNet's spectral_norm_fc takes `name` third, DUE's n_power_iterations: each drop-in takes its own."""
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4), nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    sn_ext.compat.iresnet.spectral_norm_fc(a, 0.7, "weight", 3)
    sn_ext.compat.due.spectral_norm_fc(b, 0.7, 3, "weight")
    for m in (a, b):
        hook = next(iter(m._forward_pre_hooks.values()))
        assert (hook.name, hook.n_power_iterations, hook.coeff) == ("weight", 3, 0.7)


def test_due_checkpoint_loads_and_converts():
    """A DUE model's checkpoint loads into sn_ext's drop-in and gives its outputs; sn_ext.convert_spectral_norm turns
    DUE's hooks themselves into sn_ext's bounded ones, keeping Parameters, buffers and the numbers."""

    def model(spectral_norm_fc):
        net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        for layer in (net[0], net[2]):
            spectral_norm_fc(layer, 0.6)
        return net

    torch.manual_seed(2)
    trained = model(published.spectral_norm_fc)
    trained(_inputs((4, 5), seed=3))  # a step: u, v, sigma moved
    # Copies by checkpoint (a legacy hook's layer does not deep-copy after a forward, torch's neither).
    theirs, converted, ours = (
        model(published.spectral_norm_fc),
        model(published.spectral_norm_fc),
        model(sn_ext.compat.due.spectral_norm_fc),
    )
    for net in (theirs, converted, ours):
        net.load_state_dict(trained.state_dict())
    weight = converted[0].weight_orig
    sn_ext.convert_spectral_norm(converted)
    assert converted[0].weight_orig is weight
    hooks = [next(iter(layer._forward_pre_hooks.values())) for layer in (converted[0], converted[2])]
    assert all(type(h) is sn_ext.legacy.SpectralNorm and h.coeff == 0.6 for h in hooks)
    buffers = [(f"{i}.weight_{b}", f"{i}.weight_{b}") for i in (0, 2) for b in ("u", "v", "sigma")]
    _train_and_compare(ours, theirs, (4, 5), steps=3, tol=DUE_TOL, buffers=buffers)
    _train_and_compare(converted, trained, (4, 5), steps=3, tol=DUE_TOL, buffers=buffers)


def test_convert_names_subclasses_it_cannot_convert():
    class Custom(TorchLegacySpectralNorm):
        pass

    class SpectralNormConv(TorchLegacySpectralNorm):  # DUE's spectral_norm_conv
        pass

    for cls, pattern in ((Custom, r"Custom, a subclass"), (SpectralNormConv, r"sn_ext.conv_spectral_norm")):
        model = nn.Sequential(nn.Linear(4, 3))
        fn = torch.nn.utils.spectral_norm(model[0])._forward_pre_hooks
        key = next(iter(fn))
        fn[key].__class__ = cls
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=pattern):
            sn_ext.convert_spectral_norm(model)
        assert type(model[0]._forward_pre_hooks[key]) is cls
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sngp_stop_gradient(backend):
    """edward2's SNGP layer (v-first, W / stop_gradient(max(sigma / c, 1))) = sn_ext.legacy.spectral_norm with
    coeff and sigma_grad=False, from the same u, v: outputs, gradients and u, v over several steps, and eval."""
    torch.manual_seed(4)
    base = nn.Linear(7, 5).double()
    ours = sn_ext.legacy.spectral_norm(copy.deepcopy(base), coeff=0.3, sigma_grad=False, backend=backend)
    theirs = published.SNGPSpectralNorm(copy.deepcopy(base), 0.3, ours.weight_u, ours.weight_v)
    params = [("weight_orig", "layer.weight"), ("bias", "layer.bias")]
    buffers = [("weight_u", "u"), ("weight_v", "v")]
    _train_and_compare(ours, theirs, (3, 7), steps=4, tol=1e-12, buffers=buffers, params=params)


class _BoundedReference(nn.Module):
    """torch's parametrization (u-first, 15 rounds at registration, n per read in train mode) with the bounded
    formula W / max(1, sigma / c) and sigma = u^T W v from the vectors used, written with torch ops in float64."""

    def __init__(self, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, coeff: float, sigma_grad: bool, dim):
        super().__init__()
        self.coeff, self.sigma_grad, self.dim = coeff, sigma_grad, dim
        self.register_buffer("_u", u.clone())
        self.register_buffer("_v", v.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = sn_ext._matrix.to_matrix(weight, self.dim)
        if self.training:
            with torch.no_grad():
                self._u.copy_(F.normalize(matrix @ self._v, dim=0, eps=1e-12))
                self._v.copy_(F.normalize(matrix.T @ self._u, dim=0, eps=1e-12))
        sigma = torch.dot(self._u.clone(), matrix @ self._v.clone())
        if not self.sigma_grad:
            sigma = sigma.detach()
        return weight / torch.clamp_min(sigma / self.coeff, 1.0)


@pytest.mark.parametrize("sigma_grad", [True, False])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bounded_parametrization_matches_its_formula(backend, layer, sigma_grad):
    make, x_shape = LAYERS[layer]
    torch.manual_seed(5)
    base = make().double()
    ours = sn_ext.spectral_norm(copy.deepcopy(base), coeff=0.4, sigma_grad=sigma_grad, backend=backend)
    norm = ours.parametrizations.weight[0]
    theirs = copy.deepcopy(base)
    parametrize.register_parametrization(
        theirs, "weight", _BoundedReference(theirs.weight, norm._u, norm._v, 0.4, sigma_grad, norm.dim), unsafe=True
    )
    params = [("parametrizations.weight.original", "parametrizations.weight.original"), ("bias", "bias")]
    buffers = [(f"parametrizations.weight.0.{b}", f"parametrizations.weight.0.{b}") for b in ("_u", "_v")]
    _train_and_compare(ours, theirs, x_shape, steps=4, tol=1e-12, buffers=buffers, params=params)


# ---------------------------------------------------------------------------------------------------------------
# sigma-reparam: Apple's and AMAGO's


@pytest.mark.parametrize("backend", BACKENDS)
def test_apple_sigma_reparam(backend):
    """Apple's SNLinear = sn_ext.sigma_reparam(eval_iteration=True) from the same start (its u is sn_ext's v, its
    sigma Parameter gamma): outputs, gradients (gamma's too), u and sigma over several Adam steps, and eval, whose
    round runs without writing the buffers in both."""
    torch.manual_seed(6)
    theirs = published.AppleSNLinear(12, 7).double()
    ours = nn.Linear(12, 7).double()
    ours.load_state_dict({"weight": theirs.weight, "bias": theirs.bias})
    sn_ext.sigma_reparam(ours, eval_iteration=True, backend=backend)
    norm = ours.parametrizations.weight[0]
    # Apple's SVD ran in float32 (the layer was built so), sn_ext's Lanczos in float64 on the same weight.
    assert_rel(norm.gain.reshape(1), theirs.sigma, 1e-6, "gamma starts at sigma (Apple: an SVD; sn_ext: Lanczos)")
    with torch.no_grad():
        norm._v.copy_(theirs.spectral_normed_weight.u)
        norm.gain.copy_(theirs.sigma[0])
    params = [
        ("parametrizations.weight.original", "weight"),
        ("bias", "bias"),
        ("parametrizations.weight.0.gain", "sigma"),
    ]
    buffers = [("parametrizations.weight.0._v", "spectral_normed_weight.u")]
    _train_and_compare(
        ours, theirs, (5, 12), steps=4, tol=1e-12, buffers=buffers, params=params, optimizer=torch.optim.Adam
    )
    frozen = [b.clone() for b in ours.buffers()]
    ours(_inputs((2, 12), seed=7))
    assert all(torch.equal(a, b) for a, b in zip(frozen, ours.buffers())), "eval_iteration writes no buffer"


@pytest.mark.parametrize("backend", BACKENDS)
def test_amago_sigma_reparam(backend):
    """AMAGO's SigmaReparam = sn_ext.sigma_reparam(gamma_init=1.0) from the same u, v."""
    torch.manual_seed(8)
    base = nn.Linear(10, 6).double()
    ours = sn_ext.sigma_reparam(copy.deepcopy(base), gamma_init=1.0, backend=backend)
    norm = ours.parametrizations.weight[0]
    theirs = published.AmagoSigmaReparam(copy.deepcopy(base), norm._u, norm._v)
    params = [("parametrizations.weight.original", "W"), ("bias", "b"), ("parametrizations.weight.0.gain", "gamma")]
    buffers = [("parametrizations.weight.0._u", "u"), ("parametrizations.weight.0._v", "v")]
    _train_and_compare(ours, theirs, (4, 10), steps=4, tol=1e-12, buffers=buffers, params=params)


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(300, 200), lambda: nn.Conv2d(16, 32, 3), lambda: nn.ConvTranspose2d(8, 4, 3)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma_starts_at_the_top_singular_value(make, dtype):
    """gamma_init="sigma": gamma = W's exact largest singular value (the SVD's, to 1e-6 in float32) and the first
    forward gives W_hat = W, with no SVD at registration."""
    torch.manual_seed(9)
    layer = make().to(dtype)
    weight = layer.weight.detach().clone()
    dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    exact = torch.linalg.matrix_norm(sn_ext._matrix.to_matrix(weight, dim).double(), ord=2)
    sn_ext.sigma_reparam(layer)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_rel(layer.parametrizations.weight[0].gain, exact, tol, "gamma")
    assert_rel(layer.weight, weight, tol, "W_hat = W at the start")


def test_gamma_float_start_and_zero():
    layer = sn_ext.sigma_reparam(nn.Linear(5, 4), gamma_init=0.0)
    assert layer.parametrizations.weight[0].gain.item() == 0.0
    layer(randn(3, 5)).sum().backward()
    gain = layer.parametrizations.weight[0].gain
    assert torch.isfinite(gain.grad) and gain.grad != 0  # gamma's gradient from W, not from W_hat = 0


def test_sigma_reparam_state_dict_and_layouts():
    """Keys: torch's spectral-norm keys and `gain` (never `gamma`: transformers renames it); the parametrization
    loads, deep-copies and bakes in with remove_parametrizations; the model helper converts Linear and Conv layers."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.LayerNorm(5))
    sn_ext.sigma_reparam_model(model, sigma_grad=False)
    keys = list(model.state_dict())
    assert "2.parametrizations.weight.0.gain" in keys and not any("gamma" in k for k in keys)
    assert not parametrize.is_parametrized(model[3])
    x = randn(2, 3, 6, 6)
    model(x)
    twin = copy.deepcopy(model)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.LayerNorm(5))
    sn_ext.sigma_reparam_model(fresh, sigma_grad=False)
    fresh.load_state_dict(model.state_dict())
    for m in (model, twin, fresh):
        m.eval()
    assert_rel(fresh(x), model(x), 0.0, "loaded")
    assert_rel(twin(x), model(x), 0.0, "deep copy")
    expected = model[2].weight.detach().clone()
    parametrize.remove_parametrizations(model[2], "weight")
    assert torch.equal(model[2].weight, expected)


def test_sigma_reparam_model_checks_first():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sn_ext.spectral_norm(model[1])
    with pytest.raises(ValueError, match=r"'1' \(Linear\): 'weight' already has a spectral norm"):
        sn_ext.sigma_reparam_model(model)
    assert not parametrize.is_parametrized(model[0])


# ---------------------------------------------------------------------------------------------------------------
# The variants in grouped mode, under torch.compile, in the diagnostics


def _variant_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 3, 2),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 6),
        nn.Linear(6, 2),
    ).double()
    sn_ext.spectral_norm(model[0], coeff=0.5)
    sn_ext.legacy.spectral_norm(model[2], coeff=0.3, sigma_grad=False)
    sn_ext.sigma_reparam(model[4])
    sn_ext.spectral_norm(model[5])
    return model


def test_grouped_matches_per_layer():
    """A model mixing bounded (both versions), sigma-reparam and plain layers, grouped: the per-layer numbers."""
    per_layer, grouped = _variant_model(11), _variant_model(11)
    sn_ext.grouped_spectral_norm(grouped)
    buffers = [(name, name) for name, _ in per_layer.named_buffers()]
    _train_and_compare(grouped, per_layer, (2, 3, 6, 6), steps=3, tol=1e-13, buffers=buffers)


def test_compiles_fullgraph():
    eager = _variant_model(12)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")

    class Compiled(nn.Module):  # the compiled function with twin's parameters, for _train_and_compare
        def __init__(self):
            super().__init__()
            self.twin = twin

        def forward(self, x):
            return compiled(x)

    wrapper = Compiled()
    names = [(name, "twin." + name) for name, _ in eager.named_parameters()]
    buffers = [(name, "twin." + name) for name, _ in eager.named_buffers()]
    _train_and_compare(eager, wrapper, (2, 3, 6, 6), steps=3, tol=1e-12, buffers=buffers, params=names)


def test_sigmas_and_spectral_report_know_the_variants():
    model = _variant_model(13)
    model(randn(2, 3, 6, 6, dtype=torch.float64))
    found = sn_ext.sigmas(model)
    assert set(found) == {"0.weight", "2.weight", "4.weight", "5.weight"}
    report = sn_ext.spectral_report(model)
    for row in report.rows:
        if row["operator_norm"] is None:
            continue
        layer = model[int(row["name"].split(".")[0])]
        with torch.no_grad():
            expected = torch.linalg.matrix_norm(layer.weight.double(), ord=2).item()
        assert abs(row["operator_norm"] - expected) <= 1e-9 * expected, row["name"]


def test_restore_refuses_the_variants_by_name():
    model = _variant_model(14)
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\).*coeff=0.5.*no torch equivalent") as error:
        sn_ext.restore_torch_spectral_norm(model)
    assert "'4' (Linear), tensor 'weight': its sigma-reparam" in str(error.value)
    assert type(model[5].parametrizations.weight[0]) is sn_ext.SpectralNorm  # nothing changed


# ---------------------------------------------------------------------------------------------------------------
# Errors and state


@pytest.mark.parametrize("coeff", [0, -1.0, float("nan"), float("inf"), True, "1"])
@pytest.mark.parametrize(
    "register", [sn_ext.spectral_norm, sn_ext.legacy.spectral_norm], ids=["parametrization", "legacy"]
)
def test_bad_coeff_is_a_value_error(register, coeff):
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="coeff must be a positive finite number"):
        register(layer, coeff=coeff)
    assert not parametrize.is_parametrized(layer) and not layer._forward_pre_hooks


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"gamma_init": "one"}, ValueError, "gamma_init must be"),
        ({"gamma_init": float("nan")}, ValueError, "gamma_init must be"),
        ({"eval_iteration": 1}, TypeError, "eval_iteration must be a bool"),
        ({"sigma_grad": None}, TypeError, "sigma_grad must be a bool"),
    ],
)
def test_bad_sigma_reparam_arguments(kwargs, error, pattern):
    layer = nn.Linear(4, 3)
    with pytest.raises(error, match=pattern):
        sn_ext.sigma_reparam(layer, **kwargs)
    assert not parametrize.is_parametrized(layer)


def test_legacy_bounded_layout_loads_either_layout():
    """A bounded parametrization's checkpoint loads into DUE's layout (weight_sigma becomes u^T W v, what an eval
    forward logs) and back (weight_sigma dropped); eval outputs agree."""
    torch.manual_seed(15)
    param = sn_ext.spectral_norm(nn.Linear(6, 4), coeff=0.5)
    param(randn(2, 6))
    legacy = sn_ext.legacy.spectral_norm(nn.Linear(6, 4), coeff=0.5)
    legacy.load_state_dict(param.state_dict())
    param.eval(), legacy.eval()
    x = randn(3, 6)
    assert_rel(legacy(x), param(x), 1e-6, "eval output")
    assert_rel(legacy.weight_sigma, param.parametrizations.weight[0]._sigma.reshape(1), 1e-6, "weight_sigma")
    back = sn_ext.spectral_norm(nn.Linear(6, 4), coeff=0.5)
    back.load_state_dict(legacy.state_dict())
    back.eval()
    assert_rel(back(x), param(x), 1e-6, "round trip")
    removed = sn_ext.legacy.spectral_norm(nn.Linear(6, 4), coeff=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sn_ext.legacy.remove_spectral_norm(removed)
    assert list(removed.state_dict()) == ["bias", "weight"]
