"""benchmarks/gpu_check.py (gpu_check.sh, gpu_bench.sh) on this machine, with a stand-in Python for every command:
the plans' budget arithmetic, a plan whose every command hangs ending within its total with nothing left running and
its results packed, the round-mode fallback, and the summary and README table made from a run's files."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check, gpu_summary  # noqa: E402

# Every command the runner gives "python3" (and nvidia-smi) goes to this stand-in: it logs its arguments and
# SN_EXT_CUDA_ROUND, then hangs (FAKE_HANG=1, after writing its pid), fails the round check of the modes in
# FAKE_FAILING, or succeeds.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python3 $* [${SN_EXT_CUDA_ROUND-unset}]" >> "$FAKE_LOG"
if [ "${FAKE_HANG-}" = 1 ]; then echo $$ >> "$FAKE_PIDS"; exec sleep 1000; fi
case "$*" in
  *"--only check_rounds"*) case " $FAKE_FAILING " in *" $SN_EXT_CUDA_ROUND "*) exit 1 ;; esac ;;
esac
exit 0
"""


def run_plan(tmp_path, plan, scale=1.0, **fake_env):
    """Runs `plan` with the stand-in for Python and nvidia-smi; returns (exit status, seconds, the stand-in's calls,
    results, out)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(FAKE_PYTHON)
        (bin_dir / name).chmod(0o755)
    fake = bin_dir / "python3"
    results, out, log = tmp_path / "results", tmp_path / "out", tmp_path / "calls.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_PIDS": str(tmp_path / "pids"),
        **fake_env,
    }
    env.pop("SN_EXT_CUDA_ROUND", None)
    env.pop("SN_EXT_PREBUILT", None)
    args = ["--plan", plan, "--results", str(results), "--out", str(out), "--python", str(fake), "--scale", str(scale)]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return done, time.monotonic() - started, calls, results, out


@pytest.mark.parametrize("plan", sorted(gpu_check.PLANS))
def test_each_plan_fits_its_limit_and_each_step_its_commands(tmp_path, plan):
    """The budget arithmetic: a plan's steps and reserve within its limit (the check: 7 minutes, inside one
    10-minute call of the device tool), and each step's share at least the sum of its commands' budgets (every
    command run, all succeeding at once)."""
    steps = gpu_check.PLANS[plan]
    assert gpu_check.plan_total_s(steps) <= gpu_check.PLAN_LIMIT_S[plan] <= 7 * 60
    done, _, calls, results, _ = run_plan(tmp_path, plan)
    record = json.loads((results / "steps.json").read_text())
    assert [s["step"] for s in record["steps"]] == [s.name for s in steps]
    for step, ran in zip(steps, record["steps"]):
        assert ran["commands"], step.name
        assert sum(c["budget_s"] for c in ran["commands"]) <= step.budget_s, step.name
        assert all(c["status"] != "skipped" for c in ran["commands"]), step.name
    assert len(calls) == sum(len(s["commands"]) for s in record["steps"])


def test_a_plan_whose_every_command_hangs_ends_within_its_total(tmp_path):
    """Every command hangs: each is stopped at its step's deadline, the plan ends within its total (scaled 1:50),
    nothing it started is left running, and the device tool's folder holds the three packed files (at most 8 come
    back), the archive holding every step's record."""
    scale = 0.02
    total = gpu_check.plan_total_s(gpu_check.CHECK) * scale
    done, seconds, calls, results, out = run_plan(tmp_path, "check", scale, FAKE_HANG="1")
    assert done.returncode == 1
    assert seconds <= total + 5.0, (seconds, total)  # + the runner's own start-up and packing
    record = json.loads((results / "steps.json").read_text())
    statuses = [c["status"] for s in record["steps"] for c in s["commands"]]
    assert "ok" not in statuses and statuses.count("timed out") >= len(gpu_check.CHECK) - 1, statuses
    time.sleep(0.5)
    for pid in (tmp_path / "pids").read_text().split():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_check.tar.gz", "summary.json"]
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = archive.getnames()
    assert "results/steps.json" in names and "results/rounds_fused.log" in names
    assert "timed out" in (out / "gpu_check.log").read_text()


