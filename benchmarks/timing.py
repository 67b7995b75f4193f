"""Timing and result-recording helpers shared by the benchmarks."""
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, *, reps: int, warmup: int,
              before: Callable[[], None] | None = None) -> dict:
    """Median and 20th/80th percentiles (microseconds) of `fn`, timed one call at a time after a warm-up.

    `before` runs outside the timed region (e.g. clearing .grad so every call does the same work).
    """
    for _ in range(warmup):
        if before:
            before()
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        if before:
            before()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e6)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else samples * 9
    return {"median_us": statistics.median(samples), "p20_us": q[1], "p80_us": q[7], "reps": reps}


def run_metadata(device: torch.device) -> dict:
    import sn_ext

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "sn_ext": sn_ext.__version__,
        "sn_ext_compiled": sn_ext.ops.library_status.loaded,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    os.makedirs(path.parent, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
