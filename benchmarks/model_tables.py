"""The device-time model's tables: every spectral-normalizable weight of sngan's CNN and ResNet discriminators and
generators (16x16 digits, 32x32 CIFAR-10, 48x48 STL-10) and a few larger ones, float32 and bfloat16, one train step
(forward with one power iteration, then backward) on an H100 and an H200, for the CUDA kernels (u-first fused, u-first
split, v-first) and the Triton ones; and sngan's CNN and ResNet discriminators (32x32) grouped, per forward +
backward. Writes cuda_model.md/.csv and triton_model.md/.csv (default: benchmarks/results/model/):

    python -m benchmarks.model_tables [--out DIR] [--label TEXT] [--no-triton]

The numbers are a model (benchmarks/device_model.py states every assumption); committed tables are the baseline a
kernel change is judged against: regenerate them with the change and compare.
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
from pathlib import Path

from . import cuda_plan
from . import device_model as dm
from .records import RESULTS_DIR, markdown_table

OUT = RESULTS_DIR / "model"
IMAGES = ((16, 1), (32, 3), (48, 3))  # (image size, channels): digits, CIFAR-10, STL-10
EXTRA = {  # weights the issues name that sngan's models at these sizes do not have
    (16384, 128): "a G's first Linear at 64x64",
    (1024, 1024): "large Linear",
    (4096, 4096): "bandwidth-bound reference",
}
DTYPES = ("float32", "bfloat16")
# The issue's table (#29; cuda_desk_review_2's model), fp32 fwd+bwd n = 1, u-first fused, cooperative, H100 unless
# noted: weight -> (sn_ext, plain, floor) as the review wrote them.
REVIEW = {
    ((64, 3, 3, 3), "h100"): ("35-50", "4-6", "~6"),
    ((128, 128, 3, 3), "h100"): ("21-29", "5-7", "~7"),
    ((256, 256, 3, 3), "h100"): ("23-29", "7-9", "~10"),
    ((512, 512, 3, 3), "h100"): ("65-84", "17-20", "~25"),
    ((1024, 1024), "h100"): ("34-41", "10-12", "~16"),
    ((4096, 4096), "h100"): ("175-188", "89-95", "~157"),
    ((4096, 4096), "h200"): ("130-143", "63-68", "~110"),
    ((1, 8192), "h100"): ("260-310", "~5", "~6"),
}
# (order, CUDA round mode) per row: u-first fused (the default), u-first split (the fallback), v-first fused (every
# legacy spectral norm: its own passes of the fused round, spectral_normalize_cuda.cu).
CUDA_MODES = (("u-first", "fused"), ("u-first", "split"), ("v-first", "fused"))
# The grouped rows add a model whose layers alternate the orders (legacy layers beside parametrized ones): the fused
# round runs both orders in one launch.
GROUPED_MODES = (*CUDA_MODES, ("mixed", "fused"))
GOALS = "fwd+bwd within 1.5x of the floor; v-first within 1.15x of u-first; 4096x4096 within 1.15x of 3.5 copies"


def sngan_weights() -> dict[tuple[tuple[int, ...], int], list[str]]:
    """{(shape, dim): [where it is used]} for every weight sngan.models.apply_spectral_norm would cover in the CNN and
    ResNet generators and discriminators (built on the meta device), dim as torch's default (1 for ConvTranspose)."""
    import torch

    from sngan import models

    found: dict[tuple[tuple[int, ...], int], list[str]] = {}
    makers = {
        "CNN D": models.CNNDiscriminator,
        "ResNet D": models.ResNetDiscriminator,
        "CNN G": models.CNNGenerator,
        "ResNet G": models.ResNetGenerator,
    }
    for size, channels in IMAGES:
        for name, make in makers.items():
            with torch.device("meta"):
                model = make(img_size=size, channels=channels)
            for module in model.modules():
                if isinstance(module, models._SN_TYPES):
                    dim = 1 if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) else 0
                    found.setdefault((tuple(module.weight.shape), dim), []).append(f"{name} {size}")
    for shape, where in EXTRA.items():
        found.setdefault((shape, 0), []).append(where)
    return dict(sorted(found.items(), key=lambda item: (math.prod(item[0][0]), item[0])))


