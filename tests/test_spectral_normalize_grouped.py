"""sn_ext::spectral_normalize_grouped_ and sn_ext::spectral_normalize_grouped_backward (many layers per call), and
grouped mode built on them (sn_ext.grouped_spectral_norm), against the per-layer path and torch.

The per-layer path is itself tested against torch (test_parity.py); grouped mode must give the same numbers as it:
the same outputs, gradients and buffers, in train and eval mode, for a model called twice before one backward, with
parametrizations (u-first), legacy hooks (v-first) or both in one model.
The ops' tests run on every backend that has grouped kernels (tests/op_cases.py; ids start with the backend, and one
that cannot run here skips, saying why): the CPU kernels (the per-layer kernels, layer by layer), the CUDA kernel (one
launch each way), the reference. Its launch count and CUDA-graph capture: in tests/test_cuda.py.
"""

import copy
import sys

import pytest
import torch
from helpers import TOL, assert_rel, randn
from op_cases import DEVICE, EPS, NO_TRITON_OP, dtype_id, grouped_layers, not_run, param
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import parametrize
from torch.nn.utils import remove_spectral_norm as torch_remove_legacy
from torch.nn.utils import spectral_norm as torch_legacy

import sn_ext
from sn_ext import ops, reference
from sn_ext.nn.legacy_hook import SpectralNorm as LegacyHook

torch_legacy_module = sys.modules["torch.nn.utils.spectral_norm"]

GROUPED_OPS = {
    "cpu": (ops.spectral_normalize_grouped_, ops.spectral_normalize_grouped_backward),
    "cuda": (ops.spectral_normalize_grouped_, ops.spectral_normalize_grouped_backward),
    "reference": (reference.spectral_normalize_grouped_, reference.spectral_normalize_grouped_backward),
}


