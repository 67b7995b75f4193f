"""report.md (and its plots) from the CSVs and settings a run left in its folder: one part per section found."""

from __future__ import annotations

import json
from pathlib import Path

from sn_ext.backends import AUTO_ORDER

from . import allocator, gan_step, layer, memory, op_count, ops, plots, spectral_normalize_grouped, variants
from .records import read_rows
from .tables import markdown_table


def _f(x: float) -> str:
    """A time for a table: 3 significant digits, no exponent."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def _median(row: dict | None, key: str = "median_us") -> float | None:
    return float(row[key]) if row and row.get("status") == "ok" and row.get(key) else None


def _not_measured(rows: list[dict]) -> list[str]:
    """Lines saying what was skipped or failed, and why (none when everything ran)."""
    seen = {}
    for r in rows:
        if r["status"] != "ok":
            seen.setdefault(r.get("provider") or f"{r['sn']}, {r['mode']}", f"{r['status']}: {r['note']}")
    return ["Not measured:", *(f"- {name}: {why}" for name, why in seen.items())] if seen else []


def _header(rows: list[dict], settings: dict) -> str:
    r = rows[0]
    quick = " **Quick run (smoke test): not for numbers.**" if settings.get("quick") else ""
    return (
        f"_{r['device']}, {r['threads']} CPU threads; torch {r['torch']}, triton {r['triton']}, "
        f"CUDA {r['cuda'] or '-'}, sn_ext {r['sn_ext']} (compiled kernels: {r['sn_ext_compiled']}); commit "
        f"{r['commit']}, {r['date']}; host malloc: {settings.get('malloc', allocator.SYSTEM)}; "
        f"`{settings.get('command', '')}`._{quick}"
    )


def _sn_ext_choice(rows: list[dict], device_type: str) -> str:
    """The provider "auto" picks (the first of its order that ran), for the ratio columns."""
    ran = {r["provider"] for r in rows if r["status"] == "ok"}
    return next((f"sn_ext {b}" for b in AUTO_ORDER.get(device_type, ()) if f"sn_ext {b}" in ran), "sn_ext reference")


def _shape_table(
    sub: list[dict], providers: list[str], device_type: str, versus: list[str], floor: str
) -> tuple[str, dict] | None:
    """One (dtype, mode or op) slice of the rows: a table of µs per weight shape and provider, with the ratios of
    each of `versus` to sn_ext's choice and of that choice to `floor`; and the curves for the plot (provider ->
    [(params, µs)] by size). None when nothing ran."""
    ran = [p for p in providers if any(r["provider"] == p and r["status"] == "ok" for r in sub)]
    if not ran:
        return None
    ours = _sn_ext_choice(sub, device_type)
    versus = [p for p in versus if p in ran]
    cell = {(r["shape"], r["provider"]): r for r in sub}
    shapes = list(dict.fromkeys(r["shape"] for r in sub))
    table = []
    for shape in shapes:
        t = {p: _median(cell.get((shape, p))) for p in ran}
        table.append(
            [
                shape,
                cell[(shape, ran[0])]["params"],
                *(_f(t[p]) if t[p] else "" for p in ran),
                *(_ratio(t.get(p), t[ours]) for p in versus),
                _ratio(t[ours], t.get(floor)),
            ]
        )
    header = ["weight", "params", *[f"{p} µs" for p in ran], *[f"{p} / {ours}" for p in versus], f"{ours} / {floor}"]
    curves = {
        p: sorted((int(cell[(s, p)]["params"]), _median(cell[(s, p)])) for s in shapes if _median(cell.get((s, p))))
        for p in ran
    }
    return markdown_table(header, table), curves


def layer_part(rows: list[dict], settings: dict, out: Path) -> str:
    parts = [
        "## One layer\n",
        _header(rows, settings),
        "\nMedian µs per call (CSV: 20th/80th percentiles, repetitions, rotation). forward: the forward with one "
        "power iteration, autograd recording; backward: the backward alone (its forward untimed); train: the full "
        "step, forward + backward; eval: forward under no_grad. plain = `W * 1.0`, the floor of any autograd op on "
        "the weight.\n",
    ]
    device_type = settings.get("device_type", "cpu")
    curves = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for mode in layer.MODES:
            sub = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            made = _shape_table(sub, layer.PROVIDERS, device_type, ["torch", "torch compiled"], "plain")
            if made:
                parts += [f"\n### {mode}, {dtype}\n", made[0]]
                curves[(dtype, mode)] = made[1]
    png = plots.layer_plot(curves, out / "layer.png")
    parts += [f"\n![time vs weight size]({png.name})\n", *_not_measured(rows)]
    return "\n".join(parts) + "\n"


def host_part(rows: list[dict], settings: dict, out: Path) -> str:
    table = [
        [r["call"], r["path"], _f(float(r["median_us"])), _f(float(r["plain_us"])), r["vs_plain"], r["ratio_spread"]]
        for r in rows
        if r["status"] == "ok"
    ]
    return (
        "\n".join(
            [
                "## One layer: host overhead of the Triton backend\n",
                _header(rows, settings),
                f"\nHost µs per call on the CPU for a {settings.get('shape', '')} float32 weight, the Triton launches "
                "stubbed (sn_ext/triton/_dry_run.py): what eager Triton costs the host before any GPU time, on any "
                "machine. module train: `module.weight` (one power iteration) and its backward by autograd; ops "
                "train: the ops under autograd; forward op, backward op: alone. grid: the multi-launch path forced "
                "on the same weight. Each row timed interleaved with plain (`W * 1.0` forward + backward); ratio "
                "spread: how much the blocks' ratios differ. Goal: module train at most 2x plain.\n",
                markdown_table(["call", "path", "µs", "plain µs", "vs plain", "ratio spread"], table),
                *_not_measured(rows),
            ]
        )
        + "\n"
    )


def layers_part(rows: list[dict], settings: dict, out: Path) -> str:
    kind = op_count.KIND[settings.get("device_type", "cpu")]
    ran = [
        p for p in spectral_normalize_grouped.PROVIDERS if any(r["provider"] == p and r["status"] == "ok" for r in rows)
    ]
    cell = {(r["layers"], r["provider"]): r for r in rows}
    counts = list(dict.fromkeys(r["layers"] for r in rows))
    table = []
    for n in counts:
        t = {p: _median(cell.get((n, p))) for p in ran}
        ops = {p: cell[(n, p)]["ops"] if (n, p) in cell else "" for p in ran}
        table.append(
            [
                n,
                *(f"{_f(t[p])} ({ops[p]})" if t[p] else "" for p in ran),
                _ratio(t.get("torch"), t.get("sn_ext grouped")),
                _ratio(t.get("sn_ext"), t.get("sn_ext grouped")),
                _ratio(t.get("sn_ext grouped"), t.get("plain")),
            ]
        )
    shape = rows[0]["layer_shape"]
    png = plots.layers_plot(
        {
            p: [(int(n), _median(cell[(n, p)]), int(cell[(n, p)]["ops"])) for n in counts if _median(cell.get((n, p)))]
            for p in ran
        },
        shape,
        kind,
        out / "layers.png",
    )
    return (
        "\n".join(
            [
                "## Many layers\n",
                _header(rows, settings),
                f"\nA model of L layers of {shape} ({rows[0]['dtype']}) whose forward returns every layer's normalized "
                "weight, then the backward of one gradient per weight (train mode): spectral norm is all the step "
                f"does. Cells: median µs per forward + backward (in parentheses: {kind}, one step profiled). sn_ext = "
                "sn_ext.spectral_norm on each layer; sn_ext grouped = sn_ext.grouped_spectral_norm(model).\n",
                markdown_table(
                    ["L", *[f"{p} µs (ops)" for p in ran], "torch / grouped", "sn_ext / grouped", "grouped / plain"],
                    table,
                ),
                f"\n![time and ops vs layers]({png.name})\n",
                *_not_measured(rows),
            ]
        )
        + "\n"
    )


def ops_part(rows: list[dict], settings: dict, out: Path) -> str:
    parts = [
        "## Each op\n",
        _header(rows, settings),
        "\nMedian µs per direct call of the op (no module, no autograd), one power iteration, dim 0. floor: the "
        "cheapest torch op that reads and writes what the op must at least (W * 1.0 for the forward, G - W_sn for "
        "the backward, W v for a power-iteration round); sn_ext reference: the op in plain torch ops, what torch's "
        "eager spectral norm launches.\n",
    ]
    device_type = settings.get("device_type", "cpu")
    curves = {}
    for op_name in dict.fromkeys(r["op"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            sub = [r for r in rows if r["op"] == op_name and r["dtype"] == dtype]
            made = _shape_table(sub, ops.providers(op_name), device_type, ["sn_ext reference"], "floor")
            if made:
                parts += [f"\n### {op_name}, {dtype}\n", made[0]]
                curves[(dtype, op_name)] = made[1]
    png = plots.layer_plot(curves, out / "ops.png")
    parts += [f"\n![time vs weight size, per op]({png.name})\n", *_not_measured(rows)]
    return "\n".join(parts) + "\n"


def gan_part(rows: list[dict], settings: dict, out: Path) -> str:
    device_type = settings.get("device_type", "cpu")
    batch, width = settings.get("batch"), settings.get("width")
    caveats = []
    if batch != 64:
        why = " (quick run)" if settings.get("quick") else " (the CPU default)" if device_type == "cpu" else ""
        caveats.append(f"batch {batch} instead of the paper's 64{why}")
    if width != 1.0:
        caveats.append(f"channel width x{width}")
    if not settings.get("compile"):
        caveats.append("torch.compile not run (--quick or --no-compile)")
    parts = [
        "## SN-GAN training steps\n",
        _header(rows, settings),
        f"\nsngan's standard CNN and ResNet for 32x32, hinge loss, Adam, random data, batch {batch}"
        + (f" ({'; '.join(caveats)})" if caveats else "")
        + ". Median ms per D step, G step and iteration "
        f"(n_dis = {gan_step.N_DIS} D steps + 1 G step); peak memory: {memory.KIND[device_type]}.\n",
    ]
    cell = {(r["mode"], r["arch"], r["sn"], r["step"]): r for r in rows}
    panels = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for arch in dict.fromkeys(r["arch"] for r in rows):
            table, kinds = [], {}
            for sn in dict.fromkeys(r["sn"] for r in rows):
                t = {s: _median(cell.get((mode, arch, sn, s)), "median_ms") for s in gan_step.STEPS}
                it = t["iteration"]
                base = _median(cell.get((mode, arch, "none", "iteration")), "median_ms")
                ref = _median(cell.get((mode, arch, "torch", "iteration")), "median_ms")
                peak = cell.get((mode, arch, sn, "iteration"), {}).get("peak_mib") or "n/a"
                table.append(
                    [sn, *(_f(t[s]) if t[s] else "" for s in gan_step.STEPS), _ratio(it, base), _ratio(it, ref), peak]
                )
                kinds[sn] = {s: v for s, v in t.items() if v}
            if any(kinds.values()):
                parts += [
                    f"\n### {arch}, {mode}\n",
                    markdown_table(
                        [
                            "spectral norm on D",
                            *[f"{s} ms" for s in gan_step.STEPS],
                            "iteration / no SN",
                            "iteration / torch SN",
                            "peak MiB",
                        ],
                        table,
                    ),
                ]
                panels[f"{arch}, {mode}"] = kinds
    if panels:
        png = plots.gan_plot(panels, list(gan_step.STEPS), out / "gan.png")
        parts.append(f"\n![GAN steps relative to no SN]({png.name})\n")
    parts += _not_measured(rows)
    return "\n".join(parts) + "\n"


def bandwidth_part(rows: list[dict], settings: dict, out: Path) -> str:
    table = [
        [
            r["shape"],
            r["dtype"],
            r["provider"],
            _f(float(r["median_us"])),
            r["bytes"],
            r["effective_gbps"],
            f"{float(r['of_copy']):.0%}" if r["of_copy"] else "",
        ]
        for r in rows
        if r["status"] == "ok"
    ]
    return (
        "\n".join(
            [
                "## Bandwidth\n",
                _header(rows, settings),
                "\nA train step (forward with one power iteration + backward) must make at least 7 weight-sized "
                "passes (read W for the round; read W, write W_sn; read G and W_sn for <G, W_sn>; read G, write "
                "grad_W); a copy makes 2. Effective GB/s = the bytes of those passes / the median time; the last "
                "column compares it with the copy's.\n",
                markdown_table(["weight", "dtype", "provider", "µs", "bytes", "effective GB/s", "of copy"], table),
                *_not_measured(rows),
            ]
        )
        + "\n"
    )


def variants_part(rows: list[dict], settings: dict, out: Path) -> str:
    """Per dtype and mode: µs per shape and provider; the cost of each variant over plain spectral norm in sn_ext
    (the backend "auto" picks) and the hand-written PyTorch equivalent's time over sn_ext's."""
    parts = [
        "## Variants: bounded spectral norm and sigma-reparam\n",
        _header(rows, settings),
        f"\nMedian µs per call, the modes of the layer section; bounded: coeff {variants.COEFF}; torch: the variant "
        "written on torch's parametrization (benchmarks/variants.py). The ratio columns use sn_ext's backend that "
        '"auto" picks here.\n',
    ]
    device_type = settings.get("device_type", "cpu")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for mode in variants.MODES:
            sub = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode and r["status"] == "ok"]
            if not sub:
                continue
            backend = next(
                (b for b in AUTO_ORDER.get(device_type, ()) if any(r["provider"] == f"plain: sn_ext {b}" for r in sub)),
                None,
            )
            ran = [p for p in variants.PROVIDERS if any(r["provider"] == p for r in sub)]
            cell = {(r["shape"], r["provider"]): _median(r) for r in sub}
            ratios = []
            if backend:
                ours = {v: f"{v}: sn_ext {backend}" for v in variants.VARIANTS}
                ratios = [
                    (f"bounded / plain ({backend})", ours["bounded"], ours["plain"]),
                    (f"sigma-reparam / plain ({backend})", ours["sigma-reparam"], ours["plain"]),
                    ("bounded: torch / sn_ext", "bounded: torch", ours["bounded"]),
                    ("sigma-reparam: torch / sn_ext", "sigma-reparam: torch", ours["sigma-reparam"]),
                ]
            table = []
            for shape in dict.fromkeys(r["shape"] for r in sub):
                times = [cell.get((shape, p)) for p in ran]
                table.append(
                    [
                        shape,
                        *(_f(t) if t else "" for t in times),
                        *(_ratio(cell.get((shape, a)), cell.get((shape, b))) for _, a, b in ratios),
                    ]
                )
            header = ["weight", *[f"{p} µs" for p in ran], *[name for name, _, _ in ratios]]
            parts += [f"\n### {mode}, {dtype}\n", markdown_table(header, table)]
    parts += _not_measured(rows)
    return "\n".join(parts) + "\n"


PARTS = {
    "layer": layer_part,
    "host": host_part,
    "layers": layers_part,
    "ops": ops_part,
    "gan": gan_part,
    "bandwidth": bandwidth_part,
    "variants": variants_part,
}


def write(out: Path) -> Path:
    """Writes out/report.md from the sections' CSVs found in `out`; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# sn_ext benchmarks\n",
        "Made by `python -m benchmarks` (see `--help`); raw rows in the CSVs next to this file.\n",
    ]
    for section, make in PARTS.items():
        rows = read_rows(out / f"{section}.csv")
        settings_path = out / f"{section}.json"
        settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
        if rows:
            parts.append(make(rows, settings, out))
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
