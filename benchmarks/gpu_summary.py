"""The last step of benchmarks/gpu_check.sh: one summary of a GPU run, and the README's GPU table made from it.

    python -m benchmarks.gpu_summary --out gpu_results                  # writes gpu_results/summary.json
    python -m benchmarks.gpu_summary --out gpu_results --readme README.md  # also rewrites README's GPU table

summary.json holds the device, the u-first round the run used (round_mode.json: fused, or split when the fused
round failed its check), the smoke step's checks (rounds.json's included: how many passed, the failures) and timings
(benchmarks/gpu_smoke.py), and each pytest log's last line (test_*.log). The README table sits between the
`<!-- gpu-table:start -->` and `<!-- gpu-table:end -->` lines.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .records import markdown_table

START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
PROVIDERS = ["plain", "torch", "sn_ext cuda", "sn_ext triton"]


def summarize(out: Path) -> dict:
    smoke_path = out / "smoke.json"
    smoke = json.loads(smoke_path.read_text()) if smoke_path.exists() else {"checks": [], "timings": []}
    rounds_path, round_path = out / "rounds.json", out / "round_mode.json"
    rounds = json.loads(rounds_path.read_text()) if rounds_path.exists() else {"checks": []}
    checks = rounds["checks"] + smoke["checks"]
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
            f"{summary['checks']} passed; u-first round {summary['round']['round']}; {tests or 'no test logs'}):",
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
    args = p.parse_args(argv)
    summary = summarize(args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    if args.readme:
        rewrite_readme(args.readme, table(summary))


if __name__ == "__main__":
    main()