class Discriminator(nn.Module):
    """Every kind of layer grouped mode takes, at odd sizes: Embedding, Conv2d, ConvTranspose2d (dim 1), a
    channels_last Conv2d, a transposed (non-contiguous) Linear weight, and a BatchNorm it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.conv = nn.Conv2d(3, 7, 3)
        self.up = nn.ConvTranspose2d(7, 5, 2, stride=2)
        self.norm = nn.BatchNorm2d(5)
        self.conv_cl = nn.Conv2d(5, 6, 3).to(memory_format=torch.channels_last)
        self.fc = nn.Linear(6, 1)
        self.fc.weight = nn.Parameter(torch.randn(6, 1).t())  # a transposed view

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x + self.embed(label)[:, :, None, None]))
        h = self.conv_cl(self.norm(self.up(h)))
        return self.fc(h.mean((2, 3)))


LAYERS = ("embed", "conv", "up", "conv_cl", "fc")
# Which layers have the legacy version (sn_ext.legacy.spectral_norm, v-first); the others get the parametrization.
LEGACY_LAYERS = {"none": (), "mixed": ("conv", "up", "fc"), "all": LAYERS}


def _twins(dtype: torch.dtype, device: str, seed: int = 0, legacy: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """(per-layer, grouped): the same weights and the same u, v; the `legacy` layers with the legacy version (the
    grouped model's are adopted as they are), the others with the parametrization."""
    torch.manual_seed(seed)
    base = Discriminator().to(device, dtype)
    per_layer, grouped = copy.deepcopy(base), copy.deepcopy(base)
    for name in LAYERS:
        if name in legacy:
            sn_ext.legacy.spectral_norm(getattr(per_layer, name))
            sn_ext.legacy.spectral_norm(getattr(grouped, name))
        else:
            sn_ext.spectral_norm(getattr(per_layer, name))
    sn_ext.grouped_spectral_norm(grouped)
    grouped.load_state_dict(per_layer.state_dict())
    return per_layer, grouped


def _inputs(dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 6, 5, generator=gen, dtype=torch.float64).to(device, dtype)
    return x, torch.randint(0, 5, (3,), generator=gen).to(device)


def _step(model, dtype, device, seed):
    """Two forwards (as a GAN's real and fake batches) before one backward."""
    out_a = model(*_inputs(dtype, device, seed))
    out_b = model(*_inputs(dtype, device, seed + 1))
    (out_a.square().sum() - out_b.sum()).backward()
    return out_a.detach(), out_b.detach()


@pytest.mark.parametrize("legacy", list(LEGACY_LAYERS))
@pytest.mark.parametrize(
    "backend,dtype",
    [param(b, dt, id=str(dt).replace("torch.", "")) for b in ("cpu", "cuda") for dt in (torch.float32, torch.float64)],
)
def test_grouped_equals_per_layer(backend, dtype, legacy):
    device = DEVICE[backend]
    per_layer, grouped = _twins(dtype, device, legacy=LEGACY_LAYERS[legacy])
    assert [member.v_first for member in grouped._sn_ext_group.members] == [n in LEGACY_LAYERS[legacy] for n in LAYERS]
    for step in range(3):
        for model in (per_layer, grouped):
            model.zero_grad()
        outputs = [_step(model, dtype, device, seed=10 * step) for model in (per_layer, grouped)]
        tol = 0.0 if device == "cpu" else TOL[dtype]  # the CPU grouped op runs the per-layer kernels
        for ours, ref in zip(outputs[1], outputs[0]):
            assert_rel(ours, ref, tol, f"output, step {step}")
        for (name, p_ref), (_, p) in zip(per_layer.named_parameters(), grouped.named_parameters()):
            assert_rel(p.grad, p_ref.grad, tol, f"grad of {name}, step {step}")
        for (name, b_ref), (_, b) in zip(per_layer.named_buffers(), grouped.named_buffers()):
            assert_rel(b, b_ref, tol, f"buffer {name}, step {step}")
        with torch.no_grad():
            for p_ref, p in zip(per_layer.parameters(), grouped.parameters()):
                p_ref.sub_(0.1 * p_ref.grad)
                p.sub_(0.1 * p.grad)
    per_layer.eval(), grouped.eval()
    x, label = _inputs(dtype, device, 99)
    assert_rel(grouped(x, label), per_layer(x, label), 0.0 if device == "cpu" else TOL[dtype], "eval output")


def test_grouped_matches_torch_spectral_norm():
    """Straight against the oracle: torch's parametrization on the same weights and vectors."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.ConvTranspose2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 7 * 7, 1)
    ).double()
    theirs = copy.deepcopy(model)
    for i in (0, 2, 4):
        torch_param.spectral_norm(theirs[i])
    ours = sn_ext.grouped_spectral_norm(copy.deepcopy(model))
    ours.load_state_dict(theirs.state_dict())
    x = randn(2, 3, 7, 7, dtype=torch.float64, seed=4)
    for model_ in (theirs, ours):
        model_(x).sum().backward()
    for (name, p_ref), (_, p) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert_rel(p.grad, p_ref.grad, 1e-12, name)
    for (name, b_ref), (_, b) in zip(theirs.named_buffers(), ours.named_buffers()):
        assert_rel(b, b_ref, 1e-12, name)


@pytest.mark.parametrize(
    "backend,dtype,n",
    [
        param(b, dt, n, id=f"{str(dt).replace('torch.', '')}-{n}")
        for b in ("cpu", "cuda", "reference")
        for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        for n in (0, 1, 3)
    ]
    + [not_run("triton", NO_TRITON_OP, 2)],
)
def test_grouped_ops_equal_the_reference_per_layer(backend, dtype, n):
    device = DEVICE[backend]
    forward, backward = GROUPED_OPS[backend]
    weights, us, vs, dims = grouped_layers(dtype, device)
    us_before, vs_before = [u.clone() for u in us], [v.clone() for v in vs]
    weights_sn, sigmas, us_used, vs_used = forward(weights, us, vs, dims, n, EPS)
    grads = [randn(*w.shape, dtype=dtype, seed=40 + i).to(device) for i, w in enumerate(weights)]
    grads_w = backward(grads, weights_sn, us_used, vs_used, sigmas, dims)
    tol = TOL[dtype] * (10 if device == "cuda" else 1)
    for i, (w, d) in enumerate(zip(weights, dims)):
        ref_sn, ref_sigma, ref_u, ref_v = reference.spectral_normalize(w, us_before[i], vs_before[i], d, n, EPS)
        assert weights_sn[i].stride() == torch.empty_like(w).stride()  # the weight's layout, as torch's W / sigma
        assert_rel(weights_sn[i], ref_sn, tol, f"W_sn {i}")
        assert_rel(sigmas[i], ref_sigma, tol, f"sigma {i}")
        for name, got, want in (
            ("u", us[i], ref_u),
            ("v", vs[i], ref_v),
            ("u_used", us_used[i], ref_u),
            ("v_used", vs_used[i], ref_v),
        ):
            assert_rel(got, want, tol, f"{name} {i}")
        ref_grad = reference.spectral_normalize_backward(grads[i], ref_sn, ref_u, ref_v, ref_sigma, d)
        assert_rel(grads_w[i], ref_grad, tol, f"grad {i}")


# Legacy (v-first) and parametrization (u-first) layers in one call, as a model mixing the two versions makes it.
MIXED_ORDERS = [True, False, False, True]
PER_LAYER_OPS = {
    "cpu": (ops.spectral_normalize_, ops.spectral_normalize_backward),
    "cuda": (ops.spectral_normalize_, ops.spectral_normalize_backward),
    "reference": (reference.spectral_normalize_, reference.spectral_normalize_backward),
}


@pytest.mark.parametrize(
    "backend,dtype,n",
    [
        param(b, dt, n, id=f"{dtype_id(dt)}-{n}")
        for b in ("cpu", "cuda", "reference")
        for dt in (torch.float32, torch.float64, torch.bfloat16)
        for n in (0, 1, 3)
    ]
    + [not_run("triton", NO_TRITON_OP, 2)],
)
def test_grouped_ops_take_each_layers_order(backend, dtype, n):
    """Each layer of a mixed call gives, bit for bit, what the backend's per-layer op gives with that layer's
    v_first (the CPU op runs the per-layer kernels; the CUDA op launches each order apart, every layer with the
    plans of its own launch): W_sn, sigma, the vectors used, the buffers updated in place and the gradient."""
    device = DEVICE[backend]
    forward, backward = GROUPED_OPS[backend]
    per_layer_forward, per_layer_backward = PER_LAYER_OPS[backend]
    weights, us, vs, dims = grouped_layers(dtype, device, seed=5)
    initial = [(u.clone(), v.clone()) for u, v in zip(us, vs)]
    buffers = [(u.clone(), v.clone()) for u, v in initial]  # the per-layer ops update these
    expected = [
        per_layer_forward(w, u, v, d, n, EPS, order)
        for w, (u, v), d, order in zip(weights, buffers, dims, MIXED_ORDERS)
    ]
    weights_sn, sigmas, us_used, vs_used = forward(weights, us, vs, dims, n, EPS, MIXED_ORDERS)
    grads = [randn(*w.shape, dtype=dtype, seed=60 + i).to(device) for i, w in enumerate(weights)]
    grads_w = backward(grads, weights_sn, us_used, vs_used, sigmas, dims)
    for i, ((w_sn, sigma, u_used, v_used), (u, v), d) in enumerate(zip(expected, buffers, dims)):
        ref_grad = per_layer_backward(grads[i], w_sn, u_used, v_used, sigma, d)
        for name, got, want in (
            ("W_sn", weights_sn[i], w_sn),
            ("sigma", sigmas[i], sigma),
            ("u_used", us_used[i], u_used),
            ("v_used", vs_used[i], v_used),
            ("u", us[i], u),
            ("v", vs[i], v),
            ("grad", grads_w[i], ref_grad),
        ):
            assert torch.equal(got, want), f"{name} of layer {i} (v_first={MIXED_ORDERS[i]})"
    if n:  # the orders give other vectors: a call that ignored v_first would fail above
        u_first = per_layer_forward(weights[0], *initial[0], dims[0], n, EPS, False)
        assert not torch.equal(u_first[2], expected[0][2])


@pytest.mark.parametrize("backend", [param(b, id="float32") for b in ("cpu", "cuda", "reference")])
def test_grouped_op_orders_of_the_wrong_length_are_refused_and_change_nothing(backend):
    weights, us, vs, dims = grouped_layers(torch.float32, DEVICE[backend])
    before = [(u.clone(), v.clone()) for u, v in zip(us, vs)]
    for orders in ([True, False, True], [False] * 5):
        with pytest.raises(ValueError, match=rf"v_first must hold one value per weight \(4\), got {len(orders)}"):
            GROUPED_OPS[backend][0](weights, us, vs, dims, 1, EPS, orders)
    assert all(torch.equal(u, b[0]) and torch.equal(v, b[1]) for u, v, b in zip(us, vs, before))
    GROUPED_OPS[backend][0](weights, us, vs, dims, 1, EPS, None)  # None: every layer u-first, as before v_first


def test_grouped_op_gradcheck_and_gradgradcheck():
    weights, us, vs, dims = grouped_layers(torch.float64, "cpu")
    weights = [w.detach().requires_grad_() for w in weights]

    def f(*ws):  # n = 0: the formulas hold u, v constant, as torch does (an iteration would make them move with W)
        weights_sn, sigmas, _, _ = ops.spectral_normalize_grouped_(list(ws), us, vs, dims, 0, EPS)
        return (*weights_sn, sigmas)

    assert torch.autograd.gradcheck(f, weights)
    assert torch.autograd.gradgradcheck(f, weights)


def test_grouped_op_opcheck():
    """Schema, fake kernel and autograd registration (torch.compile does not trace this op: see nn/grouped.py)."""
    weights, us, vs, dims = grouped_layers(torch.float32, "cpu")
    weights = [w.detach().requires_grad_() for w in weights]
    for orders in (None, MIXED_ORDERS):
        torch.library.opcheck(
            torch.ops.sn_ext.spectral_normalize_grouped_.default,
            (weights, us, vs, dims, 1, EPS, orders),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


def test_a_layer_left_out_of_the_loss_gets_a_zero_gradient():
    per_layer, grouped = _twins(torch.float64, "cpu")
    for model in (per_layer, grouped):
        x, label = _inputs(torch.float64, "cpu", 5)
        h = torch.relu(model.conv(x + model.embed(label)[:, :, None, None]))
        model.up(h).sum().backward()  # conv_cl and fc not used
    assert (
        grouped.fc.parametrizations.weight.original.grad is None
        or not grouped.fc.parametrizations.weight.original.grad.any()
    )
    assert_rel(
        grouped.conv.parametrizations.weight.original.grad,
        per_layer.conv.parametrizations.weight.original.grad,
        0.0,
        "conv grad",
    )


def test_state_dict_is_torchs_and_torch_checkpoints_load():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    theirs = copy.deepcopy(model)
    torch_param.spectral_norm(theirs[0]), torch_param.spectral_norm(theirs[2])
    ours = sn_ext.grouped_spectral_norm(copy.deepcopy(model))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = randn(3, 4, seed=1)
    assert_rel(ours(x), theirs(x), 1e-6, "eval output after loading torch's checkpoint")


def test_choice_of_layers_adoption_and_ungroup():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 1))
    sn_ext.spectral_norm(model[2])  # already normalized: adopted as it is
    sn_ext.grouped_spectral_norm(model, layers=[model[2], model[4]])
    assert [layer for layer, _ in model._sn_ext_group.layers] == [model[2], model[4]]
    assert not hasattr(model[0], "parametrizations")
    with pytest.raises(RuntimeError, match="already grouped"):
        sn_ext.grouped_spectral_norm(model)
    sn_ext.ungroup_spectral_norm(model)
    assert not hasattr(model, "_sn_ext_group") and hasattr(model[4], "parametrizations")
    model(randn(2, 4, seed=0)).sum().backward()  # per-layer again


def test_torchs_spectral_norms_are_converted_then_grouped():
    """Both torch versions: converted to sn_ext's same version (the same Parameters, u, v and state dict, as
    convert_spectral_norm does), then grouped; the numbers stay torch's."""
    torch.manual_seed(0)
    theirs = nn.Sequential(
        torch_legacy(nn.Conv2d(3, 4, 3)), nn.Flatten(), torch_param.spectral_norm(nn.Linear(4 * 3 * 3, 5))
    ).double()
    x = randn(2, 3, 5, 5, dtype=torch.float64, seed=1)
    with torch.no_grad():  # (a legacy layer's weight then has no autograd history: deepcopy works)
        theirs(x)  # u, v are no longer the registration's
    ours = copy.deepcopy(theirs)
    params, state = [id(p) for p in ours.parameters()], {k: v.clone() for k, v in ours.state_dict().items()}
    sn_ext.grouped_spectral_norm(ours)
    assert [type(norm) for norm in ours._sn_ext_group.norms] == [LegacyHook, sn_ext.SpectralNorm]
    assert [id(p) for p in ours.parameters()] == params
    assert list(ours.state_dict()) == list(state)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
    for step in range(2):
        for model in (theirs, ours):
            (model(x).square().sum() + model(2 * x).sum()).backward()  # two calls, one backward
        for (name, p_ref), (_, p) in zip(theirs.named_parameters(), ours.named_parameters()):
            assert_rel(p.grad, p_ref.grad, 1e-12, f"grad of {name}, step {step}")
        for key, value in theirs.state_dict().items():
            assert_rel(ours.state_dict()[key], value, 1e-12, f"{key}, step {step}")


