"""The discriminator's spectral norms during training (sn_ext.diagnostics): every layer's sigma at each log step
(metrics.jsonl, TensorBoard's train/sigma/<layer>), the spectral report at each evaluation (its rows and Lipschitz
bound in the evaluation's record: metrics.json, checkpoints, TensorBoard's eval/lipschitz_bound), and a plot of
the estimated vs the exact sigma per layer over training (OUT/sigma.png, written at the end from the evaluations'
records, so a resumed run plots the whole training).

The report's operator norms: sn_ext.spectral_report's power iteration (relative residual < 1e-3) capped at 200
rounds, on inputs of one sample of the data's shape, so that an evaluation stays cheap."""

from __future__ import annotations

import os

import torch
from torch import nn

import sn_ext

MAX_ITERS = 200


def sigma_record(D: nn.Module) -> dict:
    """{"sigma/<layer>": sigma} of every spectral norm in D (the sigma its last forward used; empty without SN)."""
    return {f"sigma/{name}": float(sigma) for name, sigma in sn_ext.sigmas(D).items()}


def report_record(D: nn.Module, data_shape: tuple, device: torch.device) -> dict:
    """The spectral report of D on inputs of shape (1, *data_shape), for an evaluation's record (empty without SN)."""
    report = sn_ext.spectral_report(D, torch.zeros(1, *data_shape, device=device), max_iters=MAX_ITERS)
    if not report.rows:
        return {}
    return {"lipschitz_bound": report.lipschitz_bound, "spectral_report": report.rows}


def plot(evals: list[dict], path: str) -> str | None:
    """A PNG of each layer's estimated (solid) and exact (dashed) sigma over the evaluations; None without SN."""
    evals = [m for m in evals if m.get("spectral_report")]
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    names = [row["name"] for row in evals[-1]["spectral_report"]]
    for i, name in enumerate(names):
        points = [(m["step"], r) for m in evals for r in m["spectral_report"] if r["name"] == name]
        steps = [s for s, _ in points]
        color = f"C{i % 10}"
        ax.plot(steps, [r["sigma"] for _, r in points], "-o", ms=3, color=color, label=f"{name} (estimate)")
        ax.plot(steps, [r["sigma_exact"] for _, r in points], "--", color=color, label=f"{name} (exact)")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma of the weight's matrix view")
    ax.set_title("D's spectral norms: power-iteration estimate vs exact")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