@pytest.mark.parametrize(
    "failing,chosen",
    [("", "fused"), ("fused", "split"), ("fused split", "split-scalar"), ("fused split split-scalar", "split-scalar")],
)
def test_the_check_falls_back_to_the_first_round_mode_that_passes(tmp_path, failing, chosen):
    """Each round mode is checked in a process of its own, in order; every later command runs with the first that
    passed (or split-scalar if none did), leaves out the failed modes' tests and times the modes that passed;
    round_mode.json and summary.json say which and why."""
    done, _, calls, results, out = run_plan(tmp_path, "check", FAKE_FAILING=failing)
    assert done.returncode == (0 if chosen == "fused" else 1), done.stdout + done.stderr
    checks = [c for c in calls if "--only check_rounds" in c]
    assert [c.rsplit("[", 1)[1] for c in checks] == ["fused]", "split]", "split-scalar]"]
    record = json.loads((results / "round_mode.json").read_text())
    assert record["round"] == chosen and record["failed"] == failing.split()
    assert f"SN_EXT_CUDA_ROUND={chosen} for every later step" in done.stdout
    later = calls[calls.index(checks[-1]) + 1 :]
    assert later and all(c.endswith(f"[{chosen}]") for c in later), later
    (timings,) = [c for c in later if "--name timings" in c]
    passed = [m for m in gpu_summary.ROUND_MODES if m not in failing.split()]
    assert timings.split("--time-rounds")[1].split("[")[0].split() == (passed or [chosen])
    (cuda_tests,) = [c for c in later if "pytest" in c and "test_cuda.py" in c]
    for mode in failing.split():
        assert f"and not {mode.removesuffix('-scalar')}" in cuda_tests
    assert failing or "and not triton tests/" in cuda_tests  # no mode left out when none failed
    assert json.loads((out / "summary.json").read_text())["round"] == record


