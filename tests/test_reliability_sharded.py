"""Sharded weights: tensor parallel (DTensor weights, sn_ext/sharded.py), FSDP2 (fully_shard) and a 2-D mesh (FSDP2
over tensor parallel), on two and four CPU processes (gloo, tests/spawned.py). Each run is compared with one process
running the same steps from the same seeds (float32, 5 Adam steps at lr 1e-3: relative error at most 1e-5), u and v
must be the same on every rank, a NaN on one rank's shard must leave u and v as they were on every rank, and what
the spectral norm communicates is counted: rows + cols + 1 numbers per layer and step, never a weight-sized
all-gather or reduce-scatter under tensor parallel.

Each scenario is a function of the mesh (None: one process) returning named tensors; the workers save theirs per
rank and the tests compare them with the same function run here, in one process.
"""

import os

import pytest
import spawned
import torch
import torch.nn.functional as F
from helpers import TOL, rel_err
from torch import nn

import sn_ext
from benchmarks.sharded import CollectiveCounter  # counts each collective and the numbers it moves

STEPS = 5
LR = 1e-3
# FSDP2 runs on the CPU from torch 2.7 (its CPU stream gained record_event, pytorch PR 145935); torch 2.6 fails in
# the first forward. Its tests (FSDP2, the 2-D mesh) skip there.
FSDP2_ON_CPU = hasattr(torch.cpu.Stream, "record_event")
needs_fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 runs on the CPU from torch 2.7")
RTOL = 1e-5  # float32 after 5 Adam steps: the bound
TIME_LIMIT_S = 150


# ---- the layers: tensor parallel on one weight (the parametrization alone) ----

# name -> (layer, spectral-norm dim); "rows" shards the weight on dim, "cols" on another dimension
LAYERS = {
    "linear": (lambda: nn.Linear(10, 7), 0),
    "conv": (lambda: nn.Conv2d(5, 6, 3), 0),
    "conv_transpose": (lambda: nn.ConvTranspose2d(5, 6, 3), 1),  # torch's default dim for transposed convolutions
}
# (layer, sharded tensor dimension, n_power_iterations)
LAYER_CASES_2 = [
    (layer, shard, n)
    for layer, shards in (("linear", (0, 1)), ("conv", (0, 1, 2)), ("conv_transpose", (1, 0)))
    for shard in shards
    for n in (1, 3)
]
# On 4 ranks the shards are uneven (7 rows: 2, 2, 2, 1; 10 columns: 3, 3, 3, 1) or empty (6 output channels: 2, 2,
# 2 and none; 5 input channels: 2, 2, 1 and none).
LAYER_CASES_4 = [("linear", 0, 1), ("linear", 1, 1), ("conv", 0, 1), ("conv_transpose", 0, 2)]


def _local(t):
    return t.to_local() if sn_ext.sharded.is_dtensor(t) else t


def _full(t):
    return t.full_tensor() if sn_ext.sharded.is_dtensor(t) else t


