"""What keeping sigma costs (issue 13: sn_ext.sigmas): a model's train-mode forward, per version of sn_ext's spectral
norm, timed and profiled (dispatched ops on the CPU, CUDA kernels on a GPU), next to the cost of the one statement
each layer's computation added to keep its sigma (``norm._sigma = sigma.data``: no op, no launch, no sync) and of
reading every sigma back with ``sn_ext.sigmas(model)``.

    python -m benchmarks.sigma_cost                 # cuda if available, else cpu
    python -m benchmarks.sigma_cost --quick --device cpu
    python -m benchmarks.sigma_cost --out benchmarks/results/cpu-amd-epyc   # also sigma_cost.md and .json

Keeping sigma adds no op to the forward (one per layer with the compiled kernels, whose op updates u and v in place;
grouped: one op for all the layers): tests/test_diagnostics.py checks it.
"""

from __future__ import annotations

import argparse
import json
import timeit
from pathlib import Path

import torch
from torch import nn

import sn_ext

from .op_count import KIND, count_ops
from .records import device_name
from .tables import markdown_table
from .timing import Step, measure

LAYERS = 8
WIDTH = 64


def _model(version: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, WIDTH, 3, padding=1)] + [nn.Conv2d(WIDTH, WIDTH, 3, padding=1) for _ in range(LAYERS - 1)]
    model = nn.Sequential(*layers).to(device)
    if version == "grouped":
        return sn_ext.grouped_spectral_norm(model)
    for layer in model:
        (sn_ext.spectral_norm if version == "parametrization" else sn_ext.legacy.spectral_norm)(layer)
    return model


def _a_norm(model: nn.Module):
    layer = model[0]
    if hasattr(layer, "parametrizations"):
        return layer.parametrizations.weight[0]
    return next(h for h in layer._forward_pre_hooks.values() if hasattr(h, "_sigma"))


def _row(version: str, device: torch.device, quick: bool) -> dict:
    model = _model(version, device).train()
    x = torch.randn(2, 3, 16, 16, device=device)
    forward = measure([Step(lambda: model(x))], device, budget_s=0.2 if quick else 1.0)  # autograd recording
    ops, _ = count_ops(lambda: model(x), device)
    read_ops, _ = count_ops(lambda: sn_ext.sigmas(model), device)
    norm, sigma = _a_norm(model), torch.ones((), device=device, requires_grad=True) * 2
    number = 2_000 if quick else 100_000

    def keep():  # the statement each layer's computation runs to keep its sigma
        norm._sigma = sigma.data

    keep_us = timeit.timeit(keep, number=number) / number * 1e6
    read_us = timeit.timeit(lambda: sn_ext.sigmas(model), number=number // 100) / (number // 100) * 1e6
    return {
        "version": version,
        "layers": LAYERS,
        "forward_us": forward["median_us"],
        "forward_ops": ops,
        "keep_us_per_layer": keep_us,
        "keep_share_pct": 100 * LAYERS * keep_us / forward["median_us"],
        "sigmas_read_us": read_us,
        "sigmas_read_ops": read_ops,
    }


def run(device: torch.device, quick: bool = False) -> list[dict]:
    return [_row(version, device, quick) for version in ("parametrization", "legacy", "grouped")]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sigma_cost", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="short timings (a smoke run, not for numbers)")
    p.add_argument("--out", type=Path, help="also write sigma_cost.md and sigma_cost.json here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = run(device, args.quick)
    lines = [
        f"# keeping sigma, {LAYERS} conv layers {WIDTH}x{WIDTH}x3x3, train-mode forward, {device_name(device)}",
        f"# ops: {KIND[device.type]}",
        "",
        markdown_table(list(rows[0]), [[f"{v:.3g}" if isinstance(v, float) else v for v in r.values()] for r in rows]),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sigma_cost.md").write_text("\n".join(lines) + "\n")
        (args.out / "sigma_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
