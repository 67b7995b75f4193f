"""The last step of benchmarks/gpu_check.sh: one summary of a GPU run, and the README's GPU table made from it.

    python -m benchmarks.gpu_summary --out gpu_results                  # writes gpu_results/summary.json
    python -m benchmarks.gpu_summary --out gpu_results --readme README.md  # also rewrites README's GPU table
    python -m benchmarks.gpu_summary --out gpu_results --choose-round fused split  # gpu_check.sh's step 0

summary.json holds the device, the round mode the run used and why (round_mode.json: the first of ROUND_MODES that
passed its check; --choose-round writes it and prints the mode), the smoke step's checks (rounds_<mode>.json's
included: how many passed, the failures) and timings (benchmarks/gpu_smoke.py), and each pytest log's last line
(test_*.log). The README table sits between the `<!-- gpu-table:start -->` and `<!-- gpu-table:end -->` lines.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .records import markdown_table

START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
PROVIDERS = ["plain", "torch", "sn_ext cuda", "sn_ext triton"]
# SN_EXT_CUDA_ROUND's values (csrc/cuda/launch.h) in gpu_check.sh's order of preference: the fused u-first round;
# the split round with its packed loops; the split round with its earlier scalar loops.
ROUND_MODES = ["fused", "split", "split-scalar"]


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


def summarize(out: Path) -> dict:
    smoke_path = out / "smoke.json"
    smoke = json.loads(smoke_path.read_text()) if smoke_path.exists() else {"checks": [], "timings": []}
    round_path = out / "round_mode.json"
    # A mode whose process crashed before its first check left no file: round_mode.json lists it as failed.
    paths = [out / f"rounds_{mode}.json" for mode in ROUND_MODES]
    rounds = [json.loads(path.read_text()) for path in paths if path.exists()]
    checks = [c for r in rounds for c in r["checks"]] + smoke["checks"]
    tests = {}
    for log in sorted(out.glob("test_*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        tests[log.stem] = lines[-1].strip("= ") if lines else "empty"
    return {
        "device": smoke.get("device", "unknown"),
        "round": json.loads(round_path.read_text()) if round_path.exists() else {"round": "unknown"},
        "checks_passed": sum(1 for c in checks if c.get("ok")),
        "checks": len(checks),
        "failed_checks": [c for c in checks if not c.get("ok")],
        "timings": smoke["timings"],
        "round_timings": smoke.get("round_timings", []),
        "tests": tests,
    }


def _us(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else "failed" if value else ""


def _round(record: dict) -> str:
    return record["round"] + (f" ({record['why']})" if "why" in record else "")


def table(summary: dict) -> str:
    rows = [
        [
            t["shape"],
            *(_us(t.get(p)) for p in PROVIDERS),
            t.get("cuda_over_plain", ""),
            t.get("cuda_over_3.5_copies", ""),
        ]
        for t in summary["timings"]
    ]
    tests = "; ".join(f"{name.removeprefix('test_')}: {line}" for name, line in summary["tests"].items())
    return "\n".join(
        [
            f"One layer's train step (forward with one power iteration + backward), eager float32, median µs, on "
            f"{summary['device']} (`benchmarks/gpu_check.sh`; smoke checks {summary['checks_passed']}/"
            f"{summary['checks']} passed; round mode {_round(summary['round'])}; {tests or 'no test logs'}):",
            "",
            markdown_table(["weight", *(f"{p} µs" for p in PROVIDERS), "cuda / plain", "cuda / 3.5 copies of W"], rows),
        ]
    )


def rewrite_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme}: no {START} ... {END} block to rewrite")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", content))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("gpu_results"), help="gpu_check.sh's output folder")
    p.add_argument("--readme", type=Path, help="rewrite this README's GPU table from the summary")
    p.add_argument(
        "--choose-round",
        nargs="*",
        choices=ROUND_MODES,
        metavar="MODE",
        help="only write round_mode.json from the modes that passed their check; print the chosen mode",
    )
    args = p.parse_args(argv)
    if args.choose_round is not None:
        record = choose_round(args.choose_round)
        (args.out / "round_mode.json").write_text(json.dumps(record) + "\n")
        print(f"rounds: SN_EXT_CUDA_ROUND={record['round']} for every later step: {record['why']}", file=sys.stderr)
        print(record["round"])
        return
    summary = summarize(args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    if args.readme:
        rewrite_readme(args.readme, table(summary))


if __name__ == "__main__":
    main()