def _layer_run(mesh, layer: str, shard: int, n: int) -> dict:
    """Registration, 5 Adam steps on a loss of W_sn, then eval: u, v after registration and at the end, W, W_sn in
    train and eval mode, and W's last gradient."""
    make, dim = LAYERS[layer]
    torch.manual_seed(0)
    module = make()
    targets = torch.randn(2, *module.weight.shape, generator=torch.Generator().manual_seed(5))
    if mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor

        module.weight = nn.Parameter(distribute_tensor(module.weight.detach(), mesh, [Shard(shard)]))
        targets = torch.stack([distribute_tensor(t, mesh, [Shard(shard)]).to_local() for t in targets])
    torch.manual_seed(1)
    sn_ext.spectral_norm(module, n_power_iterations=n)
    assert module.parametrizations.weight[0].dim == dim
    norm = module.parametrizations.weight[0]
    out = {"u0": norm._u.clone(), "v0": norm._v.clone()}
    original = module.parametrizations.weight.original
    opt = torch.optim.Adam([original], lr=LR)
    for _ in range(STEPS):
        weight_sn = module.weight
        # A sum of per-element terms: each rank's share of it has the whole loss's gradient on its shard.
        loss = (_local(weight_sn) * targets[0] + _local(weight_sn).square() * targets[1]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out |= {"weight_sn": _full(weight_sn.detach()), "grad": _full(original.grad), "weight": _full(original.detach())}
    module.eval()
    out |= {"weight_sn_eval": _full(module.weight.detach()), "u": norm._u.clone(), "v": norm._v.clone()}
    return out


# The variants (docs/variants.md) on a sharded weight: name -> how to register it.
VARIANTS = {
    "bounded": lambda m: sn_ext.spectral_norm(m, coeff=0.3),
    "bounded_stop_grad": lambda m: sn_ext.spectral_norm(m, coeff=0.3, sigma_grad=False),
    "sigma_reparam": lambda m: sn_ext.sigma_reparam(m),
}


def _variants_run(mesh) -> dict:
    """Each variant on a Linear with rows, then columns sharded: W_hat and the gradients of W and gamma after 5 Adam
    steps on a loss of W_hat, and u, v (gamma's start: Lanczos on the whole weight)."""
    out = {}
    for variant, register in VARIANTS.items():
        for side, shard in (("rows", 0), ("cols", 1)):
            torch.manual_seed(0)
            layer = nn.Linear(10, 7)
            target = torch.randn(7, 10, generator=torch.Generator().manual_seed(5))
            if mesh is not None:
                from torch.distributed.tensor import Shard, distribute_tensor

                layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(shard)]))
                target = distribute_tensor(target, mesh, [Shard(shard)]).to_local()
            torch.manual_seed(1)
            register(layer)
            params = layer.parametrizations.weight
            opt = torch.optim.Adam(params.parameters(), lr=LR)
            for _ in range(STEPS):
                opt.zero_grad()
                (_local(layer.weight) * target).sum().backward()
                opt.step()
            key = f"{variant}_{side}"
            out |= {f"{key}_weight_hat": _full(layer.weight.detach()), f"{key}_grad": _full(params.original.grad)}
            out |= {f"{key}_u": params[0]._u.clone(), f"{key}_v": params[0]._v.clone()}
            if "gain" in params[0]._parameters:
                out[f"{key}_gain_grad"] = params[0].gain.grad.clone()
    return out


def _bfloat16_run(mesh) -> dict:
    """A bfloat16 Linear, rows then columns sharded: u and v after registration, W_sn and W's gradient of one
    training step, u and v after it (sums in float32, vectors rounded to bfloat16, as in one process)."""
    out = {}
    for side, shard in (("rows", 0), ("cols", 1)):
        torch.manual_seed(0)
        layer = nn.Linear(10, 7).to(torch.bfloat16)
        grad = torch.randn(7, 10, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        if mesh is not None:
            from torch.distributed.tensor import Shard, distribute_tensor

            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(shard)]))
            grad = distribute_tensor(grad, mesh, [Shard(shard)])
        torch.manual_seed(1)
        sn_ext.spectral_norm(layer)
        norm = layer.parametrizations.weight[0]
        out |= {f"{side}_u0": norm._u.clone(), f"{side}_v0": norm._v.clone()}
        weight_sn = layer.weight
        weight_sn.backward(grad)
        out |= {
            f"{side}_weight_sn": _full(weight_sn.detach()),
            f"{side}_grad": _full(layer.parametrizations.weight.original.grad),
            f"{side}_u": norm._u.clone(),
            f"{side}_v": norm._v.clone(),
        }
    return out


# ---- a tensor-parallel model: ColwiseParallel, RowwiseParallel, and a layer left whole ----


def _tp_model(mesh) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.LeakyReLU(0.2), nn.Linear(16, 6), nn.LeakyReLU(0.2), nn.Linear(6, 1))
    if mesh is not None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    torch.manual_seed(1)
    for index in (0, 2, 4):  # after parallelize_module: torch's ColwiseParallel cannot shard a parametrized Linear
        sn_ext.spectral_norm(model[index])
    return model