def test_a_subclass_of_torchs_legacy_hook_is_refused_by_name():
    """As DUE's SpectralNorm (a coefficient instead of 1): it may compute something else, so nothing converts it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    hook = torch_legacy_module.SpectralNorm.apply(model[1], "weight", 1, 0, 1e-12)
    hook.__class__, hook.coeff = CoefficientSpectralNorm, 0.95
    with pytest.raises(
        ValueError,
        match=r"'1' \(Linear\), tensor 'weight': .*test_spectral_normalize_grouped\."
        r"CoefficientSpectralNorm, a subclass of torch's SpectralNorm.*leave this layer out",
    ):
        sn_ext.grouped_spectral_norm(model)
    assert not hasattr(model, "_sn_ext_group") and not parametrize.is_parametrized(model[0])
    assert list(model[1]._forward_pre_hooks.values()) == [hook]


def test_bad_models_and_arguments_are_named():
    with pytest.raises(ValueError, match="no layer"):
        sn_ext.grouped_spectral_norm(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    weights, us, vs, dims = grouped_layers(torch.float32, "cpu")
    with pytest.raises(ValueError, match="us must hold one tensor per weight"):
        ops.spectral_normalize_grouped_(weights, us[:-1], vs, dims, 1, EPS)
    with pytest.raises(ValueError, match="dims must hold one value per weight"):
        ops.spectral_normalize_grouped_(weights, us, vs, dims[:-1], 1, EPS)
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype (torch.float64|Double)"):
        ops.spectral_normalize_grouped_([weights[0], weights[1].double()], us[:2], vs[:2], dims[:2], 1, EPS)
    with pytest.raises(ValueError, match=r"\(layer 2\): u must be a vector of size 7"):
        ops.spectral_normalize_grouped_(weights, us[:2] + [us[0]] + us[3:], vs, dims, 1, EPS)
    with pytest.raises(ValueError, match="at least one tensor"):
        ops.spectral_normalize_grouped_([], [], [], [], 1, EPS)


class CoefficientSpectralNorm(torch_legacy_module.SpectralNorm):
    coeff: float


@pytest.mark.parametrize("legacy", [(), (0,), (1,)], ids=["parametrizations", "legacy_first", "legacy_second"])
def test_a_failed_forward_leaves_no_pending_result(legacy):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))
    for i in legacy:
        sn_ext.legacy.spectral_norm(model[i])
    sn_ext.grouped_spectral_norm(model)
    with pytest.raises(RuntimeError):
        model(randn(2, 3, seed=0))  # the second layer gets 4 features, not 5
    assert all(norm._grouped_result is None for norm in model._sn_ext_group.norms)


def test_a_grouped_legacy_layer_that_is_the_model_itself_iterates_once_per_forward():
    """The group's pre-hook runs before the layer's own legacy hook, which then takes the group's result."""
    torch.manual_seed(0)
    per_layer = sn_ext.legacy.spectral_norm(nn.Linear(5, 3))
    grouped = sn_ext.grouped_spectral_norm(copy.deepcopy(per_layer))
    calls = []
    group_compute = grouped._sn_ext_group.compute
    grouped._sn_ext_group.compute = lambda: (calls.append(1), group_compute())[1]
    for seed in range(3):
        x = randn(2, 5, seed=seed)
        assert torch.equal(grouped(x), per_layer(x))
    assert len(calls) == 3
    assert torch.equal(grouped.weight_u, per_layer.weight_u) and torch.equal(grouped.weight_v, per_layer.weight_v)


