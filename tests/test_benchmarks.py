"""The benchmark suite as a smoke test: `python -m benchmarks --quick` runs every section and writes the report,
the CSVs and the plots with the expected rows and columns. Timings are not checked.

Once per CI run is enough: skipped on the pure-PyTorch fallback run (SN_EXT_DISABLE_EXT=1)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sn_ext  # noqa: E402
from benchmarks import (  # noqa: E402
    bandwidth,
    gan_step,
    host_overhead,
    layer,
    ops,
    records,
    spectral_normalize_grouped,
    variants,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("SN_EXT_DISABLE_EXT") == "1", reason="runs once per CI run, with the compiled kernels"
)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_file_is_written(quick_run):
    out, stdout = quick_run
    for name in (
        "report.md",
        "layer.csv",
        "host.csv",
        "layers.csv",
        "ops.csv",
        "gan.csv",
        "variants.csv",
        "layer.json",
        "layers.json",
        "ops.json",
        "gan.json",
        "layer.png",
        "layers.png",
        "ops.png",
        "gan.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for name in ("layer.png", "layers.png", "ops.png", "gan.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report:" in stdout and "## layer" in stdout  # progress is shown


def test_layer_rows(quick_run):
    out, _ = quick_run
    rows = _rows(out / "layer.csv")
    assert list(rows[0]) == layer.COLUMNS + records.META_COLUMNS
    settings = json.loads((out / "layer.json").read_text())
    expected = {
        (s, d, m, p)
        for s in layer.QUICK_SHAPES
        for d in ("float32", "bfloat16")
        for m in layer.MODES
        for p in layer.PROVIDERS
    }
    assert {(r["shape"], r["dtype"], r["mode"], r["provider"]) for r in rows} == expected
    assert settings["quick"] and not settings["compile"]
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"plain", "torch", "torch legacy", "sn_ext cpu", "sn_ext reference"} <= ok
    for r in rows:
        if r["status"] == "ok":
            assert 0 < float(r["p20_us"]) <= float(r["median_us"]) <= float(r["p80_us"])
            assert r["device"] and r["torch"] and r["commit"] and r["date"] and r["threads"] == "1"
        else:  # skipped, saying why
            assert r["status"] == "skipped" and r["note"] and not r["median_us"]


def test_host_rows(quick_run):
    """The host-overhead table: every call and path of the Triton backend, each timed side by side with plain
    (launches stubbed, not run) wherever triton imports, else skipped saying why."""
    out, _ = quick_run
    rows = _rows(out / "host.csv")
    assert list(rows[0]) == host_overhead.COLUMNS + records.META_COLUMNS
    cases = {(r["path"], r["call"]) for r in rows}
    assert cases == {(p, call) for p in host_overhead.PATHS for call in host_overhead.CALLS}
    for r in rows:
        if r["status"] == "ok":
            assert float(r["median_us"]) > 0 and float(r["plain_us"]) > 0 and float(r["ratio_spread"]) >= 0
            assert abs(float(r["vs_plain"]) - float(r["median_us"]) / float(r["plain_us"])) < 0.01
        else:
            assert r["status"] == "skipped" and r["note"]
    assert "## One layer: host overhead of the Triton backend" in (out / "report.md").read_text()


def test_layers_rows(quick_run):
    out, _ = quick_run
    rows = _rows(out / "layers.csv")
    assert list(rows[0]) == spectral_normalize_grouped.COLUMNS + records.META_COLUMNS
    assert {(int(r["layers"]), r["provider"]) for r in rows} == {
        (n, p) for n in spectral_normalize_grouped.QUICK_LAYER_COUNTS for p in spectral_normalize_grouped.PROVIDERS
    }
    assert all(r["status"] == "ok" and int(r["ops"]) > 0 and float(r["median_us"]) > 0 for r in rows)
    ops = {(int(r["layers"]), r["provider"]): int(r["ops"]) for r in rows}
    assert ops[(16, "torch")] > ops[(16, "sn_ext")]  # torch's many small ops per layer


def test_ops_rows(quick_run):
    out, _ = quick_run
    rows = _rows(out / "ops.csv")
    assert list(rows[0]) == ops.COLUMNS + records.META_COLUMNS
    assert {(r["op"], r["shape"], r["dtype"], r["provider"]) for r in rows} == {
        (o, s, d, p)
        for o in ops.OPS
        for s in ops.QUICK_SHAPES
        for d in ("float32", "bfloat16")
        for p in ops.providers(o)
    }
    ok = {(r["op"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert {(o, p) for o in ops.OPS for p in ("floor", "sn_ext cpu", "sn_ext reference")} <= ok
    for r in rows:
        if r["status"] == "ok":
            assert float(r["median_us"]) > 0 and float(r["of_floor"]) > 0
        else:
            assert r["status"] == "skipped" and r["note"]


@pytest.mark.parametrize("op_name", list(ops.OPS))
def test_ops_call_what_they_say(op_name):
    """Each provider's step computes its op: every backend's result equals the float64 reference's (floor aside)."""
    weight = torch.randn(12, 5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad = torch.randn(12, 5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = {}
    for provider in ops.providers(op_name)[1:]:
        if not ops._skip_reason(provider, weight.device, weight.dtype):
            (step,) = ops.steps(op_name, provider, [weight], [grad])
            out = step.run()
            results[provider] = out[0] if isinstance(out, tuple) else out
    assert {"sn_ext cpu", "sn_ext reference"} <= set(results)
    for provider, value in results.items():
        torch.testing.assert_close(value, results["sn_ext reference"], rtol=1e-12, atol=1e-12, msg=provider)
    assert results["sn_ext reference"].abs().sum() > 0


def test_gan_rows(quick_run):
    out, _ = quick_run
    rows = _rows(out / "gan.csv")
    assert list(rows[0]) == gan_step.COLUMNS + records.META_COLUMNS
    assert {(r["arch"], r["sn"], r["mode"], r["step"]) for r in rows} == {
        (a, s, "eager", step)
        for a in gan_step.ARCHS
        for s in ("none", "torch", "sn_ext", "sn_ext_grouped", "torch_converted")
        for step in gan_step.STEPS
    }
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)


def test_bandwidth_rows(quick_run):
    out, _ = quick_run
    rows = _rows(out / "bandwidth.csv")
    assert list(rows[0]) == bandwidth.COLUMNS + records.META_COLUMNS
    assert [r["provider"] for r in rows] == bandwidth.PROVIDERS
    assert all(r["status"] == "ok" and float(r["effective_gbps"]) > 0 for r in rows)
    assert float(rows[0]["of_copy"]) == 1.0  # the copy is the yardstick


def test_variants_rows(quick_run):
    """Every variant and its hand-written PyTorch equivalent, side by side, on each quick shape; sn_ext's compiled
    backends that cannot run here are skipped, saying why."""
    out, _ = quick_run
    rows = _rows(out / "variants.csv")
    assert list(rows[0]) == variants.COLUMNS + records.META_COLUMNS
    ran = {(r["shape"], r["provider"]) for r in rows if r["status"] == "ok"}
    expected = ["plain: torch", "bounded: torch", "sigma-reparam: torch"]
    if sn_ext.ops.library_status.loaded:
        expected += ["plain: sn_ext cpu", "bounded: sn_ext cpu", "sigma-reparam: sn_ext cpu"]
    assert {(s, p) for s in variants.QUICK_SHAPES for p in expected} <= ran
    assert all(r["note"] for r in rows if r["status"] == "skipped")


def test_report_has_a_table_per_part(quick_run):
    out, _ = quick_run
    report = (out / "report.md").read_text()
    for heading in (
        "## One layer",
        "### forward, float32",
        "### backward, float32",
        "### train, float32",
        "### eval, bfloat16",
        "## Many layers",
        "## Each op",
        "### spectral_normalize_, float32",
        "### spectral_normalize_backward, bfloat16",
        "### power_iteration_, float32",
        "## SN-GAN training steps",
        "### cnn, eager",
        "### resnet, eager",
        "## Bandwidth",
        "## Variants: bounded spectral norm and sigma-reparam",
    ):
        assert heading in report
    assert "Quick run" in report and "torch / sn_ext cpu" in report and "(layer.png)" in report
    assert "torch.compile not run" in report  # what --quick leaves out is stated


def test_layer_modes_time_what_they_say():
    """forward records the graph and leaves no gradient; backward's untimed reset runs the forward and the timed call
    only the backward; train does both; eval runs without autograd. Checked on the plain provider (W * 1.0: the
    gradient is g) and on sn_ext's (against a twin that runs the same forwards, then a train step)."""
    gen = torch.Generator().manual_seed(3)
    weight, grad = torch.randn(5, 4, 3, generator=gen), torch.randn(5, 4, 3, generator=gen)
    for provider in ("plain", "sn_ext reference"):
        module, twin = (layer.make_layer(provider, weight.clone()) for _ in range(2))
        twin.load_state_dict(module.state_dict())  # the same u, v (each drew its own from the global generator)
        (forward,) = layer.make_steps([module], [grad], "forward")
        forward.reset()
        assert forward.run().grad_fn is not None
        assert all(p.grad is None for p in module.parameters())
        (backward,) = layer.make_steps([module], [grad], "backward")
        backward.reset()  # the forward (a second power iteration)
        assert all(p.grad is None or not p.grad.any() for p in module.parameters())
        backward.run()
        (twin_forward,) = layer.make_steps([twin], [grad], "forward")
        twin_forward.run()
        (train,) = layer.make_steps([twin], [grad], "train")
        train.reset()
        train.run()
        got, want = (next(p.grad for p in m.parameters()) for m in (module, twin))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        if provider == "plain":
            assert torch.equal(got, grad)
        (evaluate,) = layer.make_steps([module], [grad], "eval")
        assert evaluate.run().grad_fn is None


def test_the_compiled_providers_one_module_reads_every_copy_of_w():
    """weight_swapping_steps (torch compiled's module, one for all copies): step i's call reads copy i, in every mode,
    and train steps leave copy i's gradient (a module with copy i as its weight, the same u, v, gives the same).
    Checked eagerly on torch's parametrization: the swap is the benchmark's, not the compiler's."""
    gen = torch.Generator().manual_seed(5)
    copies = [torch.randn(6, 3, 2, generator=gen) for _ in range(3)]
    grads = [torch.randn(6, 3, 2, generator=gen) for _ in range(3)]
    module = layer.make_layer("torch", copies[0])
    for mode in ("eval", "train"):
        steps = layer.weight_swapping_steps(module, copies, grads, mode, layer._call)
        assert len(steps) == len(copies)
        for i in (1, 2, 0, 2):
            twin = layer.make_layer("torch", copies[i].clone())
            for name in ("_u", "_v"):  # u, v as the module has them before the call
                getattr(twin.parametrizations.weight[0], name).copy_(getattr(module.parametrizations.weight[0], name))
            steps[i].reset()
            out = steps[i].run()
            twin.train(mode == "train")
            if mode == "eval":
                with torch.no_grad():
                    torch.testing.assert_close(out, twin())
            else:
                torch.autograd.backward(twin(), grads[i])
                got, want = (m.parametrizations.weight.original.grad for m in (module, twin))
                torch.testing.assert_close(got, want)


def _cuda_source() -> str:
    """The CUDA kernels' headers and sources, concatenated (their constants and loop shapes)."""
    files = sorted((ROOT / "csrc" / "cuda").glob("*.cu*")) + [ROOT / "csrc" / "cuda" / "block_walk.h"]
    return "\n".join(p.read_text() for p in files)


def test_cuda_plan_uses_the_kernels_constants():
    """benchmarks/cuda_plan.py models the CUDA launch plan: its constants are csrc/cuda's (common.cuh, block_walk.h,
    split_round.cuh, fused_round.cuh), its choices' latencies the device model's."""
    import re

    from benchmarks import cuda_plan
    from benchmarks import device_model as dm

    source = _cuda_source()

    def constant(name):
        (expr,) = re.findall(rf"constexpr \S+ {name} = ([^;]+);", source)
        return eval(expr.replace("int64_t(1)", "1").replace("kThreads", str(cuda_plan.THREADS)))

    for python, cuda in [
        ("THREADS", "kThreads"),
        ("MIN_BLOCKS_PER_SM", "kMinBlocksPerSm"),
        ("TARGET_BLOCKS", "kTargetBlocks"),
        ("MIN_COLS_PER_SPLIT", "kMinColsPerSplit"),
        ("MIN_ROWS_PER_THREAD", "kMinRowsPerThread"),
        ("ONE_BLOCK_MAX_NUMEL", "kOneBlockMaxNumel"),
        ("ELEMENTS_PER_THREAD", "kElementsPerThread"),
        ("MAX_LAMBDA_BLOCKS", "kMaxLambdaBlocks"),
        ("LAMBDA_ITEMS_PER_THREAD", "kLambdaItemsPerThread"),
        ("SPLIT_UNROLL", "kSplitUnroll"),
        ("MAX_GRID_Y", "kMaxGridY"),
        ("GROUP_LAYERS", "kGroupLayers"),
        ("STREAM_PACKS", "kStreamPacks"),
        ("STREAM_PAIR_PACKS", "kStreamPairPacks"),
        ("FUSED_BYTES", "kFusedBytes"),
        ("FUSED_ELEMENTWISE_BYTES", "kFusedElementwiseBytes"),
        ("REDUCE_PER_THREAD", "kReducePerThread"),
        ("REDUCE_MAX_GROUPS", "kReduceMaxGroups"),
        ("NOMINAL_GRID", "kNominalGrid"),
        ("VECTOR_BATCH", "kVectorBatch"),
    ]:
        assert getattr(cuda_plan, python) == constant(cuda), python
    assert cuda_plan.NOMINAL_GRID == 132 * cuda_plan.MIN_BLOCKS_PER_SM
    # The plans' choices weigh the device model's scenarios: its latency ranges' two ends, on each GPU.
    (block,) = re.findall(r"constexpr Scenario kScenarios\[4\] = \{(.*?)\};", source, re.S)
    scenarios = [[float(v) for v in row.split(",")] for row in re.findall(r"\{([^{}]+)\}", block)]
    assert scenarios == [[x[k] for k in cuda_plan.SCENARIO_KEYS] for x in cuda_plan.SCENARIOS]
    model = [
        [1000 * dm.LATENCY_US[t][end] for t in cuda_plan.SCENARIO_KEYS[:-1]] + [dm.GPUS[g].copy_bytes_per_us / 1000]
        for g in ("h100", "h200")
        for end in dm.ENDS
    ]
    assert [v for row in scenarios for v in row] == pytest.approx([v for row in model for v in row])
    assert constant("kL2Bytes") == cuda_plan.CHOICE_L2_BYTES == min(g.l2_bytes for g in dm.GPUS.values())
    # The loops the model counts: the split round's and the column sums' unrolling, elementwise_blocks' threads.
    assert re.findall(r"multiprocessor_count\(\) \* \((\d+) / kThreads\)", source) == [
        str(cuda_plan.ELEMENTWISE_THREADS_PER_SM)
    ]
    (reduce_unroll,) = re.findall(
        r"#pragma unroll (\d+)\n\s+for \(int64_t b = g; b < p.blocks; b \+= p.reduce_groups\)", source
    )
    (rmatvec_unroll,) = re.findall(r"#pragma unroll (\d+)\n\s+for \(int64_t i = i_begin \+ ty;", source)
    assert (cuda_plan.REDUCE_UNROLL, cuda_plan.RMATVEC_SCALAR_UNROLL) == (int(reduce_unroll), int(rmatvec_unroll))
    # The schedules: split_steps in spectral_normalize_cuda.cu, fused_steps in block_walk.h (the model mirrors both).
    (split,) = re.findall(r"return \(n == 0 \? (\d+) : (\d+) \* n\) \+ \(divide \? 1 : 0\);", source)
    gpu = cuda_plan.dm.GPUS["h100"]
    w = cuda_plan.Weight.of((512, 512, 3, 3), 4)
    assert [len(cuda_plan.forward([w], gpu, n, "split").phases) - 1 for n in (0, 1)] == [int(split[0]), int(split[1])]
    assert [len(cuda_plan.forward([w], gpu, n, "fused").phases) for n in (0, 1, 2)] == [
        cuda_plan.fused_steps(n, False, False) for n in (0, 1, 2)
    ]
    assert len(cuda_plan.backward([w], gpu).phases) == 2
    small, large = cuda_plan.plan((64, 3, 3, 3), 4, 132), cuda_plan.plan((4096, 4096), 4, 132)
    assert [r["grid barriers"] for r in small] == [0, 0] and [r["grid barriers"] for r in large] == [2, 1]
    assert sum(r["minimum passes"] for r in large) == 7
    # The fused round reads a 4096-wide float32 row once (one register-held segment): a train step makes the minimum
    # 7 weight-sized passes; the split round (SN_EXT_CUDA_ROUND=split) makes 8, and 4 + 1 grid barriers.
    assert sum(r["passes"] for r in large) == 7
    split_plan = cuda_plan.plan((4096, 4096), 4, 132, fused=False)
    assert sum(r["passes"] for r in split_plan) == 8 and [r["grid barriers"] for r in split_plan] == [4, 1]
    # Rows wider than one segment (512x512x3x3: 4608 > 4096 float32 columns) are read twice per fused round.
    assert cuda_plan.plan((512, 512, 3, 3), 4, 132)[0]["passes"] == 4


def test_cuda_plan_choices_are_the_kernels(tmp_path):
    """benchmarks/cuda_plan.py's plan_fused and lambda_blocks against block_walk.h's (compiled here from
    csrc/tests/test_block_walk.cpp, which prints them): the same row layout, row blocks, column sums and dense
    choices on every shape of a grid of odd and real sizes, in each dtype's size, packed or not."""
    import shutil
    import subprocess

    from benchmarks import cuda_plan

    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    program = tmp_path / "plans"
    subprocess.run(
        [compiler, "-std=c++20", "-O1", str(ROOT / "csrc/tests/test_block_walk.cpp"), "-o", str(program)],
        check=True,
        capture_output=True,
    )
    cases = []
    for rows in (1, 2, 3, 7, 31, 64, 97, 128, 257, 512, 1000, 4096, 5000, 16384, 70001):
        for cols in (1, 3, 27, 96, 128, 387, 1152, 2048, 4096, 4608, 8192, 9216, 100003):
            if rows * cols > (1 << 28):
                continue
            for itemsize in (4, 2, 8):
                for packed in (True, False):
                    if packed and cols % (16 // itemsize):
                        continue
                    cases.append((rows, cols, itemsize, packed))
    stdin = "".join(f"{r} {c} {i} {int(p)}\n" for r, c, i, p in cases)
    out = subprocess.run([str(program), "--plans"], input=stdin, capture_output=True, text=True, check=True).stdout
    for (rows, cols, itemsize, packed), line in zip(cases, out.splitlines(), strict=True):
        p = cuda_plan.plan_fused(rows, cols, itemsize, packed)
        want = [p.unit, p.units, p.threads, p.rows_per_step, p.segments, p.rows_per_block, p.blocks]
        want += [p.reduce_groups, p.reduce_blocks, cuda_plan.lambda_blocks(rows * cols, itemsize)]
        assert [int(x) for x in line.split()] == want, (rows, cols, itemsize, packed)


def test_sigma_cost_rows():
    """benchmarks/sigma_cost.py (issue 13): keeping sigma adds no op to the forward (the grouped forward is one op
    besides the layers' own); reading it back runs none, but for a grouped model one index per layer."""
    from benchmarks import sigma_cost

    rows = {r["version"]: r for r in sigma_cost.run(torch.device("cpu"), quick=True)}
    assert set(rows) == {"parametrization", "legacy", "grouped"}
    assert rows["grouped"]["forward_ops"] < rows["parametrization"]["forward_ops"]
    assert rows["parametrization"]["sigmas_read_ops"] == rows["legacy"]["sigmas_read_ops"] == 0
    assert rows["grouped"]["sigmas_read_ops"] == sigma_cost.LAYERS
    for row in rows.values():
        assert row["forward_us"] > 0 and 0 < row["keep_share_pct"] < 100


def test_module_overhead_rows_call_what_they_say():
    """benchmarks/module_overhead.py: every row runs once on a fresh layer and builds on a row of the table."""
    from benchmarks import module_overhead

    table = module_overhead.rows((5, 3, 2), torch.float32, "auto")
    names = [name for name, _, _ in table]
    assert len(set(names)) == len(names)
    for name, base, call in table:
        assert not base or base in names[: names.index(name)], name
        call()


def test_sample_and_low_percentile():
    """benchmarks/timing.py: sample() times `repeats` blocks of one size within [min_reps, max_reps], and
    low_percentile() is the floor of those calls (below the median, at or above the fastest), which
    module_overhead.py reports per row."""
    from benchmarks import timing

    calls = []
    blocks = timing.sample(
        [timing.Step(lambda: calls.append(1))], torch.device("cpu"), budget_s=0.01, repeats=4, min_reps=5, max_reps=50
    ).blocks
    assert len(blocks) == 4 and all(len(b) == len(blocks[0]) for b in blocks) and 5 <= len(blocks[0]) <= 50
    assert len(calls) == 3 + 1 + 4 * len(blocks[0])  # warm-up, the estimate, the blocks
    times = [t for b in blocks for t in b]
    assert min(times) <= timing.low_percentile(blocks) <= sorted(times)[len(times) // 2]
    assert timing.low_percentile([[float(t) for t in range(1, 101)]]) == pytest.approx(10.9)


def test_sample_counts_page_faults():
    """sample() counts the page faults of the timed calls: a step that touches every page of a fresh 1 MiB mapping
    takes at least one fault per page, every call, and measure() says so per call."""
    import mmap

    from benchmarks import timing

    pages = 256

    def touch_fresh_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as memory:
            for page in range(pages):
                memory[page * mmap.PAGESIZE] = 1

    sampled = timing.sample([timing.Step(touch_fresh_pages)], torch.device("cpu"), budget_s=0.01, max_reps=20)
    assert sampled.page_faults >= pages * sum(len(b) for b in sampled.blocks)
    cpu = torch.device("cpu")
    assert timing.measure([timing.Step(lambda: None)], cpu, budget_s=0.01)["faults_per_call"] < 1
    assert timing.measure([timing.Step(touch_fresh_pages)], cpu, budget_s=0.01)["faults_per_call"] >= pages


def test_side_by_side_interleaves_the_calls_and_keeps_each_ones_faults():
    """benchmarks/timing.py: measure_side_by_side() calls its things in turn (after each one's own warm-up), gives
    each the same number of calls per block, and counts each one's page faults apart."""
    import mmap

    from benchmarks import timing

    order = []

    def fresh_pages():
        order.append("faulting")
        with mmap.mmap(-1, 64 * mmap.PAGESIZE) as memory:
            for page in range(64):
                memory[page * mmap.PAGESIZE] = 1

    steps = {
        "faulting": [timing.Step(fresh_pages)],
        "quiet": [timing.Step(lambda: order.append("quiet")), timing.Step(lambda: order.append("quiet"))],
    }
    results = timing.measure_side_by_side(steps, torch.device("cpu"), budget_s=0.01, repeats=2, max_reps=30)
    warmup = ["faulting"] * (3 + 1) + ["quiet"] * (3 + 2)
    assert order[: len(warmup)] == warmup
    timed = order[len(warmup) :]
    assert timed == ["faulting", "quiet"] * (len(timed) // 2)
    assert results["faulting"]["reps"] == results["quiet"]["reps"] == len(timed) // 4
    assert results["faulting"]["faults_per_call"] >= 64 and results["quiet"]["faults_per_call"] < 1
    assert results["quiet"]["rotation"] == 2


def test_keep_freed_memory_removes_the_faults_of_large_outputs():
    """benchmarks/allocator.py: with glibc's defaults, a 64 MiB output (above the largest mmap threshold) comes in
    fresh pages on every call, 16384 faults; after keep_freed_memory() the calls reuse the freed chunk once the heap
    has grown to hold it (a call or two: torch 2.11 took two). Medians over 10 calls after 3 warm-up calls; in a
    process of its own, as the setting stays for the process's life."""
    script = """
import statistics
import torch
from benchmarks import allocator
def median_faults_per_call():
    w = torch.randn(4096, 4096)
    faults = []
    for call in range(13):
        before = allocator.page_faults()
        w * 1.0
        faults.append(allocator.page_faults() - before)
    return statistics.median(faults[3:])
print(median_faults_per_call())
print(allocator.keep_freed_memory())
print(median_faults_per_call())
"""
    lines = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split("\n")
    system_faults, setting, kept_faults = float(lines[0]), lines[1], float(lines[2])
    assert system_faults >= 16384, system_faults
    assert "freed memory kept" in setting, setting
    assert kept_faults < 100, kept_faults


def test_sharded_rows(tmp_path):
    """python -m benchmarks.sharded on a small weight: both providers (their gradients checked equal inside), rows
    and columns sharded, with the numbers each step sends (sn_ext: rows + cols + 1; gathering W: 2 rows x cols)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sharded", "--shape", "12x10", "--reps", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "sharded.csv")
    assert [(r["sharded"], r["provider"]) for r in rows] == [
        ("rows", "sn_ext"),
        ("rows", "gather + torch"),
        ("cols", "sn_ext"),
        ("cols", "gather + torch"),
    ]
    for row in rows:
        expected = 12 + 10 + 1 if row["provider"] == "sn_ext" else 2 * 12 * 10
        assert int(row["numbers_per_step"]) == expected, row
        assert float(row["median_ms"]) > 0
    assert "| 12x10 | rows | sn_ext |" in (tmp_path / "sharded.md").read_text()