def _gan_step(model, opt, real, fake) -> None:
    """The discriminator's step: two calls, one backward."""
    loss = F.softplus(-model(real)).mean() + F.softplus(model(fake)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _batches(dp_rank: int | None, dp_size: int, features: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, fake) for a data-parallel rank: each its own; one process (dp_rank None) takes them all."""
    batches = [torch.randn(2, 4, *features, generator=torch.Generator().manual_seed(100 + r)) for r in range(dp_size)]
    if dp_rank is not None:
        return batches[dp_rank][0], batches[dp_rank][1]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _full_state(model) -> dict:
    if any(sn_ext.sharded.is_dtensor(t) for t in model.state_dict().values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def _tp_run(mesh, out_dir: str | None = None) -> dict:
    """5 steps, every rank the same data; the full state dict; in a worker, a checkpoint round trip (as _fsdp_run)."""
    model = _tp_model(mesh)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    real, fake = _batches(None, 1, (10,))
    for _ in range(STEPS):
        _gan_step(model, opt, real, fake)
    if out_dir is not None:
        _checkpoint_round_trip(model, lambda: _tp_model(mesh), os.path.join(out_dir, "tp_checkpoint"))
    return _full_state(model)


# ---- FSDP2: spectral norm applied before fully_shard ----


def _fsdp_model(mesh) -> nn.Module:
    """test_reliability_ddp's discriminator: Conv2d, ConvTranspose2d (dim=1), Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        sn_ext.spectral_norm(nn.Conv2d(3, 6, 3)),
        nn.LeakyReLU(0.2),
        sn_ext.spectral_norm(nn.ConvTranspose2d(6, 4, 2, stride=2)),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        sn_ext.spectral_norm(nn.Linear(4 * 8 * 8, 1)),
    )
    if mesh is not None:
        fully_shard = _fully_shard()
        for index in (0, 2, 5):
            fully_shard(model[index], mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch before 2.6 had it here
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _fsdp_run(mesh, out_dir: str | None = None) -> dict:
    """5 steps, each rank its own data; the full state dict; and, in a worker, a torch.distributed.checkpoint save
    of the sharded state dict under out_dir, loaded back into a model built from another seed."""
    model = _fsdp_model(mesh)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    dp_rank = None if mesh is None else mesh.get_local_rank()
    real, fake = _batches(dp_rank, 2, (3, 6, 6))
    for _ in range(STEPS):
        _gan_step(model, opt, real, fake)
    out = _full_state(model)
    if out_dir is not None:
        _checkpoint_round_trip(model, lambda: _fsdp_model(mesh), os.path.join(out_dir, "fsdp_checkpoint"))
    return out


def _checkpoint_round_trip(model, build, checkpoint_dir: str) -> None:
    """Saves model's sharded state dict with torch.distributed.checkpoint, loads it into build() (a new model: its
    initial weights, u and v) and checks that every tensor came back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint_dir)
    other = build()
    state = get_model_state_dict(other)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(other, state)
    saved, loaded = _full_state(model), _full_state(other)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), f"{key} did not come back from the checkpoint"


# ---- the 2-D mesh: FSDP2 over tensor parallel ----


def _mesh_2d_run(mesh) -> dict:
    """mesh: ("dp", "tp"), or None. Tensor parallel on "tp", spectral norm, then fully_shard on "dp"."""
    model = _tp_model(None if mesh is None else mesh["tp"])
    if mesh is not None:
        fully_shard = _fully_shard()
        for index in (0, 2, 4):
            fully_shard(model[index], mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    real, fake = _batches(None if mesh is None else mesh["dp"].get_local_rank(), 2, (10,))
    for _ in range(STEPS):
        _gan_step(model, opt, real, fake)
    return _full_state(model)


# ---- communication ----


def _communication_run(mesh) -> dict:
    """What a Linear(12, 8) (even shards) sends, rows then columns sharded: one training forward, its backward, one
    eval forward; a control (W.full_tensor(), which gathers W) that the counter must see; and a tensor-parallel
    model's whole training step."""
    from torch.distributed.tensor import Shard, distribute_tensor

    calls = {}
    for side, shard in (("rows", 0), ("cols", 1)):
        torch.manual_seed(0)
        layer = nn.Linear(12, 8)
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(shard)]))
        sn_ext.spectral_norm(layer)
        grad = distribute_tensor(torch.randn(8, 12), mesh, [Shard(shard)])
        with CollectiveCounter() as forward:
            weight_sn = layer.weight
        with CollectiveCounter() as backward:
            weight_sn.backward(grad)
        layer.eval()
        with CollectiveCounter() as evaluation:
            layer.weight
        with CollectiveCounter() as control:
            layer.parametrizations.weight.original.full_tensor()
        calls |= {
            f"{side}_forward": forward.calls,
            f"{side}_backward": backward.calls,
            f"{side}_eval": evaluation.calls,
            f"{side}_control": control.calls,
        }
    model = _tp_model(mesh)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    real, fake = _batches(None, 1, (10,))
    with CollectiveCounter() as step:
        _gan_step(model, opt, real, fake)
    calls["model_step"] = step.calls
    return calls


# ---- NaN ----