def discriminator_weights(arch: str) -> list[tuple[int, ...]]:
    """The weights of sngan's 32x32 CNN or ResNet discriminator, in module order (all dim 0)."""
    import torch

    from sngan import models

    make = models.CNNDiscriminator if arch == "cnn" else models.ResNetDiscriminator
    with torch.device("meta"):
        model = make(img_size=32, channels=3)
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, models._SN_TYPES)]


def text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def ratio(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """a / b at each end of the ranges (each end one consistent set of assumptions)."""
    return a[0] / b[0], a[1] / b[1]


def fmt_ratio(r: tuple[float, float]) -> str:
    """A ratio's range, smaller first (the low-latency end may give the larger ratio)."""
    low, high = sorted(r)
    return f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}"


def step_row(ops: list[dm.Op], shape, dtype: str, gpu: dm.Gpu) -> dict:
    """The common columns of one modelled train step."""
    sn = dm.step_us(ops, gpu)
    plain, floor = dm.plain_us(shape, dtype, gpu), dm.floor_us(shape, dtype, gpu)
    return {
        "sn_ext_us": cuda_plan.us(sn),
        "plain_us": cuda_plan.us(plain),
        "floor_us": cuda_plan.us(floor),
        "x_floor": fmt_ratio(ratio(sn, floor)),
        "x_plain": fmt_ratio(ratio(sn, plain)),
        "launches": sum(op.launches for op in ops),
        "grid_barriers": sum(op.grid_barriers for op in ops),
        "passes": sum(op.weight_passes for op in ops),
        "MB": f"{sum(op.bytes for op in ops) / 1e6:.4g}",
        "dominant": dm.dominant(ops, gpu),
        "phases": "; ".join(
            f"{p.name} {cuda_plan.us((p.time_us(gpu, 0), p.time_us(gpu, 1)))}" for op in ops for p in op.phases
        ),
        "_sn": sn,
        "_floor": floor,
    }


def cuda_rows(weights) -> list[dict]:
    rows = []
    for gpu in dm.GPUS.values():
        for dtype in DTYPES:
            for (shape, dim), where in weights.items():
                w = cuda_plan.Weight.of(shape, dm.ITEMSIZE[dtype], dim)
                for order, mode in CUDA_MODES:
                    ops = cuda_plan.train_step([w], gpu, 1, mode, order == "v-first")
                    row = {"gpu": gpu.key, "dtype": dtype, "weight": text(shape), "dim": dim}
                    row |= {"matrix": f"{w.rows}x{w.cols}", "used in": ", ".join(where), "order": order}
                    row |= {"round": mode, "launch": ops[0].launch, "grid": ops[0].grid}
                    rows.append(row | step_row(ops, shape, dtype, gpu))
    return rows


def grouped_rows() -> list[dict]:
    """sngan's 32x32 discriminators grouped (one forward and one backward launch per 12 layers), against the same
    layers one by one."""
    rows = []
    for gpu in dm.GPUS.values():
        for dtype in DTYPES:
            for arch, name in (("cnn", "CNN D 32"), ("resnet", "ResNet D 32")):
                shapes = discriminator_weights(arch)
                weights = [cuda_plan.Weight.of(s, dm.ITEMSIZE[dtype]) for s in shapes]
                for order, mode in GROUPED_MODES:
                    orders = [order == "v-first" or (order == "mixed" and i % 2 == 0) for i in range(len(weights))]
                    grouped = cuda_plan.train_step(weights, gpu, 1, mode, orders)
                    single = [op for w, o in zip(weights, orders) for op in cuda_plan.train_step([w], gpu, 1, mode, o)]
                    floor = dm.group_floor_us(sum(dm.weight_bytes(s, dtype) for s in shapes), gpu)
                    sn = dm.step_us(grouped, gpu)
                    rows.append(
                        {
                            "gpu": gpu.key,
                            "dtype": dtype,
                            "model": f"{name} ({len(shapes)} layers)",
                            "order": order,
                            "round": mode,
                            "grouped_us": cuda_plan.us(sn),
                            "grouped_launches": sum(op.launches for op in grouped),
                            "per_layer_us": cuda_plan.us(dm.step_us(single, gpu)),
                            "per_layer_launches": sum(op.launches for op in single),
                            "floor_us": cuda_plan.us(floor),
                            "x_floor": fmt_ratio(ratio(sn, floor)),
                            "dominant": dm.dominant(grouped, gpu),
                        }
                    )
    return rows


