"""sn_ext's benchmark suite: one command, one report.

    python -m benchmarks                      # everything, on cuda if available else cpu (make bench)
    python -m benchmarks --quick              # a smoke run: small shapes, few repetitions, no torch.compile
    python -m benchmarks --only layer --shape 300x200x3x3 --dtype float32
    python -m benchmarks --device cuda --out /tmp/bench

Sections (--only, repeatable; default all): "layer" (one layer's spectral norm per provider, shape, dtype and mode:
forward, backward, train = both, eval; benchmarks/layer.py), "layers" (all the spectral norms of a model of L layers:
per layer vs grouped; benchmarks/spectral_normalize_grouped.py), "ops" (each op called directly per backend against
a floor; benchmarks/ops.py and a file per op), "gan" (SN-GAN D step, G step and iteration; benchmarks/gan_step.py),
"bandwidth" (a 4096x4096 weight's forward + backward against the device's copy bandwidth; benchmarks/bandwidth.py),
"host" (the Triton backend's host time per train step through a module, and per op, on each launch path, timed side
by side with plain `W * 1.0`, on the CPU with the launches stubbed, GPU or not; benchmarks/host_overhead.py),
"variants" (bounded spectral norm and sigma-reparam against their hand-written PyTorch equivalents and plain spectral
norm; benchmarks/variants.py).

Writes <section>.csv (one row per measurement, with device, versions, threads, commit and date), <section>.json
(the settings), PNG plots and report.md into --out (default benchmarks/results/<device>/), replacing what a
previous run of the same section wrote; the report covers every section whose CSV is in the folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from . import allocator, bandwidth, gan_step, host_overhead, layer, ops, report, spectral_normalize_grouped, variants
from .records import RESULTS_DIR, RowWriter, device_slug, log, run_metadata

SECTIONS = ("layer", "host", "layers", "ops", "gan", "bandwidth", "variants")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if available, else cpu)",
    )
    p.add_argument("--only", action="append", choices=SECTIONS, help="run this section only (repeatable)")
    p.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="layer and ops section dtypes (repeatable; default float32 and bfloat16); the first one is also the "
        "layers section's",
    )
    p.add_argument(
        "--shape", action="append", help="also time this weight shape in the layer section, e.g. 300x200x3x3"
    )
    p.add_argument(
        "--mode",
        action="append",
        choices=layer.MODES,
        help="layer section modes (repeatable; default all: forward, backward, train = both, eval)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (~1 minute on a busy 2-core CPU): small shapes and models, few repetitions, no "
        "torch.compile, 1 CPU thread unless --threads; not for numbers",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers and GAN mode")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--gan-batch", type=int, help="GAN batch size (default 64 on a GPU, 16 on the CPU, 8 with --quick)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>)")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc malloc's defaults, which give a large step output fresh pages (page faults) or a reused "
        "heap chunk depending on what ran before (default: freed memory kept in the heap for every provider alike; "
        "benchmarks/allocator.py)",
    )
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md and the plots from the CSVs")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.threads or args.quick:  # a smoke run on a shared machine: 1 thread, unless told otherwise
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    out = args.out or RESULTS_DIR / device_slug(device)
    if not args.report_only:
        run_sections(args, device, out)
    path = report.write(out)
    log(f"\nreport: {path}")
    return path


def run_sections(args, device: torch.device, out: Path) -> None:
    malloc = allocator.SYSTEM if args.system_malloc else allocator.keep_freed_memory()
    meta = run_metadata(device)
    compile_ok = not (args.quick or args.no_compile)
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    log(
        f"# sn_ext benchmarks on {meta['device']} ({device.type}, {meta['threads']} CPU threads), torch "
        f"{meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda'] or '-'}, sn_ext {meta['sn_ext']} (compiled "
        f"kernels: {meta['sn_ext_compiled']}), commit {meta['commit']}" + (" -- QUICK run" if args.quick else "")
    )
    gan_batch = args.gan_batch or (8 if args.quick else 64 if device.type == "cuda" else 16)
    plans = {
        "layer": (
            layer.COLUMNS,
            {
                "shapes": (layer.QUICK_SHAPES if args.quick else layer.BASELINE_SHAPES) + (args.shape or []),
                "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
                "modes": args.mode or list(layer.MODES),
            },
            lambda s, w: layer.run(
                s["shapes"], dtypes, device, quick=args.quick, compile_ok=compile_ok, write=w, modes=tuple(s["modes"])
            ),
        ),
        "host": (
            host_overhead.COLUMNS,
            {"shape": "x".join(map(str, host_overhead.SHAPE))},
            lambda s, w: host_overhead.run(quick=args.quick, write=w),
        ),
        "layers": (
            spectral_normalize_grouped.COLUMNS,
            {
                "counts": spectral_normalize_grouped.QUICK_LAYER_COUNTS
                if args.quick
                else spectral_normalize_grouped.LAYER_COUNTS,
                "layer_shape": spectral_normalize_grouped.QUICK_LAYER_SHAPE
                if args.quick
                else spectral_normalize_grouped.LAYER_SHAPE,
            },
            lambda s, w: spectral_normalize_grouped.run(
                s["counts"], s["layer_shape"], dtypes[0], device, quick=args.quick, write=w
            ),
        ),
        "ops": (
            ops.COLUMNS,
            {
                "ops": list(ops.OPS),
                "shapes": ops.QUICK_SHAPES if args.quick else ops.SHAPES,
                "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
            },
            lambda s, w: ops.run(s["shapes"], dtypes, device, quick=args.quick, write=w),
        ),
        "gan": (
            gan_step.COLUMNS,
            {
                "archs": list(gan_step.ARCHS),
                "batch": gan_batch,
                "width": 0.25 if args.quick else 1.0,
                "modes": ["eager", "compiled"] if compile_ok else ["eager"],
            },
            lambda s, w: gan_step.run(
                s["archs"],
                device,
                batch=s["batch"],
                width=s["width"],
                modes=s["modes"],
                budget_s=0.3 if args.quick else 1.0,
                write=w,
            ),
        ),
        "bandwidth": (
            bandwidth.COLUMNS,
            {"shapes": bandwidth.QUICK_SHAPES if args.quick else bandwidth.SHAPES},
            lambda s, w: bandwidth.run(s["shapes"], dtypes[0], device, quick=args.quick, write=w),
        ),
        "variants": (
            variants.COLUMNS,
            {
                "shapes": variants.QUICK_SHAPES if args.quick else variants.SHAPES,
                "modes": list(variants.QUICK_MODES if args.quick else variants.MODES),
            },
            lambda s, w: variants.run(s["shapes"], dtypes, device, quick=args.quick, write=w, modes=tuple(s["modes"])),
        ),
    }
    for section in args.only or SECTIONS:
        columns, settings, run = plans[section]
        settings = {
            **settings,
            "quick": args.quick,
            "compile": compile_ok,
            "device_type": device.type,
            "malloc": malloc,
            "command": "python -m benchmarks " + shlex.join(sys.argv[1:]),
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{section}.json").write_text(json.dumps(settings, indent=1) + "\n")
        log(f"## {section}: {settings}")
        start = time.perf_counter()
        with RowWriter(out / f"{section}.csv", columns, meta) as writer:
            run(settings, writer.write)
        log(f"## {section}: done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