def _nan_run(mesh) -> dict:
    """A NaN in rank 1's shard of a Linear's weight, rows or columns sharded: u and v before and after a training
    forward, on every rank, and whether W_sn is NaN."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    for side, shard in (("rows", 0), ("cols", 1)):
        torch.manual_seed(0)
        layer = nn.Linear(10, 7)
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(shard)]))
        sn_ext.spectral_norm(layer)
        norm = layer.parametrizations.weight[0]
        before = (norm._u.clone(), norm._v.clone())
        if mesh.get_local_rank() == 1:
            with torch.no_grad():
                layer.parametrizations.weight.original.to_local()[0, 0] = float("nan")
        weight_sn = layer.weight
        out |= {
            f"{side}_u_before": before[0],
            f"{side}_v_before": before[1],
            f"{side}_u_after": norm._u.clone(),
            f"{side}_v_after": norm._v.clone(),
            f"{side}_output_nan": torch.isnan(weight_sn.to_local()).all().reshape(1),
        }
    return out


# ---- spectral norm applied after fully_shard ----


def _after_fully_shard_run(mesh) -> dict:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    _fully_shard()(model, mesh=mesh)
    try:
        sn_ext.spectral_norm(model[0])
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": ""}


# ---- what it refuses ----


def _refused_run(mesh) -> dict:
    """Registration on weights it cannot take: the error's type and message, whether the layer was changed and
    whether the global RNG was left as it was. mesh: 1-D (a Partial weight, a complex one, the legacy spectral norm
    on a sharded weight) or 2-D (a weight sharded on both dimensions)."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
    from torch.nn.utils import parametrize

    if mesh.ndim == 1:
        cases = {
            "partial": (DTensor.from_local(torch.randn(7, 10), mesh, [Partial()]), sn_ext.spectral_norm),
            "complex": (
                distribute_tensor(torch.randn(7, 10, dtype=torch.complex64), mesh, [Shard(0)]),
                sn_ext.spectral_norm,
            ),
            "legacy": (distribute_tensor(torch.randn(8, 10), mesh, [Shard(0)]), sn_ext.legacy.spectral_norm),
        }
    else:
        cases = {
            "two_sharded_dims": (
                distribute_tensor(torch.randn(8, 10), mesh, [Shard(0), Shard(1)]),
                sn_ext.spectral_norm,
            )
        }
    out = {}
    for name, (weight, register) in cases.items():
        layer = nn.Linear(10, 8)
        layer.weight = nn.Parameter(weight)
        rng = torch.get_rng_state()
        raised = ("", "")
        try:
            register(layer)
        except Exception as error:  # noqa: BLE001 (the test checks the type)
            raised = (type(error).__name__, str(error))
        changed = (
            parametrize.is_parametrized(layer)
            or bool(layer._forward_pre_hooks)
            or "weight_orig" in dict(layer.named_parameters())
        )
        out[name] = (*raised, changed, torch.equal(rng, torch.get_rng_state()))
    return out


