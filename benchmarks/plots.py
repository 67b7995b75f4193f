"""The report's PNG plots, from the sections' CSV rows (see report.py for the rows)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "plain": dict(color="0.5", linestyle="--"),
    "none": dict(color="0.5"),
    "torch": dict(color="tab:red"),
    "torch legacy": dict(color="tab:orange"),
    "torch compiled": dict(color="tab:purple"),
    "sn_ext": dict(color="tab:blue"),
    "sn_ext cpu": dict(color="tab:blue"),
    "sn_ext cuda": dict(color="tab:blue"),
    "sn_ext triton": dict(color="tab:cyan"),
    "sn_ext reference": dict(color="tab:blue", linestyle=":"),
    "sn_ext grouped": dict(color="tab:green"),
    "sn_ext_grouped": dict(color="tab:green"),
}


def _style(provider: str) -> dict:
    return STYLE.get(provider, {})


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_plot(tables: dict[tuple[str, str], dict[str, list[tuple[float, float]]]], path: Path) -> Path:
    """tables: (dtype, mode) -> provider -> [(params, median µs)]: time vs weight size, one panel each, a row per
    dtype and a column per mode."""
    dtypes = list(dict.fromkeys(d for d, _ in tables))
    modes = list(dict.fromkeys(m for _, m in tables))
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(4.6 * len(modes), 4 * len(dtypes)), squeeze=False)
    for (dtype, mode), series in tables.items():
        ax = axes[dtypes.index(dtype)][modes.index(mode)]
        for provider, points in series.items():
            ax.plot(*zip(*points), marker="o", markersize=3, label=provider, **_style(provider))
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="weight elements",
            ylabel="µs per call (median)",
            title=f"one layer, {mode}, {dtype}",
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def layers_plot(series: dict[str, list[tuple[int, float, int]]], layer_shape: str, ops_kind: str, path: Path) -> Path:
    """series: provider -> [(L, median µs, ops)]: time and op count vs number of layers."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for provider, points in series.items():
        counts, times, ops = zip(*points)
        left.plot(counts, times, marker="o", markersize=3, label=provider, **_style(provider))
        right.plot(counts, ops, marker="o", markersize=3, label=provider, **_style(provider))
    left.set(
        xscale="log",
        yscale="log",
        xlabel="layers L",
        ylabel="µs per forward + backward (median)",
        title=f"all spectral norms of L layers of {layer_shape}",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="layers L",
        ylabel=ops_kind.split(" (")[0],
        title="ops per forward + backward",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(
            sorted({c for pts in series.values() for c, _, _ in pts}),
            labels=[str(c) for c in sorted({c for pts in series.values() for c, _, _ in pts})],
        )
    left.legend(fontsize=7)
    return _save(fig, path)


def gan_plot(panels: dict[str, dict[str, dict[str, float]]], steps: list[str], path: Path) -> Path:
    """panels: title -> sn kind -> step -> ms: bars of each step's time relative to no SN, labelled in ms."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, kinds) in zip(axes[0], panels.items()):
        base = kinds.get("none", {})
        width = 0.8 / max(1, len(kinds))
        for i, (kind, times) in enumerate(kinds.items()):
            xs = [j + (i - (len(kinds) - 1) / 2) * width for j, step in enumerate(steps) if step in times]
            ratios = [times[s] / base[s] if base.get(s) else float("nan") for s in steps if s in times]
            bars = ax.bar(xs, ratios, width, label=kind, color=_style(kind).get("color"))
            ax.bar_label(bars, [f"{times[s]:.3g}" for s in steps if s in times], fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="0.4", linewidth=0.8)
        ax.set_xticks(range(len(steps)), labels=steps)
        ax.set(ylabel="time / time without SN (bar labels: ms)", title=title)
        ax.margins(y=0.25)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)