def test_removing_a_grouped_legacy_layers_spectral_norm_takes_it_out_of_the_group():
    """torch's own remove_spectral_norm on one layer: the others stay grouped, and the model as per layer."""
    per_layer, grouped = _twins(torch.float64, "cpu", legacy=LEGACY_LAYERS["all"])
    for model in (per_layer, grouped):
        torch_remove_legacy(model.up)
        assert isinstance(model.up.weight, nn.Parameter) and not model.up._forward_pre_hooks
    assert [layer for layer, _ in grouped._sn_ext_group.layers] == [
        grouped.embed,
        grouped.conv,
        grouped.up,
        grouped.conv_cl,
        grouped.fc,
    ]
    _step(grouped, torch.float64, "cpu", seed=0)
    assert grouped.up not in [layer for layer, _ in grouped._sn_ext_group.layers]
    _step(per_layer, torch.float64, "cpu", seed=0)
    for (name, p_ref), (_, p) in zip(per_layer.named_parameters(), grouped.named_parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    assert_rel(grouped(*_inputs(torch.float64, "cpu", 1)), per_layer(*_inputs(torch.float64, "cpu", 1)), 0.0, "out")


def test_torch_compile_fullgraph():
    per_layer, grouped = _twins(torch.float32, "cpu")
    compiled = torch.compile(grouped, fullgraph=True, backend="aot_eager")
    x, label = _inputs(torch.float32, "cpu", 0)
    out = compiled(x, label)
    ref = per_layer(x, label)
    assert_rel(out, ref, 1e-6, "compiled output")
    out.sum().backward()


def _unit_vector(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


@pytest.mark.parametrize(
    "backend,dtype", [param("cuda", dt, id=str(dt).replace("torch.", "")) for dt in (torch.float32, torch.bfloat16)]
)
def test_many_small_and_large_layers_equal_the_per_layer_kernels(backend, dtype):
    """More layers than one launch takes (kMaxLayers = 48), and layers large enough for split reductions."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3 + i % 5, 2 + i % 7) for i in range(53)] + [(512, 512, 3, 3), (2048, 4608), (1, 70000), (70000, 1)]
    weights = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    dims = [0] * len(weights)
    us = [_unit_vector(torch.randn(w.shape[0], generator=gen)).to("cuda", dtype) for w in weights]
    vs = [_unit_vector(torch.randn(w[0].numel(), generator=gen)).to("cuda", dtype) for w in weights]
    per_layer = [ops.spectral_normalize(w, u, v, 0, 1, EPS) for w, u, v in zip(weights, us, vs)]
    weights_sn, sigmas, us_used, vs_used = ops.spectral_normalize_grouped_(weights, us, vs, dims, 1, EPS)
    for i, (ref_sn, ref_sigma, ref_u, ref_v) in enumerate(per_layer):
        # the same plans and phase functions as the per-layer kernels: the same bits
        assert torch.equal(weights_sn[i], ref_sn), f"W_sn {i} {shapes[i]}"
        assert torch.equal(sigmas[i], ref_sigma), f"sigma {i}"
        assert torch.equal(us_used[i], ref_u) and torch.equal(us[i], ref_u), f"u {i}"
        assert torch.equal(vs_used[i], ref_v) and torch.equal(vs[i], ref_v), f"v {i}"


@pytest.mark.parametrize("backend", [param(b, id="float32") for b in ("cpu", "cuda", "reference")])
def test_non_finite_layer_leaves_its_buffers_and_spares_the_others(backend):
    device = DEVICE[backend]
    weights, us, vs, dims = grouped_layers(torch.float32, device)
    weights[1] = weights[1].clone()
    weights[1][0, 0] = float("nan")
    before = [(u.clone(), v.clone()) for u, v in zip(us, vs)]
    GROUPED_OPS[backend][0](weights, us, vs, dims, 1, EPS)
    assert torch.equal(us[1], before[1][0]) and torch.equal(vs[1], before[1][1])
    assert not torch.equal(us[0], before[0][0])  # the healthy layers did iterate
    assert torch.isfinite(us[0]).all() and torch.isfinite(vs[2]).all()


def test_deepcopy_is_an_independent_grouped_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), sn_ext.legacy.spectral_norm(nn.Linear(4, 2)))
    sn_ext.grouped_spectral_norm(model)
    twin = copy.deepcopy(model)
    x = randn(2, 3, seed=0)
    assert torch.equal(model(x), twin(x))
    assert twin._sn_ext_group.norms[0] is twin[0].parametrizations.weight[0]  # the copy's own layers
    assert twin._sn_ext_group.norms[1] is next(iter(twin[2]._forward_pre_hooks.values()))
    sn_ext.ungroup_spectral_norm(twin)
    assert len(model._forward_pre_hooks) == 1 and len(twin._forward_pre_hooks) == 0
