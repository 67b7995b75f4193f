"""sn_ext.sigmas and sn_ext.spectral_report (sn_ext/diagnostics.py): the sigma each spectral norm keeps from its last
computation (both versions, per layer and grouped, every backend that runs here) equals u^T W v of that step and
costs no op; torch's spectral norms' sigma; the report's exact sigma against an SVD and its operator norms against
the largest singular value of each convolution's dense matrix, built column by column; the report changes nothing
(buffers, weights, kept sigmas, modes, random state); torch.compile(fullgraph=True) still compiles."""

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from helpers import assert_rel, linear_map_matrix, numpy_matrix, small_backend_net
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import parametrize
from torch.nn.utils import spectral_norm as torch_legacy_sn

import sn_ext
from sn_ext import backends

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.op_count import count_ops  # noqa: E402

BACKENDS = [name for name in ("cpu", "reference") if not backends.get(name).unavailable_reasons()]
REGISTER = {"parametrization": sn_ext.spectral_norm, "legacy": sn_ext.legacy.spectral_norm}
CPU = torch.device("cpu")


def _norm(layer: nn.Module):
    """The spectral norm object of layer.weight (the parametrization or the legacy hook)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight[0]
    return next(h for h in layer._forward_pre_hooks.values() if getattr(h, "name", None) == "weight")


def _state(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(W, u, v, dim) of either version, sn_ext's or torch's."""
    if parametrize.is_parametrized(layer, "weight"):
        norm = layer.parametrizations.weight[0]
        return layer.parametrizations.weight.original, norm._u, norm._v, norm.dim
    return layer.weight_orig, layer.weight_u, layer.weight_v, _norm(layer).dim


def _u_w_v(layer: nn.Module) -> torch.Tensor:
    """u^T W v in float64 from the layer's current buffers and raw weight, computed independently of sn_ext."""

    weight, u, v, dim = _state(layer)
    return torch.tensor(float(u.double().numpy() @ numpy_matrix(weight, dim) @ v.double().numpy()))


def _step(net: nn.Module, x: torch.Tensor, seed: int) -> None:
    """One train step: forward, backward, a random weight change (as an optimizer's)."""
    net(x).square().sum().backward()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ---- the kept sigma ----


@pytest.mark.parametrize("kind", list(REGISTER))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_sigma_is_u_w_v_of_that_step(kind, backend):
    net = small_backend_net(REGISTER[kind], backend, "cpu", torch.float32)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(3))
    layers = [m for m in net if hasattr(m, "weight_orig") or parametrize.is_parametrized(m)]
    for step in range(3):
        net(x)  # u, v updated: the kept sigma is u^T W v with the new u, v and this step's W
        kept = sn_ext.sigmas(net)
        assert sorted(kept) == ["0.weight", "2.weight", "4.weight"]
        for index, layer in zip((0, 2, 4), layers):
            sigma = kept[f"{index}.weight"]
            assert sigma.dim() == 0 and not sigma.requires_grad and sigma is _norm(layer)._sigma
            assert_rel(sigma, _u_w_v(layer), 1e-6, f"{kind} {backend} layer {index} step {step}")
        _step(net, x, seed=step)
    net.eval()  # eval: no power iteration, sigma still kept (with the weights changed since)
    net(x)
    for index, layer in zip((0, 2, 4), layers):
        assert_rel(sn_ext.sigmas(net)[f"{index}.weight"], _u_w_v(layer), 1e-6, f"{kind} {backend} eval")


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "with_a_legacy_layer"])
@pytest.mark.parametrize("train", [True, False])
def test_kept_sigma_grouped(train, legacy):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2), nn.Flatten(), nn.Linear(72, 3))
    if legacy:
        sn_ext.legacy.spectral_norm(net[2])  # grouped with the others, v-first
    sn_ext.grouped_spectral_norm(net).train(train)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(3))
    for step in range(2):
        net(x)
        kept = sn_ext.sigmas(net)
        for index in (0, 2, 4):
            assert _norm(net[index])._sigma.dim() == 1  # the group's vector, read at this layer's index
            assert_rel(kept[f"{index}.weight"], _u_w_v(net[index]), 1e-6, f"grouped layer {index} step {step}")
        _step(net, x, seed=step)


@pytest.mark.parametrize("apply", [torch_param.spectral_norm, torch_legacy_sn], ids=["torch", "torch_legacy"])
def test_torch_sigma_from_its_buffers(apply):
    """torch keeps no sigma: sigmas() computes u^T W v from its buffers, the sigma its forward divided W by."""
    torch.manual_seed(0)
    layer = apply(nn.Conv2d(3, 5, 3))
    x = torch.randn(2, 3, 6, 6)
    with parametrize.cached():
        layer(x)
        weight_sn = layer.weight
    sigma = sn_ext.sigmas(nn.Sequential(layer))["0.weight"]
    assert_rel(_state(layer)[0] / sigma, weight_sn, 1e-6, "W / sigma against torch's W_sn")