def triton_rows(weights) -> list[dict]:
    from . import triton_model

    rows = []
    for gpu in dm.GPUS.values():
        for dtype in DTYPES:
            for (shape, dim), where in weights.items():
                for order in ("u-first", "v-first"):
                    v_first = order == "v-first"
                    ops = triton_model.train_step(shape, dtype, gpu, 1, v_first, dim)
                    forward_plan = triton_model.plans(shape, dtype, 1, v_first, dim)[0]
                    m = forward_plan.layout.matrix
                    row = {"gpu": gpu.key, "dtype": dtype, "weight": text(shape), "dim": dim}
                    row |= {"matrix": f"{m.rows}x{m.cols}", "used in": ", ".join(where), "order": order}
                    row |= {"path": triton_model.path(forward_plan)}
                    rows.append(row | step_row(ops, shape, dtype, gpu))
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row if not k.startswith("_")))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _pick(rows, **match) -> dict:
    (row,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return row


def review_table(rows: list[dict]) -> str:
    """The issue's table (#29) from the model, beside the review's numbers."""
    out = []
    for (shape, gpu), (review_sn, review_plain, review_floor) in REVIEW.items():
        r = _pick(rows, gpu=gpu, dtype="float32", weight=text(shape), dim=0, order="u-first", round="fused")
        out.append(
            [
                f"{text(shape)} ({gpu.upper()})",
                r["sn_ext_us"],
                review_sn,
                r["plain_us"],
                review_plain,
                r["floor_us"],
                review_floor,
                r["x_floor"],
                r["dominant"],
            ]
        )
    headers = ["fp32 fwd+bwd, n = 1", "model sn_ext", "review", "model plain", "review", "model floor", "review"]
    return markdown_table([*headers, "x floor", "dominant term"], out)


def cuda_wide_table(rows: list[dict], gpu: str, dtype: str) -> str:
    """One line per weight: u-first fused, u-first split and v-first (fused) side by side."""
    out = []
    for r in rows:
        if (r["gpu"], r["dtype"], r["order"], r["round"]) != (gpu, dtype, "u-first", "fused"):
            continue
        key = dict(gpu=gpu, dtype=dtype, weight=r["weight"], dim=r["dim"])
        split = _pick(rows, **key, order="u-first", round="split")
        v_first = _pick(rows, **key, order="v-first", round="fused")
        weight = r["weight"] + (f" (dim {r['dim']})" if r["dim"] else "")
        out.append(
            [
                weight,
                r["used in"],
                r["plain_us"],
                r["floor_us"],
                r["sn_ext_us"],
                r["x_floor"],
                r["x_plain"],
                f"{r['launches']} / {r['grid_barriers']}",
                r["dominant"],
                split["sn_ext_us"],
                split["x_floor"],
                v_first["sn_ext_us"],
                fmt_ratio(ratio(v_first["_sn"], r["_sn"])),
            ]
        )
    headers = ["weight", "used in", "plain", "floor", "fused", "x floor", "x plain", "launches / barriers"]
    headers += ["dominant (fused)", "split", "x floor", "v-first", "v-first / fused"]
    return markdown_table(headers, out)


def goals_table(rows: list[dict], path_key: str = "round", fused: str = "fused", v_first_round: str = "fused") -> str:
    """Per GPU and dtype: the sngan weights farthest from their floor, v-first against u-first, and 4096x4096
    against 3.5 copies."""
    out = []
    for gpu in dm.GPUS:
        for dtype in DTYPES:
            mine = [r for r in rows if r["gpu"] == gpu and r["dtype"] == dtype and r["order"] == "u-first"]
            if path_key == "round":
                mine = [r for r in mine if r["round"] == fused]
            sngan = [r for r in mine if not any(e in r["used in"] for e in EXTRA.values())]
            worst = sorted(sngan, key=lambda r: -r["_sn"][0] / r["_floor"][0])
            within = sum(r["_sn"][1] / r["_floor"][1] <= 1.5 for r in sngan)
            v_ratios = []
            for r in mine:
                match = dict(gpu=gpu, dtype=dtype, weight=r["weight"], dim=r["dim"], order="v-first")
                if path_key == "round":
                    match["round"] = v_first_round
                v_ratios.append((_pick(rows, **match)["_sn"][1] / r["_sn"][1], r["weight"]))
            big = _pick(mine, weight="4096x4096")
            copies = dm.copies_us((4096, 4096), dtype, gpu)
            to_copies = fmt_ratio((big["_sn"][0] / copies, big["_sn"][1] / copies))
            out.append(
                [
                    gpu.upper(),
                    dtype,
                    f"{within} of {len(sngan)}",
                    ", ".join(f"{r['weight']} {r['x_floor']}" for r in worst[:4]),
                    "{:.2f} ({})".format(*max(v_ratios)),
                    f"{big['sn_ext_us']} / {copies:.3g} = {to_copies}",
                ]
            )
    headers = ["GPU", "dtype", "sngan weights within 1.5x of floor", "farthest from their floor (x floor)"]
    headers += ["worst v-first / u-first (high ends)", "4096x4096 / 3.5 copies"]
    return markdown_table(headers, out)


ASSUMPTIONS = (
    "Assumptions (`benchmarks/device_model.py`, every number with its source): copy bandwidth 3.0 TB/s (H100) and "
    "4.3 TB/s (H200), read + write, as measured on the project's GPU machines; 132 SMs; L2 50 / 60 MB; per step "
    "of a chain, low-high: loaded DRAM round trip 0.7-1.2 µs, L2 round trip 0.15-0.3, block_sum 0.2-0.3, "
    "__syncthreads 0.05-0.075, grid barrier 1-2, launch 2-4 (cuda_desk_review_2's model inputs). A phase takes "
    "max(bytes / bandwidth, its slowest block's chain); an op adds its phases, grid barriers and launches. "
    "`low` is every latency at its low end, `high` every one at its high end; ratios compare like ends. Floor: 7 "
    "weight-sized passes at the copy bandwidth plus 2 launches; plain: `W * 1.0` forward + backward, 4 passes and "
    "2 launches. Nothing here ran on a GPU."
)


def cuda_markdown(rows, grouped, label: str) -> str:
    parts = [
        f"# CUDA kernels: modelled device time per train step ({label})",
        "",
        "Generated by `python -m benchmarks.model_tables` from the launch plan of `csrc/cuda` as mirrored by "
        "`benchmarks/cuda_plan.py` (`python -m benchmarks.cuda_plan --phases --shape S` prints one weight's phases, "
        "chains and bytes). One train step: the forward with one power iteration, then the backward, one layer, "
        "a contiguous weight, cooperative launches. µs, low-high.",
        "",
        ASSUMPTIONS,
        "",
        "## The issue's table (#29), from the model",
        "",
        review_table(rows),
        "",
        f"## Goals (#29: {GOALS}), u-first fused",
        "",
        goals_table(rows),
        "",
        "## sngan's discriminators grouped (one forward and one backward launch per 12 layers)",
        "",
        markdown_table(list(grouped[0]), [list(r.values()) for r in grouped]),
        "",
    ]
    for gpu in dm.GPUS.values():
        for dtype in DTYPES:
            parts += [f"## {gpu.name} (model), {dtype}", "", cuda_wide_table(rows, gpu.key, dtype), ""]
    return "\n".join(parts)


def triton_wide_table(rows: list[dict], gpu: str, dtype: str) -> str:
    out = []
    for r in rows:
        if (r["gpu"], r["dtype"], r["order"]) != (gpu, dtype, "u-first"):
            continue
        v_first = _pick(rows, gpu=gpu, dtype=dtype, weight=r["weight"], dim=r["dim"], order="v-first")
        weight = r["weight"] + (f" (dim {r['dim']})" if r["dim"] else "")
        out.append(
            [
                weight,
                r["path"],
                r["plain_us"],
                r["floor_us"],
                r["sn_ext_us"],
                r["x_floor"],
                r["x_plain"],
                r["launches"],
                r["dominant"],
                v_first["sn_ext_us"],
                fmt_ratio(ratio(v_first["_sn"], r["_sn"])),
            ]
        )
    headers = ["weight", "path", "plain", "floor", "u-first", "x floor", "x plain", "launches", "dominant"]
    return markdown_table([*headers, "v-first", "v-first / u-first"], out)


def triton_markdown(rows, label: str) -> str:
    parts = [
        f"# Triton kernels: modelled device time per train step ({label})",
        "",
        "Generated by `python -m benchmarks.model_tables` from the launch plans the Triton ops make "
        "(`sn_ext/triton`), modelled by `benchmarks/triton_model.py` (`python -m benchmarks.triton_model --shape S` "
        "prints one weight's launches). One train step: the forward with one power iteration, then the backward, "
        "one layer, a contiguous weight. µs, low-high. Device time only: the eager host time per launch "
        f"({dm.TRITON_HOST_US_PER_LAUNCH[0]:g}-{dm.TRITON_HOST_US_PER_LAUNCH[1]:g} µs, triton_desk_review_2) is "
        "not in it.",
        "",
        ASSUMPTIONS,
        "",
        f"## Goals (#30: 4096x4096 fp32 within 1.2x of its floor, 512x512x3x3 within 1.5x; #29's: {GOALS})",
        "",
        goals_table(rows, path_key="path"),
        "",
    ]
    for gpu in dm.GPUS.values():
        for dtype in DTYPES:
            parts += [f"## {gpu.name} (model), {dtype}", "", triton_wide_table(rows, gpu.key, dtype), ""]
    return "\n".join(parts)


def kernels_label() -> str:
    """ "kernels at <the last commit that changed csrc/cuda or sn_ext/triton>", or "kernels" outside git."""
    try:
        sha = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", "csrc/cuda", "sn_ext/triton"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "kernels"
    return f"kernels at {sha}" if sha else "kernels"


def write(out: Path = OUT, label: str | None = None, triton: bool = True, stem: str = "cuda_model") -> list[Path]:
    """Writes the tables into `out` (the CUDA ones as `stem`.md and .csv); returns the files written."""
    label = label or kernels_label()
    out.mkdir(parents=True, exist_ok=True)
    weights = sngan_weights()
    rows, grouped = cuda_rows(weights), grouped_rows()
    written = [out / f"{stem}.md", out / f"{stem}.csv"]
    written[0].write_text(cuda_markdown(rows, grouped, label))
    write_csv(written[1], rows + grouped)
    if triton:
        rows = triton_rows(weights)
        written += [out / "triton_model.md", out / "triton_model.csv"]
        written[2].write_text(triton_markdown(rows, label))
        write_csv(written[3], rows)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_tables", description=__doc__)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--label", help="what the tables model, for their titles (default: the kernels' last commit)")
    p.add_argument("--no-triton", action="store_true", help="the CUDA tables only (the Triton model needs triton)")
    p.add_argument("--stem", default="cuda_model", help="the CUDA tables' file names (default: cuda_model.md, .csv)")
    args = p.parse_args(argv)
    for path in write(args.out, args.label, not args.no_triton, args.stem):
        print(path)


if __name__ == "__main__":
    main()
