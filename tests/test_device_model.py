"""The device-time model (benchmarks/device_model.py, cuda_plan.py, triton_model.py, model_tables.py): its structure
follows the kernels' plans (phases, chains, passes, launches) and its arithmetic is what its docstrings say. No
timing: the model's numbers are not checked against a GPU here, nor pinned to today's kernels."""

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import cuda_plan, model_tables  # noqa: E402
from benchmarks import device_model as dm  # noqa: E402

H100 = dm.GPUS["h100"]


def _triton():
    """The Triton model reads the Triton ops' plans: needs triton (not a GPU)."""
    pytest.importorskip("triton")
    from benchmarks import triton_model
    from sn_ext import triton as sn_triton

    loaded, reason = sn_triton.load()
    if not loaded:
        pytest.skip(reason)
    return triton_model


def _step(shape, itemsize=4, **kwargs):
    return cuda_plan.train_step([cuda_plan.Weight.of(shape, itemsize)], H100, **kwargs)


def _separators(op: dm.Op, end: int) -> float:
    lat = {t: dm.LATENCY_US[t][end] for t in dm.TERMS}
    return op.launches * lat["launch"] + op.grid_barriers * lat["grid_barrier"] + op.syncs * lat["sync"]


def test_gpu_names_map_to_the_device_models():
    assert dm.gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert dm.gpu_key("NVIDIA H200") == "h200"
    for other in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe"):
        with pytest.raises(ValueError, match=f"no device model for '{other}'"):
            dm.gpu_key(other)


def test_walk_adds_each_blocks_virtual_blocks():
    chains = np.array([dm.terms(l2=k) for k in (1, 2, 3, 4, 5)])
    walked = dm.walk(chains, 2)  # block 0 takes 0, 2, 4; block 1 takes 1, 3
    assert walked[:, dm.TERMS.index("l2")].tolist() == [9.0, 6.0]
    assert dm.walk(chains, 1)[0, dm.TERMS.index("l2")] == 15.0


def test_floor_and_plain_are_passes_at_the_copy_bandwidth_plus_launches():
    shape = (4096, 4096)
    w = 4096 * 4096 * 4
    for gpu in dm.GPUS.values():
        stream = 7 * w / gpu.copy_bytes_per_us
        assert dm.copies_us(shape, "float32", gpu) == pytest.approx(stream)  # 3.5 copies
        assert dm.floor_us(shape, "float32", gpu) == pytest.approx((stream + 2 * 2.0, stream + 2 * 4.0))
        plain = 4 * w / gpu.copy_bytes_per_us
        assert dm.plain_us(shape, "float32", gpu) == pytest.approx((plain + 4.0, plain + 8.0))
    assert dm.floor_us(shape, "bfloat16", "h100")[0] < dm.floor_us(shape, "float32", "h100")[0]


@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (1, 8192), (512, 512, 3, 3), (4096, 4096), (16384, 128)])
def test_an_op_is_its_phases_plus_what_separates_them(shape):
    for op in _step(shape) + _step(shape, round_mode="split", v_first=True):
        for end in dm.ENDS:
            phases = sum(max(p.bandwidth_us(H100), p.chain_us(end)) for p in op.phases)
            assert op.time_us(H100)[end] == pytest.approx(phases + _separators(op, end))
        low, high = op.time_us(H100)
        assert 0 < low <= high


def test_a_one_block_layers_chain_is_the_sum_of_its_phases():
    forward, backward = _step((64, 3, 3, 3))
    for op in (forward, backward):
        assert op.launch == "one block" and op.grid == 1 and op.launches == 1 and op.grid_barriers == 0
        assert op.syncs == len(op.phases) - 1  # __syncthreads between phases
        for p in op.phases:
            assert p.chains.shape == (1, len(dm.TERMS))  # one block walks every virtual block
            assert p.bandwidth_us(H100) < p.chain_us(0)  # latency-bound
        chain = sum(p.chains[0] for p in op.phases) + op.overhead()
        for end in dm.ENDS:
            assert op.time_us(H100)[end] == pytest.approx(float(chain @ dm.latencies(end)))
    # A dense layer: its pass, then its finish (u, v, sigma, W / sigma); the backward's two passes in one phase.
    assert len(forward.phases) == 2 and len(backward.phases) == 1
    # Its fused pass: 27 columns, 8 threads a row, 32 rows a step, two steps' loads in flight at once: x's share and
    # one round trip of rows for all 64, no block sum per row (shuffles), one for |z|^2.
    fused = forward.phases[0].chains[0]
    assert fused[dm.TERMS.index("block_sum")] == 1 and fused[dm.TERMS.index(dm.ONE_BLOCK_FIRST_READ)] == 2


