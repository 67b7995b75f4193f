"""What a GPU run found, in one summary, and the README's GPU table made from it.

    python -m benchmarks.gpu_summary --out gpu_results                     # writes gpu_results/summary.json
    python -m benchmarks.gpu_summary --out gpu_results --readme README.md  # also rewrites README's GPU table

benchmarks/gpu_check.py (gpu_check.sh) writes summary.json after every step; back home, run the second command on
the unpacked results. summary.json holds the device, the round mode the run used and why (round_mode.json: the
first of ROUND_MODES that passed its check), every check (rounds_<mode>.json, smoke.json: how many passed, the
failures), the timings (timings.json, triton_timings.json; benchmarks/gpu_smoke.py), each pytest log's last line
(test_*.log) and every command's status and time (steps.json). The README table sits between the
`<!-- gpu-table:start -->` and `<!-- gpu-table:end -->` lines.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .tables import markdown_table

START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
PROVIDERS = ["plain", "torch", "sn_ext cuda", "sn_ext triton"]
# SN_EXT_CUDA_ROUND's values (csrc/cuda/launch.h) in gpu_check.sh's order of preference: the fused u-first round;
# the split round with its packed loops; the split round with its earlier scalar loops.
ROUND_MODES = ["fused", "split", "split-scalar"]
# The files of checks and timings that the steps write (benchmarks/gpu_smoke.py --name), in the order they run.
RECORD_FILES = [*(f"rounds_{mode}.json" for mode in ROUND_MODES), "timings.json", "smoke.json", "triton_timings.json"]


def choose_round(passed: list[str]) -> dict:
    """round_mode.json: the first mode of ROUND_MODES that passed its check, or, if none did, the last (the code
    closest to what was desk-reviewed), and why."""
    failed = [m for m in ROUND_MODES if m not in passed]
    chosen = next((m for m in ROUND_MODES if m in passed), ROUND_MODES[-1])
    if chosen not in passed:
        why = f"no round mode passed its check (rounds_<mode>.json); {chosen}, the earlier code, by default"
    elif failed:
        why = f"the first that passed its check; failed: {', '.join(failed)} (rounds_<mode>.json)"
    else:
        why = "every round mode passed its check"
    return {"round": chosen, "passed": [m for m in ROUND_MODES if m in passed], "failed": failed, "why": why}


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written (the step did not run) or cut short
        return default


def _merge_by_shape(records: list[dict]) -> list[dict]:
    """The layer timings of the CUDA and Triton steps, one record per shape, in the order first seen."""
    merged: dict[str, dict] = {}
    for record in records:
        merged.setdefault(record["shape"], {}).update(record)
    return list(merged.values())


def summarize(out: Path) -> dict:
    """summary.json: everything the steps of gpu_check.sh wrote into `out`, whatever ran or did not."""
    records = [_read_json(out / name, {}) for name in RECORD_FILES]
    # A mode whose process crashed before its first check left no file: round_mode.json lists it as failed.
    checks = [c for r in records for c in r.get("checks", [])]
    timings = [t for r in records for t in r.get("timings", [])]
    tests = {}
    for log in sorted(out.glob("test_*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        tests[log.stem] = lines[-1].strip("= ") if lines else "empty"
    steps = _read_json(out / "steps.json", {}).get("steps", [])
    device = next((r["device"] for r in records if r.get("device")), None)
    return {
        "device": device or _read_json(out / "environment.json", {}).get("device") or "unknown",
        "round": _read_json(out / "round_mode.json", {"round": "unknown"}),
        "checks_passed": sum(1 for c in checks if c.get("ok")),
        "checks": len(checks),
        "failed_checks": [c for c in checks if not c.get("ok")],
        "timings": _merge_by_shape([t for t in timings if t.get("kind", "layer") == "layer"]),
        "grouped_timings": [t for t in timings if t.get("kind") == "grouped"],
        "round_timings": [t for r in records for t in r.get("round_timings", [])],
        "tests": tests,
        "commands": [
            {"step": step["step"], **{k: c.get(k) for k in ("log", "status", "seconds", "timeout_s")}}
            for step in steps
            for c in step.get("commands", [])
        ],
    }


def _us(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else "failed" if value else ""


def _range(value) -> str:
    """A modelled (low, high) as "low-high"; what the model said instead, shortened."""
    return f"{value[0]:.0f}-{value[1]:.0f}" if isinstance(value, list) else "n/a" if value else ""


def _round(record: dict) -> str:
    return record["round"] + (f" ({record['why']})" if "why" in record else "")


def table(summary: dict) -> str:
    rows = [
        [
            t["shape"],
            *(_us(t.get(p)) for p in PROVIDERS),
            _us(t.get("graph_us", {}).get("sn_ext cuda")),
            _range(t.get("modelled_us", {}).get("sn_ext cuda")),
            _us(t.get("graph_us", {}).get("plain")),
            t.get("cuda_over_plain", ""),
            t.get("cuda_over_3.5_copies", ""),
        ]
        for t in summary["timings"]
    ]
    tests = "; ".join(f"{name.removeprefix('test_')}: {line}" for name, line in summary["tests"].items())
    lines = [
        f"One layer's train step (forward with one power iteration + backward), float32, median µs, on "
        f"{summary['device']} (`benchmarks/gpu_check.sh`; smoke checks {summary['checks_passed']}/"
        f"{summary['checks']} passed; round mode {_round(summary['round'])}; {tests or 'no test logs'}). Eager: "
        f"wall time per step as a training loop sees it; graph: the same step replayed from a CUDA graph (device "
        f"time), beside the device-time model's (benchmarks/device_model.py, low-high):",
        "",
        markdown_table(
            [
                "weight",
                *(f"{p} µs" for p in PROVIDERS),
                "sn_ext cuda graph µs",
                "sn_ext cuda modelled µs",
                "plain graph µs",
                "cuda / plain (eager)",
                "cuda / 3.5 copies of W",
            ],
            rows,
        ),
    ]
    rounds = summary.get("round_timings", [])
    if rounds:
        lines += ["", "Forward (one round, then W / sigma), float32, µs, by round mode:", ""]
        modes = [m for m in ROUND_MODES if any(f"{m}_us" in r for r in rounds)]
        lines.append(
            markdown_table(
                ["weight", "order", *modes],
                [[r["shape"], r["order"], *(_us(r.get(f"{m}_us")) for m in modes)] for r in rounds],
            )
        )
    grouped = summary.get("grouped_timings", [])
    if grouped:
        lines += ["", "A whole discriminator's spectral norms, train step, float32 (kernels per step in brackets):", ""]
        lines.append(
            markdown_table(
                ["model", "layers", "plain µs", "sn_ext per layer µs", "sn_ext grouped µs"],
                [
                    [
                        g["model"],
                        g["layers"],
                        *(f"{_us(g.get(p))} ({g.get(p + ' kernels', '?')})" for p in ("plain", "per layer", "grouped")),
                    ]
                    for g in grouped
                ],
            )
        )
    return "\n".join(lines)


def problems(summary: dict) -> str:
    """What went wrong, in a few lines: failed checks, commands that failed or timed out, the test logs' last lines."""
    lines = [f"checks: {summary['checks_passed']}/{summary['checks']} passed"]
    for check in summary["failed_checks"][:20]:
        lines.append("  failed: " + json.dumps(check)[:400])
    for command in summary["commands"]:
        if command["status"] != "ok":
            lines.append(f"  {command['step']}: {command['log']} {command['status']} after {command['seconds']} s")
    lines += [f"  {name}: {line}" for name, line in summary["tests"].items()]
    return "\n".join(lines)


def rewrite_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme}: no {START} ... {END} block to rewrite")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", content))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("gpu_results"), help="gpu_check.sh's results folder")
    p.add_argument("--readme", type=Path, help="rewrite this README's GPU table from the summary")
    args = p.parse_args(argv)
    summary = summarize(args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    print(problems(summary), file=sys.stderr)
    if args.readme:
        rewrite_readme(args.readme, table(summary))


if __name__ == "__main__":
    main()