def test_kept_sigma_outside_the_state_dict_and_copies():
    """The kept sigma is a plain attribute: state dict keys stay torch's; deepcopy and pickling carry it."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    theirs = copy.deepcopy(ours)
    sn_ext.spectral_norm(ours[0])
    sn_ext.legacy.spectral_norm(ours[1])
    torch_param.spectral_norm(theirs[0])
    torch_legacy_sn(theirs[1])
    with torch.no_grad():  # a legacy module's weight holds no graph then: deepcopy and pickling work, as torch's
        ours(torch.randn(2, 4))
    assert all(_norm(layer)._sigma is not None for layer in ours)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    clone = copy.deepcopy(ours)
    assert all(torch.equal(_norm(a)._sigma, _norm(b)._sigma) for a, b in zip(clone, ours))
    buf = io.BytesIO()
    torch.save(ours[1], buf)  # a legacy module pickles whole (a parametrized one only through its state_dict)
    buf.seek(0)
    assert torch.equal(_norm(torch.load(buf, weights_only=False))._sigma, _norm(ours[1])._sigma)


# ---- no extra op ----


@pytest.mark.parametrize("kind", list(REGISTER))
@pytest.mark.parametrize("backend", BACKENDS)
def test_keeping_sigma_adds_no_op(kind, backend):
    """A spectral norm's computation is one op, whichever backend (every backend's forward updates u and v in place):
    keeping sigma dispatches nothing (no kernel, no sync); reading it back with sigmas() neither."""
    torch.manual_seed(0)
    layer = REGISTER[kind](nn.Conv2d(3, 4, 3), backend=backend)
    norm = _norm(layer)
    for train in (True, False):
        layer.train(train)
        compute = (lambda: layer.weight) if kind == "parametrization" else (lambda: norm(layer, ()))
        assert count_ops(compute, CPU)[0] == 1
        assert count_ops(lambda: sn_ext.sigmas(layer), CPU) == (0, 0)


def test_grouped_keeping_sigma_adds_no_op():
    torch.manual_seed(0)
    net = sn_ext.grouped_spectral_norm(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)))
    assert count_ops(net._sn_ext_group.compute, CPU)[0] == 1  # the grouped op


# ---- torch.compile ----


@pytest.mark.parametrize("grouped", [False, True], ids=["per_layer", "grouped"])
def test_compiles_fullgraph_and_keeps_sigma(grouped):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    if grouped:
        sn_ext.grouped_spectral_norm(eager)
    else:
        sn_ext.spectral_norm(eager[0])
        sn_ext.legacy.spectral_norm(eager[3])
    twin = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 7, 7)
    for _ in range(3):
        eager(x).sum().backward()
        compiled(x).sum().backward()
        ours, theirs = sn_ext.sigmas(twin), sn_ext.sigmas(eager)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert not ours[name].requires_grad
            assert_rel(ours[name], theirs[name], 1e-6, name)
            assert_rel(ours[name], _u_w_v(twin[int(name[0])]), 1e-6, name)
    # No recompile per step. Grouped: at most one, at the second call, when the group's forward hook has made
    # `_grouped_result` an instance attribute (so before sigma was kept too); torch 2.14 recompiles there, 2.6 not.
    assert 1 <= counter.frame_count <= (2 if grouped else 1)
    torch._dynamo.reset()


# ---- the report: exact sigma, operator norms ----


def _mixed_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(4, 6, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 9 * 9, 2),
    )
    sn_ext.spectral_norm(net[0])
    sn_ext.legacy.spectral_norm(net[2])
    torch_param.spectral_norm(net[4])
    torch_legacy_sn(net[6])
    return net


def test_sigma_exact_against_svd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(2, 3, 3), nn.ConvTranspose2d(3, 4, 2), nn.Embedding(7, 4))
    sn_ext.spectral_norm(net[0])
    sn_ext.spectral_norm(net[1], dim=2)
    sn_ext.spectral_norm(net[2])  # dim=1
    sn_ext.legacy.spectral_norm(net[3])
    report = sn_ext.spectral_report(net)
    assert [r["name"] for r in report.rows] == ["0.weight", "1.weight", "2.weight", "3.weight"]
    for row, layer in zip(report.rows, net):
        weight, _, _, dim = _state(layer)
        exact = torch.linalg.svdvals(torch.from_numpy(numpy_matrix(weight, dim)))[0]
        assert_rel(torch.tensor(row["sigma_exact"], dtype=torch.float64), exact, 1e-12, row["name"])
        assert row["sigma"] == pytest.approx(float(sn_ext.sigmas(net)[row["name"]]))
        assert row["rel_gap"] == pytest.approx((row["sigma_exact"] - row["sigma"]) / row["sigma_exact"])
    # Linear and Embedding: ||W / sigma||_2 without an input; convolutions need one
    assert [r["operator_norm"] is None for r in report.rows] == [False, True, True, False]
    assert report.rows[0]["operator_norm"] == pytest.approx(report.rows[0]["sigma_exact"] / report.rows[0]["sigma"])
    assert report.lipschitz_bound is None


def _dense_operator_norm(layer: nn.Module, in_shape: tuple) -> float:
    """The largest singular value of the layer's linear part (its output less its bias, with its own W / sigma in
    eval mode) as a dense matrix, built column by column from the basis inputs."""
    layer = copy.deepcopy(layer).eval()
    with torch.no_grad():
        zero = layer(torch.zeros(in_shape, dtype=torch.float64))
        matrix = linear_map_matrix(lambda x: layer(x) - zero, in_shape)
    return float(torch.linalg.svdvals(matrix)[0])


CONVS = [
    ("conv1d", lambda: nn.Conv1d(2, 3, 3), (1, 2, 9)),
    ("conv1d_stride2_pad1", lambda: nn.Conv1d(2, 3, 4, stride=2, padding=1), (1, 2, 10)),
    ("conv1d_dilation2", lambda: nn.Conv1d(2, 2, 3, dilation=2, padding=2), (1, 2, 8)),
    ("conv2d", lambda: nn.Conv2d(2, 3, 3), (1, 2, 6, 6)),
    ("conv2d_same", lambda: nn.Conv2d(2, 3, 3, padding="same"), (1, 2, 5, 5)),
    ("conv2d_stride2", lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (1, 2, 7, 6)),
    ("conv2d_dilation", lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=1), (1, 2, 7, 7)),
    ("conv2d_groups", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (1, 4, 5, 5)),
    ("conv2d_circular", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (1, 2, 5, 5)),
    ("conv2d_reflect", lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (1, 2, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(2, 2, 2), (1, 2, 4, 4, 4)),
    ("conv3d_stride_pad", lambda: nn.Conv3d(1, 2, 3, stride=2, padding=1), (1, 1, 5, 5, 4)),
    ("conv_transpose1d", lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), (1, 3, 6)),
    ("conv_transpose2d", lambda: nn.ConvTranspose2d(3, 2, 3), (1, 3, 4, 4)),
    ("conv_transpose2d_stride_pad", lambda: nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1), (1, 4, 4, 3)),
    (
        "conv_transpose2d_groups_dilation_outpad",
        lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, dilation=2, groups=2, output_padding=1),
        (1, 4, 3, 3),
    ),
    ("conv_transpose3d", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 3, 3, 2)),
]


@pytest.mark.parametrize("kind", ["sn_ext", "sn_ext_legacy", "torch"])
@pytest.mark.parametrize("make,in_shape", [c[1:] for c in CONVS], ids=[c[0] for c in CONVS])
def test_operator_norm_against_the_dense_matrix(make, in_shape, kind):
    torch.manual_seed(0)
    layer = make().double()
    apply = {"sn_ext": sn_ext.spectral_norm, "sn_ext_legacy": sn_ext.legacy.spectral_norm}.get(kind)
    (apply or torch_param.spectral_norm)(layer)
    with torch.no_grad():  # a train step (u, v move, the sigma is kept); no graph: the legacy layer deep-copies
        layer(torch.randn(in_shape, dtype=torch.float64))
    x = torch.randn(3, *in_shape[1:], dtype=torch.float64)
    report = sn_ext.spectral_report(nn.Sequential(layer), x, tol=1e-6, max_iters=10_000)
    (row,) = report.rows
    assert row["converged"], row
    exact = _dense_operator_norm(layer, in_shape)
    assert row["operator_norm"] == pytest.approx(exact, rel=1e-8), row
    assert report.lipschitz_bound == pytest.approx(row["operator_norm"])


def test_unbatched_input():
    torch.manual_seed(0)
    layer = sn_ext.spectral_norm(nn.Conv1d(2, 3, 3, stride=2).double())
    batched = sn_ext.spectral_report(nn.Sequential(layer), torch.randn(4, 2, 9, dtype=torch.float64))
    unbatched = sn_ext.spectral_report(nn.Sequential(layer), torch.randn(2, 9, dtype=torch.float64))
    assert unbatched.rows[0]["operator_norm"] == pytest.approx(batched.rows[0]["operator_norm"], rel=1e-5)


def test_report_changes_nothing_and_prints_a_table():
    net = _mixed_net()
    net.train()
    net[0].eval()  # a mix of modes, restored as it was
    x = torch.randn(2, 3, 8, 8)
    net(x)
    state = copy.deepcopy(net.state_dict())
    kept = {name: s.clone() for name, s in sn_ext.sigmas(net).items()}
    modes = [m.training for m in net.modules()]
    legacy_weight = net[2].weight
    rng = torch.get_rng_state()
    report = sn_ext.spectral_report(net, x)
    assert torch.equal(rng, torch.get_rng_state())
    assert [m.training for m in net.modules()] == modes
    assert net[2].weight is legacy_weight
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(torch.equal(kept[k], s) for k, s in sn_ext.sigmas(net).items())
    assert [r["name"] for r in report.rows] == ["0.weight", "2.weight", "4.weight", "6.weight"]
    assert all(r["operator_norm"] > 0 for r in report.rows)
    assert report.lipschitz_bound == pytest.approx(
        torch.tensor([r["operator_norm"] for r in report.rows], dtype=torch.float64).prod().item()
    )
    text = str(report)
    assert text.splitlines()[0].split() == ["name", "sigma", "sigma_exact", "rel_gap", "operator_norm"]
    assert "6.weight" in text and "Lipschitz bound" in text