def test_more_rounds_cost_more():
    for shape in [(64, 3, 3, 3), (512, 512, 3, 3), (4096, 4096)]:
        for mode in cuda_plan.ROUND_MODES:
            times = [dm.step_us(_step(shape, n=n, round_mode=mode), H100) for n in (1, 2, 3)]
            assert times[0][0] < times[1][0] < times[2][0] and times[0][1] < times[1][1] < times[2][1]
            phases = [len(_step(shape, n=n, round_mode=mode)[0].phases) for n in (0, 1, 2)]
            if mode != "fused":  # split_steps: 4 per round, then W / sigma; n = 0: W v, sigma, W / sigma
                assert phases == [3, 5, 9]
            elif shape == (64, 3, 3, 3):  # dense: a pass per round, then the finish; n = 0: the pass, the finish
                assert phases == [2, 2, 3]
            else:  # spread: a pass and its column sums per round, then the finish
                assert phases == [2, 3, 5]


def test_v_first_costs_what_its_phases_say():
    """v-first in the fused mode: W^T u alone (the pass's z-only kind) | z summed | W v alone | the finish: one pass
    more than u-first, no normalization in one block; in the split modes the split round, whose normalize V is one
    block per layer (per 256 of the columns, the splits' partial sums 4 at a time)."""
    w = cuda_plan.Weight.of((4096, 4096), 4)
    fused = cuda_plan.forward([w], H100, 1, "fused", v_first=True)
    assert [p.name for p in fused.phases] == ["W^T u", "z summed", "W v", "u, v, sigma, W / sigma"]
    assert fused.grid_barriers == 3 and fused.launches == 1
    u_first = cuda_plan.forward([w], H100, 1, "fused")
    assert [p.name for p in u_first.phases] == ["W v, W^T y (one pass)", "z summed", "u, v, sigma, W / sigma"]
    assert fused.weight_passes == u_first.weight_passes + 1
    split = cuda_plan.forward([w], H100, 1, "split", v_first=True)
    assert [p.name for p in split.phases] == ["W^T u", "v = N(W^T u)", "W v", "u = N(W v)", "W / sigma"]
    assert split.grid_barriers == 4 and split.launches == 1
    splits = cuda_plan.plan_rmatvec(w, w.pack).splits
    normalize_v = split.phases[1]
    busy = normalize_v.chains[normalize_v.chains.sum(axis=1) > 0]
    assert len(busy) == 1  # one block
    groups = math.ceil(4096 / cuda_plan.THREADS)
    assert busy[0][dm.TERMS.index("l2")] == groups * math.ceil(splits / 4) + groups


def test_bytes_are_the_passes_over_the_weight_plus_small_workspaces():
    for shape, passes in [((4096, 4096), 7), ((512, 512, 3, 3), 8), ((64, 3, 3, 3), 7), ((1024, 1024), 7)]:
        ops = _step(shape)
        w = math.prod(shape) * 4
        assert sum(op.weight_passes for op in ops) == passes
        weight_bytes = sum(p.weight_passes for op in ops for p in op.phases) * w
        total = sum(op.bytes for op in ops)
        assert weight_bytes <= total <= 1.25 * weight_bytes
        assert sum(op.weight_passes for op in _step(shape, round_mode="split")) == 8
    # Each phase's passes: the fused pass reads W once (twice for rows wider than a segment), the finish's W / sigma
    # reads and writes it, the backward's two phases two each (G and W_sn; G and grad_W), the column sums none.
    forward, backward = _step((4096, 4096))
    assert [p.weight_passes for p in forward.phases] == [1, 0, 2]
    assert [p.weight_passes for p in backward.phases] == [2, 2]


def test_launch_modes():
    coop = _step((512, 512, 3, 3))
    phased = _step((512, 512, 3, 3), launch="phased")
    for c, p in zip(coop, phased):
        assert c.launch == "cooperative" and p.launch == "phased"
        assert p.launches == len(p.phases) and p.grid_barriers == 0 and c.grid_barriers == len(c.phases) - 1
    one_block = _step((64, 3, 3, 3), launch="phased")  # the size class decides first
    assert [op.launch for op in one_block] == ["one block", "one block"]
    with pytest.raises(ValueError, match="launch mode"):
        _step((512, 512, 3, 3), launch="graph")
    with pytest.raises(ValueError, match="round mode"):
        _step((512, 512, 3, 3), round_mode="fast")


def test_grouped_launches_take_twelve_layers_each():
    weights = [cuda_plan.Weight.of((128, 128, 3, 3), 4)] * 13
    assert [op.launches for op in cuda_plan.train_step(weights[:12], H100)] == [1, 1]
    ops = cuda_plan.train_step(weights, H100)
    assert [op.op for op in ops] == ["spectral_normalize_"] * 2 + ["spectral_normalize_backward"] * 2
    # A layer's virtual blocks spread over the group's grid: the group of 12 is cheaper than 12 layers alone.
    alone = dm.step_us(cuda_plan.train_step(weights[:1], H100), H100)
    grouped = dm.step_us(cuda_plan.train_step(weights[:12], H100), H100)
    assert grouped[1] < 12 * alone[1]