def test_the_summary_and_the_readme_table(tmp_path):
    """A run's files (partial: the Triton step never ran) become summary.json and the README's GPU table."""
    write = lambda name, data: (tmp_path / name).write_text(json.dumps(data))  # noqa: E731
    write(
        "timings.json",
        {
            "device": "NVIDIA H200",
            "checks": [],
            "timings": [
                {"kind": "layer", "shape": "64x3x3x3", "plain": 10.0, "torch": 120.0, "sn_ext cuda": 12.5,
                 "graph_us": {"sn_ext cuda": 6.5, "plain": 3.0}, "modelled_us": {"sn_ext cuda": [4.2, 7.9]},
                 "cuda_over_plain": 1.25},
                {"kind": "layer", "shape": "4096x4096", "plain": 300.0, "sn_ext cuda": 700.0,
                 "graph_us": {"sn_ext cuda": "failed: RuntimeError: x"}, "cuda_over_3.5_copies": 1.1},
                {"kind": "grouped", "model": "sngan cnn D (32x32)", "layers": 8, "plain": 20.0, "per layer": 90.0,
                 "grouped": 30.0, "plain kernels": 16, "per layer kernels": 16, "grouped kernels": 2},
            ],
            "round_timings": [{"shape": "4096x4096", "order": "v-first", "fused_us": 80.0, "split_us": 95.5}],
        },
    )  # fmt: skip
    write("smoke.json", {"checks": [{"check": "op vs cpu", "ok": True}, {"check": "cuda graph", "ok": False}]})
    write("rounds_fused.json", {"checks": [{"check": "round vs cpu", "shape": "40x4608", "ok": False}]})
    write("round_mode.json", gpu_summary.choose_round(["split", "split-scalar"]))
    (tmp_path / "test_cuda.log").write_text("....\n===== 41 passed, 2 failed in 12.0s =====\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{gpu_summary.START}\nnot measured yet\n{gpu_summary.END}\n\nafter\n")
    gpu_summary.main(["--out", str(tmp_path), "--readme", str(readme)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["checks_passed"] == 1 and summary["checks"] == 3 and len(summary["failed_checks"]) == 2
    assert summary["round"]["round"] == "split" and summary["failed_checks"][0]["shape"] == "40x4608"
    assert summary["tests"] == {"test_cuda": "41 passed, 2 failed in 12.0s"}
    text = readme.read_text()
    assert "not measured yet" not in text and text.endswith("after\n") and "NVIDIA H200" in text
    assert "round mode split (the first that passed its check; failed: fused" in text
    assert "| 64x3x3x3 | 10.0 | 120.0 | 12.5 |  | 6.5 | 4-8 | 3.0 | 1.25 |  |" in text
    assert "| 4096x4096 | 300.0 |  | 700.0 |  | failed |  |  |  | 1.1 |" in text
    assert "| 4096x4096 | v-first | 80.0 | 95.5 |" in text and "| sngan cnn D (32x32) | 8 | 20.0 (16) |" in text
    gpu_summary.main(["--out", str(tmp_path), "--readme", str(readme)])  # idempotent: one table
    assert readme.read_text().count(gpu_summary.START) == 1


def test_the_timing_parts_on_the_cpu(tmp_path, monkeypatch):
    """gpu_smoke's timing parts run here with the CPU standing in for the GPU (sn_ext's CPU backend for its cuda and
    triton ones, eager timing for CUDA-graph replay, small shapes): every record has its fields, ratios and goals."""
    import torch

    import sn_ext
    from benchmarks import gpu_smoke, spectral_normalize_grouped, timing

    cpu = torch.device("cpu")
    on_cpu = gpu_smoke.make_layer
    ours = sn_ext.backends.auto_backend(cpu, torch.float32).name  # cpu, or reference on the fallback run

    def make_layer(provider, weight):
        return on_cpu(provider.replace("cuda", ours).replace("triton", ours), weight)

    monkeypatch.setattr(gpu_smoke, "make_layer", make_layer)
    monkeypatch.setattr(spectral_normalize_grouped, "make_layer", make_layer)
    monkeypatch.setattr(
        gpu_smoke, "graph_replay_us", lambda steps, device: timing.measure(steps, device, budget_s=0.01)["median_us"]
    )
    monkeypatch.setattr(gpu_smoke, "TIMING_DEVICE", cpu)
    monkeypatch.setattr(gpu_smoke, "TIMED_SHAPES", ["16x3x3x3", "96x80"])
    monkeypatch.setattr(gpu_smoke, "COPY_SHAPE", "96x80")
    monkeypatch.setattr(gpu_smoke, "TIMED_ROUND_SHAPES", [(40, 30)])
    results = gpu_smoke.Results(tmp_path / "timings.json")
    gpu_smoke.time_layers(results)
    gpu_smoke.time_rounds(results, ["fused", "split"])
    gpu_smoke.time_grouped(results)
    gpu_smoke.time_triton(results)
    data = json.loads((tmp_path / "timings.json").read_text())
    small, copied, small_triton, copied_triton = (t for t in data["timings"] if t["kind"] == "layer")
    for record in (small, copied):
        assert all(isinstance(record[p], float) for p in ("plain", "torch", "sn_ext cuda")), record
        assert set(record["graph_us"]) == {"plain", "torch", "sn_ext cuda"}
        assert record["cuda_over_plain"] == pytest.approx(record["sn_ext cuda"] / record["plain"], rel=1e-2)
    assert small["ok"] == (small["cuda_over_plain"] <= gpu_smoke.PLAIN_GOAL)
    ratio = copied["graph_us"]["sn_ext cuda"] / (3.5 * copied["copy_us"])
    assert copied["cuda_over_3.5_copies"] == pytest.approx(ratio, rel=1e-2) and "ok" in copied
    assert small_triton["shape"] == "16x3x3x3" and isinstance(small_triton["triton_over_plain"], float)
    assert list(small_triton["graph_us"]) == ["sn_ext triton"]
    u_first, v_first = data["round_timings"]
    assert (u_first["order"], v_first["order"]) == ("u-first", "v-first") and "over_u_first" in v_first
    assert small["modelled_us"]["sn_ext cuda"].startswith("not modelled")  # the CPU is no GPU of the model
    cnn, resnet = (t for t in data["timings"] if t["kind"] == "grouped")
    assert cnn["layers"] == len(gpu_smoke.discriminator_weights("cnn")) >= 8 and resnet["layers"] > cnn["layers"]
    for record in (cnn, resnet):  # on the CPU, the profiler counts dispatched ops: grouped makes fewer
        assert record["grouped kernels"] < record["per layer kernels"], record
        assert all(isinstance(record[p], float) for p in ("plain", "per layer", "grouped"))


@pytest.mark.parametrize("name,gpu", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200")])
def test_the_model_is_put_beside_the_measurement(monkeypatch, name, gpu):
    """On an H100 or H200, each timed layer carries the device-time model's (low, high) for the same step."""
    import torch

    from benchmarks import device_model, gpu_smoke

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    low, high = gpu_smoke.modelled_us("cuda", "512x512x3x3", torch.device("cuda"))
    assert (low, high) == device_model.modelled_step_us("cuda", (512, 512, 3, 3), torch.float32, gpu) and low < high