# ---- the workers ----


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with spawned.worker_process(rank, world, port, out_dir):
        from torch.distributed.device_mesh import init_device_mesh

        results = {}
        if world == 2:
            mesh = init_device_mesh("cpu", (world,))
            for case in LAYER_CASES_2:
                results[("layer", *case)] = _layer_run(mesh, *case)
            results["tp"] = _tp_run(mesh, out_dir)
            results["bfloat16"] = _bfloat16_run(mesh)
            results["variants"] = _variants_run(mesh)
            if FSDP2_ON_CPU:
                results["fsdp"] = _fsdp_run(mesh, out_dir)
            results["communication"] = _communication_run(mesh)
            results["nan"] = _nan_run(mesh)
            results["after_fully_shard"] = _after_fully_shard_run(mesh)
            results["refused"] = _refused_run(mesh)
        else:
            mesh = init_device_mesh("cpu", (world,))
            for case in LAYER_CASES_4:
                results[("layer", *case)] = _layer_run(mesh, *case)
            results["nan"] = _nan_run(mesh)
            results["refused"] = _refused_run(init_device_mesh("cpu", (2, world // 2)))
            if FSDP2_ON_CPU:
                mesh_2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
                results["2d"] = _mesh_2d_run(mesh_2d)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(out_dir: str, world: int) -> list[dict]:
    spawned.run(_worker, (), world, out_dir, TIME_LIMIT_S)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs_2(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sharded2"))
    return out_dir, _run(out_dir, 2)


@pytest.fixture(scope="module")
def runs_4(tmp_path_factory):
    return _run(str(tmp_path_factory.mktemp("sharded4")), 4)


def _assert_same_on_every_rank(ranks: list[dict], key) -> None:
    """Every tensor of result `key` is the same, bit for bit, on every rank."""
    for rank, result in enumerate(ranks[1:], 1):
        for name, tensor in ranks[0][key].items():
            assert torch.equal(result[key][name], tensor), f"{key} {name} differs between rank 0 and rank {rank}"


def _assert_close(ours: dict, reference: dict, what: str) -> None:
    assert list(ours) == list(reference), f"{what}: keys {list(ours)} != {list(reference)}"
    for key in reference:
        assert rel_err(ours[key], reference[key]) <= RTOL, (
            f"{what} {key}: relative error {rel_err(ours[key], reference[key]):.2e} against one process"
        )


# ---- tensor parallel ----


@pytest.mark.parametrize("case", LAYER_CASES_2, ids=lambda c: f"{c[0]}-shard{c[1]}-n{c[2]}")
def test_tensor_parallel_layer_matches_one_process(runs_2, case):
    _, ranks = runs_2
    ours = ranks[0][("layer", *case)]
    _assert_close(ours, _layer_run(None, *case), f"{case}")
    _assert_same_on_every_rank(ranks, ("layer", *case))


@pytest.mark.parametrize("case", LAYER_CASES_4, ids=lambda c: f"{c[0]}-shard{c[1]}-n{c[2]}")
def test_tensor_parallel_uneven_shards_on_4_ranks(runs_4, case):
    _assert_close(runs_4[0][("layer", *case)], _layer_run(None, *case), f"{case}")
    _assert_same_on_every_rank(runs_4, ("layer", *case))


def test_tensor_parallel_bfloat16_matches_one_process(runs_2):
    """Within bfloat16's tolerance (tests/helpers.py TOL): its vectors are rounded to bfloat16 after each round."""
    _, ranks = runs_2
    ours, reference = ranks[0]["bfloat16"], _bfloat16_run(None)
    for key in reference:
        assert ours[key].dtype == torch.bfloat16, key
        assert rel_err(ours[key], reference[key]) <= TOL[torch.bfloat16], (key, rel_err(ours[key], reference[key]))
    _assert_same_on_every_rank(ranks, "bfloat16")


def test_tensor_parallel_variants_match_one_process(runs_2):
    """Bounded (with and without the gradient through sigma) and sigma-reparam on sharded weights: one process's
    numbers, gamma's gradient the same on every rank."""
    _, ranks = runs_2
    _assert_close(ranks[0]["variants"], _variants_run(None), "variants")
    _assert_same_on_every_rank(ranks, "variants")


def test_tensor_parallel_model_matches_one_process(runs_2):
    """Colwise, Rowwise and a whole layer, called twice before one backward; u, v and the full state dict as one
    process's (torch's keys; the first test compares u and v after registration too)."""
    _, ranks = runs_2
    _assert_close(ranks[0]["tp"], _tp_run(None), "tensor parallel model")
    _assert_same_on_every_rank(ranks, "tp")


# ---- what is communicated ----


def _numbers(calls, kinds=None) -> int:
    return sum(n for name, n in calls if kinds is None or any(k in name for k in kinds))


def test_communication_per_layer_and_step(runs_2):
    """Linear(12, 8) on 2 ranks, one power iteration: a training forward sends rows + cols numbers (8 gathered,
    12 all-reduced), its backward one; eval one. At most 2 (rows + cols) + 4 per step, as the issue bounds it."""
    _, ranks = runs_2
    rows, cols = 8, 12
    for rank in ranks:
        calls = rank["communication"]
        for side in ("rows", "cols"):
            forward, backward = calls[f"{side}_forward"], calls[f"{side}_backward"]
            assert _numbers(forward) == rows + cols, forward
            assert sorted(name for name, _ in forward) == ["_allgather_base_", "allreduce_"], forward
            assert backward == [("allreduce_", 1)], backward
            assert _numbers(forward) + _numbers(backward) <= 2 * (rows + cols) + 4
            assert calls[f"{side}_eval"] == [("allreduce_", 1)], calls[f"{side}_eval"]
            # The counter sees a gather of W: the checks above could fail.
            assert _numbers(calls[f"{side}_control"], ("all_gather", "allgather")) == rows * cols


def test_no_weight_sized_gather_under_tensor_parallel(runs_2):
    """A tensor-parallel model's whole step (two forwards, backward, Adam): no all-gather or reduce-scatter of a
    weight-sized tensor (the smallest sharded weight has 16 x 6 = 96 elements); what is all-gathered is a vector."""
    _, ranks = runs_2
    for rank in ranks:
        step = rank["communication"]["model_step"]
        assert step, "the counter saw no collective in a tensor-parallel step"
        for name, numel in step:
            assert "scatter" not in name, step
            if "gather" in name:
                assert numel <= 16, step


# ---- NaN on one rank ----


@pytest.mark.parametrize("world", [2, 4])
def test_nan_on_one_rank_keeps_u_and_v_on_every_rank(runs_2, runs_4, world):
    """A NaN in rank 1's shard: sigma is NaN on every rank (the collectives carry it), so W_sn is NaN everywhere, as
    in one process, and u and v stay as they were on every rank."""
    ranks = runs_2[1] if world == 2 else runs_4
    for rank, result in enumerate(ranks):
        nan = result["nan"]
        for side in ("rows", "cols"):
            for vector in ("u", "v"):
                before, after = nan[f"{side}_{vector}_before"], nan[f"{side}_{vector}_after"]
                assert torch.equal(before, after), f"{side}: {vector} changed on rank {rank}"
            assert nan[f"{side}_output_nan"].item(), f"{side}: W_sn is not NaN on rank {rank}"
    _assert_same_on_every_rank(ranks, "nan")


# ---- what it refuses ----


@pytest.mark.parametrize("world", [2, 4])
def test_unsupported_placements_and_dtypes_raise_and_change_nothing(runs_2, runs_4, world):
    ranks = runs_2[1] if world == 2 else runs_4
    expected = (
        {
            "partial": ("NotImplementedError", "Partial"),
            "complex": ("TypeError", "complex64"),
            "legacy": ("NotImplementedError", "use sn_ext.spectral_norm (the parametrization)"),
        }
        if world == 2
        else {"two_sharded_dims": ("NotImplementedError", "Shard(dim=1)")}
    )
    for result in ranks:
        for name, (error_type, named) in expected.items():
            raised, message, parametrized, rng_unchanged = result["refused"][name]
            assert raised == error_type, (name, raised, message)
            assert named in message and "spectral_norm" in message, (name, message)
            assert not parametrized, f"{name}: the layer was changed"
            assert rng_unchanged, f"{name}: the global RNG was drawn from"


# ---- FSDP2 ----


@needs_fsdp2_on_cpu
def test_fsdp_spectral_norm_before_fully_shard_matches_one_process(runs_2):
    """Each rank its own data, two calls before one backward: the full state dict (torch's keys and layout: u and v
    whole) equals one process's on the whole batch, and every rank holds the same."""
    _, ranks = runs_2
    ours = ranks[0]["fsdp"]
    reference = _fsdp_run(None)
    _assert_close(ours, reference, "FSDP2")
    assert list(ours) == list(_fsdp_model(None).state_dict())
    _assert_same_on_every_rank(ranks, "fsdp")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # what this test does
@pytest.mark.parametrize("kind", ["tp", pytest.param("fsdp", marks=needs_fsdp2_on_cpu)])
def test_checkpoint_loads_in_one_process(runs_2, kind):
    """The workers' torch.distributed.checkpoint (their round trip checked there) loads into a model of one
    process, u and v included: a tensor-parallel or FSDP2 checkpoint is one process's."""
    import torch.distributed.checkpoint as dcp

    out_dir, ranks = runs_2
    model = _tp_model(None) if kind == "tp" else _fsdp_model(None)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(out_dir, f"{kind}_checkpoint"))
    model.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ranks[0][kind][key]), key


def test_spectral_norm_after_fully_shard_raises_naming_it(runs_2):
    _, ranks = runs_2
    for rank in ranks:
        assert "fully_shard" in rank["after_fully_shard"]["error"]
        assert "before fully_shard" in rank["after_fully_shard"]["error"]


# ---- 2-D ----


@needs_fsdp2_on_cpu
def test_2d_mesh_fsdp_over_tensor_parallel_matches_one_process(runs_4):
    _assert_close(runs_4[0]["2d"], _mesh_2d_run(None), "2-D mesh")
    _assert_same_on_every_rank(runs_4, "2d")