def test_weights_view_for_dim_as_the_kernels():
    w = cuda_plan.Weight.of((512, 256, 4, 4), 4, dim=1)  # ConvTranspose2d: rows are strided, not packed
    assert (w.outer, w.rows, w.inner, w.cols) == (512, 256, 16, 8192)
    assert not w.rows_packable and w.lines_packable
    assert w.fused_packable  # the fused pass reads its 16-column lines in 16-byte packs
    assert cuda_plan.Weight.of((64, 3, 3, 3), 4).rows_packable is False  # 27 columns: not whole packs
    assert cuda_plan.Weight.of((1, 8192), 2).rows_packable


def test_modelled_step_us_for_a_gpu_check():
    for backend in ("cuda",) + (("triton",) if _has_triton() else ()):
        for gpu in dm.GPUS:
            low, high = dm.modelled_step_us(backend, (512, 512, 3, 3), "float32", gpu)
            assert 0 < low <= high
    low, high = dm.modelled_step_us(
        "cuda", (512, 512, 3, 3), "torch.bfloat16", "h100", round_mode="split", v_first=True
    )
    assert 0 < low <= high
    with pytest.raises(ValueError, match="backend"):
        dm.modelled_step_us("mps", (4, 4), "float32", "h100")


def _has_triton() -> bool:
    try:
        _triton()
    except pytest.skip.Exception:
        return False
    return True


def test_triton_model_follows_the_ops_plans():
    triton_model = _triton()
    for shape, path, launches in [
        ((64, 3, 3, 3), "one program", 2),
        ((512, 512, 3, 3), "gram", 3 + 2),
        ((1, 18432), "grid", 5 + 2),  # one row: the split passes spread its columns (sn_ext/triton/_host.py)
    ]:
        ops = triton_model.train_step(shape, "float32", H100)
        assert triton_model.path(triton_model.plans(shape, "float32", 1, False)[0]) == path
        assert sum(op.launches for op in ops) == launches
    ops = triton_model.train_step((4096, 4096), "float32", H100)
    assert [p.name for p in ops[0].phases] == ["gram_kernel", "gram_reduce_kernel", "divide_kernel"]
    # gram reads W once from DRAM: the blocks its 256 programs re-read (32 MB) fit in L2
    assert [p.weight_passes for op in ops for p in op.phases] == [1, 0, 2, 2, 2]
    # n = 2: an earlier round's v half-step is normalize_kernel's
    two_rounds = triton_model.train_step((4096, 4096), "float32", H100, n=2)[0]
    assert [p.name for p in two_rounds.phases][:4] == [
        "gram_kernel",
        "gram_reduce_kernel",
        "normalize_kernel (v)",
        "gram_kernel",
    ]
    # v-first rounds keep the split passes: 4n + 1 launches.
    assert len(triton_model.train_step((4096, 4096), "float32", H100, v_first=True)[0].phases) == 5
    for op in ops:
        for end in dm.ENDS:
            phases = sum(max(p.bandwidth_us(H100), p.chain_us(end)) for p in op.phases)
            assert op.time_us(H100)[end] == pytest.approx(phases + _separators(op, end))
    two = dm.step_us(triton_model.train_step((512, 512, 3, 3), "float32", H100, n=2), H100)
    one = dm.step_us(triton_model.train_step((512, 512, 3, 3), "float32", H100, n=1), H100)
    assert one[0] < two[0] and one[1] < two[1]


def test_model_tables_cover_sngan_and_write_the_files(tmp_path):
    weights = model_tables.sngan_weights()
    shapes = {shape for shape, _ in weights}
    assert {(1, 8192), (64, 3, 3, 3), (64, 64, 4, 4), (16384, 128), (512, 512, 3, 3), (1024, 1024)} <= shapes
    assert ((256, 128, 4, 4), 1) in weights  # a ConvTranspose2d weight, torch's dim 1
    assert (
        len(model_tables.discriminator_weights("cnn")) == 8 and len(model_tables.discriminator_weights("resnet")) == 11
    )
    triton = _has_triton()
    written = model_tables.write(tmp_path, label="test label", triton=triton)
    names = ["cuda_model.md", "cuda_model.csv"] + (["triton_model.md", "triton_model.csv"] if triton else [])
    assert [p.name for p in written] == names
    cuda_md = (tmp_path / "cuda_model.md").read_text()
    assert "test label" in cuda_md and "## The issue's table (#29), from the model" in cuda_md
    with open(tmp_path / "cuda_model.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    layer_rows = [r for r in rows if r["weight"]]
    assert len(layer_rows) == len(weights) * 2 * 2 * 3  # GPUs x dtypes x (fused, split, v-first fused)
    assert {"sn_ext_us", "plain_us", "floor_us", "x_floor", "x_plain", "launches", "dominant"} <= set(rows[0])
    grouped = [r for r in rows if r.get("grouped_launches")]
    assert grouped and all(r["grouped_launches"] == "2" for r in grouped)
