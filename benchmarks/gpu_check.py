"""The runner behind benchmarks/gpu_check.sh and benchmarks/gpu_bench.sh: a GPU machine lent for one call of at most
10 minutes, out of 15 minutes of device time, must tell everything in one call and bring its results back.

    bash benchmarks/gpu_check.sh          # = python3 -m benchmarks.gpu_check --plan check (at most 7 minutes)
    bash benchmarks/gpu_bench.sh          # = python3 -m benchmarks.gpu_check --plan bench (at most 5 minutes)

A plan is a list of steps, each with its share of the plan's time (PLANS, below); every command a step runs is a
process of its own under a timeout that ends, at the latest, when the step's share does. Time a step does not use
passes on to the steps after it; a step that hangs costs its own share and nothing more. So the whole plan ends
within its total even when every command hangs (tests/test_gpu_check.py runs it so, with the times scaled down).

Where results go:
- `--results DIR` (default gpu_results): every file the steps write (logs, JSON records, the benchmark CSVs),
  written as each step goes;
- `--out DIR` (default: $OUT when set; the device tool brings back at most 8 files from its $OUT): after every
  step, three files: gpu_check.tar.gz (the whole results folder), summary.json (benchmarks/gpu_summary.py) and
  gpu_check.log (this runner's own lines). A run stopped from outside keeps what the last step packed.

The runner itself imports nothing beyond the standard library (and the summary's module), so that it runs before
sn_ext is built and whatever the build does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from . import gpu_summary

ROOT = Path(__file__).resolve().parent.parent
# Seconds a command gets at the least: a step with less than this left skips its remaining commands (saying so).
MIN_COMMAND_S = 3.0
# Seconds kept at the end of every plan for the summary and the last packing.
RESERVE_S = 10.0
# How long a timed-out command's process group gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 3.0


@dataclasses.dataclass
class CommandResult:
    log: str
    rc: int | None  # None: skipped or timed out
    seconds: float
    status: str  # "ok", "failed", "timed out", "skipped"


class Runner:
    """Runs a plan's steps in order, each command under a timeout bounded by its step's deadline, and records and
    packs the results after every step."""

    def __init__(self, plan: str, results: Path, out: Path | None, python: str, scale: float = 1.0):
        self.plan, self.results, self.out, self.python, self.scale = plan, results, out, python, scale
        self.start = time.monotonic()
        self.total_s = plan_total_s(PLANS[plan]) * scale
        self.step_deadline = self.start
        self.records: list[dict] = []
        self.lines: list[str] = []
        self.state: dict = {}  # what a step found that later ones use (the round mode, pytest-xdist, ...)
        self.failed = False
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._current: subprocess.Popen | None = None
        results.mkdir(parents=True, exist_ok=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    # ---- time ----
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds the current step may still use: to its deadline, and never into the plan's reserve."""
        now = time.monotonic()
        return min(self.step_deadline - now, self.start + self.total_s - self.scale * RESERVE_S - now)

    # ---- output ----
    def say(self, line: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {line}"
        self.lines.append(line)
        print(line, flush=True)

    # ---- commands ----
    def command(self, log: str, args: list[str], budget_s: float, env: dict | None = None) -> CommandResult:
        """Runs `args` (a "python3" first argument means this runner's Python) with its output in <results>/<log>,
        under a timeout of `budget_s` (scaled) or what is left of the step, whichever is less."""
        args = [self.python if a == "python3" else a for a in args]
        timeout = min(budget_s * self.scale, self.left())
        record = {"log": log, "command": shlex.join(args), "budget_s": budget_s, "timeout_s": round(timeout, 2)}
        if timeout < MIN_COMMAND_S * self.scale:
            result = CommandResult(log, None, 0.0, "skipped")
            self.say(f"  {log}: skipped ({timeout:.0f} s left in this step)")
        else:
            result = self._run(log, args, timeout, {**self.env, **(env or {})})
            self.say(f"  {log}: {result.status} (rc {result.rc}, {result.seconds:.1f} s of {timeout:.0f})")
        self.records[-1]["commands"].append({**record, **dataclasses.asdict(result)})
        if result.status != "ok":
            self.failed = True
        return result

    def _run(self, log: str, args: list[str], timeout: float, env: dict) -> CommandResult:
        started = time.monotonic()
        with open(self.results / log, "w") as output:
            # A session of its own, so that a timeout ends the command's children too (pytest's workers, ninja's
            # compilers), which a command left running would keep on the machine.
            try:
                process = subprocess.Popen(
                    args, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as error:  # no such program (nvidia-smi on a machine without a driver)
                output.write(f"{type(error).__name__}: {error}\n")
                return CommandResult(log, None, 0.0, "failed")
            self._current = process
            try:
                rc = process.wait(timeout=timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                self.stop_current()
                rc, status = None, "timed out"
            finally:
                self._current = None
        return CommandResult(log, rc, round(time.monotonic() - started, 1), status)

    def stop_current(self) -> None:
        process = self._current
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S * self.scale), (signal.SIGKILL, None)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    # ---- steps ----
    def run(self, steps: list[Step]) -> int:
        self.say(f"plan {self.plan}: {len(steps)} steps within {self.total_s:.0f} s; results in {self.results}")
        planned_end = 0.0
        for step in steps:
            planned_end += step.budget_s * self.scale
            # A step may use the time the steps before it left unused, never the time of the steps after it.
            self.step_deadline = self.start + planned_end
            self.records.append({"step": step.name, "budget_s": step.budget_s * self.scale, "commands": []})
            self.say(f"{step.name} ({step.what}): up to {self.left():.0f} s")
            began = time.monotonic()
            try:
                step.run(self)
            except Exception as error:  # a step's own code failed: say so, go on with the next
                self.failed = True
                self.records[-1]["error"] = f"{type(error).__name__}: {error}"
                self.say(f"  {step.name}: error {type(error).__name__}: {error}")
            self.records[-1]["seconds"] = round(time.monotonic() - began, 1)
            self.pack()
        self.finish()
        return 1 if self.failed else 0

    def pack(self) -> None:
        """steps.json and summary.json into the results; the three files into --out."""
        (self.results / "steps.json").write_text(
            json.dumps({"plan": self.plan, "elapsed_s": round(self.elapsed(), 1), "steps": self.records}, indent=1)
            + "\n"
        )
        summary = gpu_summary.summarize(self.results)
        (self.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if self.out is None or self.out.resolve() == self.results.resolve():
            return
        (self.out / "gpu_check.log").write_text("\n".join(self.lines) + "\n")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        partial = self.out / "gpu_check.tar.gz.partial"
        with tarfile.open(partial, "w:gz") as archive:
            archive.add(self.results, arcname=self.results.name)
        partial.replace(self.out / "gpu_check.tar.gz")  # never half an archive, whenever the run is stopped

    def finish(self) -> None:
        self.say(f"plan {self.plan}: done in {self.elapsed():.0f} s of {self.total_s:.0f}")
        print(gpu_summary.table(gpu_summary.summarize(self.results)), flush=True)
        print(gpu_summary.problems(gpu_summary.summarize(self.results)), flush=True)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    budget_s: float
    what: str
    run: Callable[[Runner], None]


# ---- the steps ----

PYTHON_PROBE = (
    "import json, sys, torch; import importlib.util as u; "
    "p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
    "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
    "'cuda': torch.version.cuda, 'device': p.name if p else None, "
    "'sms': p.multi_processor_count if p else None, 'memory_gb': round(p.total_memory / 2**30, 1) if p else None, "
    "'triton': bool(u.find_spec('triton')), 'xdist': bool(u.find_spec('xdist')), "
    "'pytest_timeout': bool(u.find_spec('pytest_timeout'))}))"
)


def environment(run: Runner) -> None:
    run.command("nvidia_smi.txt", ["nvidia-smi"], 5)
    if run.command("environment.json", ["python3", "-c", PYTHON_PROBE], 10).status == "ok":
        lines = (run.results / "environment.json").read_text().strip().splitlines()
        run.state["environment"] = json.loads(lines[-1]) if lines else {}


def build(run: Runner) -> None:
    """Builds sn_ext in place (editable), as the device tool's README says, unless SN_EXT_PREBUILT=1 says the
    compiled library in the checkout was built for this machine's torch and Python (carried from a build elsewhere)."""
    if os.environ.get("SN_EXT_PREBUILT") != "1":
        run.command(
            "build.log",
            ["python3", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
            105,
            env={"MAX_JOBS": "16"},
        )
    run.command("info.json", ["python3", "-m", "sn_ext.info"], 15)


def smoke(run: Runner, *parts: str, name: str, extra: tuple[str, ...] = ()) -> list[str]:
    """A benchmarks.gpu_smoke command running `parts` into <results>/<name>.json."""
    only = [arg for part in parts for arg in ("--only", part)]
    return ["python3", "-m", "benchmarks.gpu_smoke", "--out", str(run.results), "--name", name, *only, *extra]


def rounds(run: Runner) -> None:
    """Each round mode (SN_EXT_CUDA_ROUND) against the CPU kernels in a process of its own: a wrong or crashing
    kernel costs its process, not the run. Every later step runs with the first mode that passed."""
    passed = []
    for mode in gpu_summary.ROUND_MODES:
        args = smoke(run, "check_rounds", name=f"rounds_{mode}")
        if run.command(f"rounds_{mode}.log", args, 15, {"SN_EXT_CUDA_ROUND": mode}).rc == 0:
            passed.append(mode)
    record = gpu_summary.choose_round(passed)
    (run.results / "round_mode.json").write_text(json.dumps(record) + "\n")
    run.say(f"  SN_EXT_CUDA_ROUND={record['round']} for every later step: {record['why']}")
    run.state["passed_rounds"] = passed
    run.env["SN_EXT_CUDA_ROUND"] = record["round"]
    if record["round"] != gpu_summary.ROUND_MODES[0]:
        run.failed = True


def goal_timings(run: Runner) -> None:
    """The numbers the open goals are judged by, before anything long: one layer's train step against plain (eager
    wall time and device time), 4096x4096 against device copies, fused vs split and u-first vs v-first rounds, and
    a grouped whole discriminator's launches."""
    # The modes that passed their check, side by side; if none did, the one the run uses.
    passed = run.state.get("passed_rounds") or [run.env.get("SN_EXT_CUDA_ROUND", gpu_summary.ROUND_MODES[0])]
    args = smoke(run, "time_layers", "time_rounds", "time_grouped", name="timings", extra=("--time-rounds", *passed))
    run.command("timings.log", args, 55)


def smoke_checks(run: Runner) -> None:
    """Every op against the CPU kernels, cooperative vs phased launches bit for bit, CUDA-graph capture."""
    run.command("smoke.log", smoke(run, "check_ops", "check_grouped", "check_graphs", name="smoke"), 35)


OP_TESTS = [
    "tests/test_power_iteration.py",
    "tests/test_spectral_normalize.py",
    "tests/test_spectral_normalize_backward.py",
]


def pytest_args(run: Runner, workers: int) -> list[str]:
    """pytest's options here: workers (pytest-xdist) and a per-test timeout (pytest-timeout) where installed."""
    found = run.state.get("environment", {})
    args = ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--maxfail=20"]
    if found.get("xdist") and workers > 1:
        args += ["-n", str(workers)]
    if found.get("pytest_timeout"):
        args += ["--timeout", "60"]
    return args


def not_failed_rounds(run: Runner) -> str:
    """-k terms leaving out the tests that run a failed round mode on purpose (their ids name the mode; "not split"
    leaves out split-scalar's too)."""
    passed = run.state.get("passed_rounds", gpu_summary.ROUND_MODES)
    return "".join(f" and not {m.removesuffix('-scalar')}" for m in gpu_summary.ROUND_MODES if m not in passed)


def cuda_tests(run: Runner) -> None:
    """The CUDA kernels' tests (the per-op files' cuda cases, the scaled forms', test_cuda.py, test_cuda_launch.py) and
    grouped mode."""
    files = [
        *OP_TESTS,
        "tests/test_spectral_normalize_scaled.py",
        "tests/test_spectral_normalize_grouped.py",
        "tests/test_cuda.py",
        "tests/test_cuda_launch.py",
    ]
    select = f"(cuda or grouped) and not triton{not_failed_rounds(run)}"
    run.command("test_cuda.log", [*pytest_args(run, 8), "-k", select, *files], 75)


def triton(run: Runner) -> None:
    """Triton: the variants the reduced test grid launches (SN_EXT_TEST_GRID=reduced) compiled into Triton's cache
    in parallel processes (sn_ext.triton.warm_up replaying tests/triton_warm_up.py's launches), then the tests on
    that grid, which find the cache warm, then the layer timings."""
    env = {"SN_EXT_TEST_GRID": "reduced"}
    warm_up = ["python3", "-m", "sn_ext.triton.warm_up", "--processes", "16"]
    run.command("triton_warm_up.log", [*warm_up, "--calls", "tests/triton_warm_up.py:grid_launches"], 20, env)
    files = [*OP_TESTS, "tests/test_triton.py", "tests/test_backends.py"]
    select = "triton or test_backends.py"
    run.command("test_triton.log", [*pytest_args(run, 8), "-k", select, *files], 25, env)
    run.command("triton_timings.log", smoke(run, "time_triton", name="triton_timings"), 10)


def compile_tests(run: Runner) -> None:
    """torch.compile of sn_ext's spectral norm on the GPU (cuda and triton backends)."""
    run.command("test_compile.log", [*pytest_args(run, 4), "tests/test_compile.py"], 60)


# The benchmark suite's sections (python -m benchmarks), one process each so that each has its own timeout: a
# section stopped by its timeout keeps the rows it wrote (CSVs are written row by row); the report is rebuilt last
# from whatever is there. The layer section times train and eval only (forward and backward alone would double it).
BENCH_SECTIONS = [("gan", 75, []), ("layer", 60, ["--mode", "train", "--mode", "eval"]), ("layers", 20, [])]
BENCH_REPORT_S = 10


def bench_sections(run: Runner) -> None:
    bench = str(run.results / "bench")
    for section, budget, extra in BENCH_SECTIONS:
        args = ["python3", "-m", "benchmarks", "--device", "cuda", "--only", section, *extra, "--out", bench]
        run.command(f"bench_{section}.log", args, budget)
    report = ["python3", "-m", "benchmarks", "--device", "cuda", "--report-only", "--out", bench]
    run.command("bench_report.log", report, BENCH_REPORT_S)


# Each step's share (seconds) is at least the sum of its commands' budgets (tests/test_gpu_check.py checks both).
# A plan's total is its steps' shares plus RESERVE_S: the check's must stay within 7 minutes (one call of the device
# tool may run 10, and a session has 15 minutes of device time in all, the machine's start included); the bench is
# for a second call or a later session.
CHECK = [
    Step("environment", 15, "the GPU, torch, triton, pytest plugins", environment),
    Step("build", 120, "sn_ext built in place, offline", build),
    Step("rounds", 45, "each CUDA round mode against the CPU kernels", rounds),
    Step("goal_timings", 55, "per layer, 4096x4096, rounds, grouped", goal_timings),
    Step("smoke", 35, "every op, launch modes, CUDA graphs", smoke_checks),
    Step("cuda_tests", 75, "the CUDA tests", cuda_tests),
    Step("triton", 55, "Triton warm-up, tests (reduced grid), timings", triton),
]
BENCH = [
    Step("environment", 15, "the GPU, torch, triton, pytest plugins", environment),
    Step("build", 120, "sn_ext built in place, offline", build),
    Step("compile", 60, "torch.compile tests", compile_tests),
    Step("bench", 165, "benchmark sections: gan, layer, layers", bench_sections),
]
PLANS = {"check": CHECK, "bench": BENCH}
PLAN_LIMIT_S = {"check": 7 * 60, "bench": 7 * 60}


def plan_total_s(steps: list[Step]) -> float:
    """The longest a plan can take: its steps' shares and the reserve."""
    return sum(step.budget_s for step in steps) + RESERVE_S


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument("--plan", choices=sorted(PLANS), default="check")
    p.add_argument("--results", type=Path, default=Path("gpu_results"), help="where every result file goes")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or None, help="where the packed results go")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the steps")
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests: every time multiplied
    args = p.parse_args(argv)
    runner = Runner(args.plan, args.results.resolve(), args.out, args.python, args.scale)

    def stopped(signum, frame):  # stopped from outside (a timeout around us): end the command, keep what is packed
        runner.stop_current()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    return runner.run(PLANS[args.plan])


if __name__ == "__main__":
    raise SystemExit(main())
