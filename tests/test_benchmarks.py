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

from benchmarks import bandwidth, gan_step, layer, layers, records  # noqa: E402

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
        "layers.csv",
        "gan.csv",
        "layer.json",
        "layers.json",
        "gan.json",
        "layer.png",
        "layers.png",
        "gan.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for name in ("layer.png", "layers.png", "gan.png"):
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


def test_layers_rows(quick_run):
    out, _ = quick_run
    rows = _rows(out / "layers.csv")
    assert list(rows[0]) == layers.COLUMNS + records.META_COLUMNS
    assert {(int(r["layers"]), r["provider"]) for r in rows} == {
        (n, p) for n in layers.QUICK_LAYER_COUNTS for p in layers.PROVIDERS
    }
    assert all(r["status"] == "ok" and int(r["ops"]) > 0 and float(r["median_us"]) > 0 for r in rows)
    ops = {(int(r["layers"]), r["provider"]): int(r["ops"]) for r in rows}
    assert ops[(16, "torch")] > ops[(16, "sn_ext")]  # torch's many small ops per layer


def test_gan_rows(quick_run):
    out, _ = quick_run
    rows = _rows(out / "gan.csv")
    assert list(rows[0]) == gan_step.COLUMNS + records.META_COLUMNS
    assert {(r["arch"], r["sn"], r["mode"], r["step"]) for r in rows} == {
        (a, s, "eager", step)
        for a in gan_step.ARCHS
        for s in ("none", "torch", "sn_ext", "sn_ext_grouped")
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
        "## SN-GAN training steps",
        "### cnn, eager",
        "### resnet, eager",
        "## Bandwidth",
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
