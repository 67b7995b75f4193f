"""Where results go and what every row says about the run: device, versions, threads, commit, date; CSV files
written row by row (so a run stopped by a timeout keeps what it measured) and read back for the report."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from .tables import markdown_table  # noqa: F401  (benchmarks/cuda_plan.py imports it from here)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
META_COLUMNS = ["device", "threads", "torch", "triton", "cuda", "sn_ext", "sn_ext_compiled", "python", "commit", "date"]


def timing_columns(keys: Sequence[str], extra: Sequence[str] = (), unit: str = "us") -> list[str]:
    """A timed section's CSV columns: what a row measured (`keys`), timing.summarize's statistics in `unit`, the
    section's own derived columns (`extra`), then how it was timed and whether it worked."""
    statistics = [f"median_{unit}", f"p20_{unit}", f"p80_{unit}"]
    return [*keys, *statistics, *extra, "reps", "repeats", "rotation", "spread", "faults_per_call", "status", "note"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    """The results folder's name: the device type and model, e.g. cpu-amd-epyc, cuda-nvidia-h100-80gb-hbm3."""
    words = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", device_name(device).lower())
    return "-".join([device.type, *re.findall(r"[a-z0-9]+", words)])[:60]


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_metadata(device: torch.device) -> dict:
    """The columns every CSV row carries (META_COLUMNS)."""
    import sn_ext

    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "",
        "sn_ext": sn_ext.__version__,
        "sn_ext_compiled": sn_ext.ops.library_status.loaded,
        "python": platform.python_version(),
        "commit": _commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


class RowWriter:
    """A CSV file of `columns` + META_COLUMNS, (over)written from the start and flushed after every row."""

    def __init__(self, path: Path, columns: list[str], meta: dict):
        os.makedirs(path.parent, exist_ok=True)
        self.path, self.meta = path, meta
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=[*columns, *META_COLUMNS], restval="")
        self._writer.writeheader()
        self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({**row, **self.meta})
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rounded(values: dict) -> dict:
    """Floats to 2 decimals, for the CSV."""
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in values.items()}


def failure(error: Exception) -> str:
    """An exception as one short line, for a CSV note."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def log(message: str) -> None:
    """A progress line."""
    print(message, flush=True)
