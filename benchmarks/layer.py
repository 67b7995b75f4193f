"""One layer, train mode, one power iteration: `w = module.weight; w.backward(g)`, per provider.

Providers: sn_ext's spectral norm, torch's parametrization, and the floor of any autograd op on the same weight,
`w = W * 1.0; w.backward(g)` ("plain"). Prints a Markdown table and saves a CSV under benchmarks/results/.

    python -m benchmarks.layer                 # the baseline shapes (shared/reference/baseline_h200.md)
    python -m benchmarks.layer --quick         # fewer repetitions and the three small shapes
    python -m benchmarks.layer --shape 300x200x3x3 --device cuda
"""
import argparse
import math
from pathlib import Path

import torch
from torch import nn

import sn_ext

from .timing import RESULTS_DIR, markdown_table, run_metadata, time_call, write_csv

BASELINE_SHAPES = ["64x3x3x3", "128x128x3x3", "256x256x3x3", "512x512x3x3", "1024x1024", "1024x1024x3x3",
                   "4096x4096"]
QUICK_SHAPES = BASELINE_SHAPES[:3]


class WeightHolder(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


def providers(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (step function, the parameter whose .grad the step fills)."""
    weight = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    plain = WeightHolder(weight.clone())
    torch_sn = nn.utils.parametrizations.spectral_norm(WeightHolder(weight.clone()))
    ours = sn_ext.spectral_norm(WeightHolder(weight.clone()))

    def plain_step():
        (plain.weight * 1.0).backward(grad)

    def module_step(module):
        return lambda: module.weight.backward(grad)

    return {
        "plain": (plain_step, plain.weight),
        "torch": (module_step(torch_sn), torch_sn.parametrizations.weight.original),
        "sn_ext": (module_step(ours), ours.parametrizations.weight.original),
    }


def reps_for(numel: int, quick: bool) -> int:
    reps = max(10, min(200, int(2e8 / numel)))
    return max(5, reps // 4) if quick else reps


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="weight shape like 256x256x3x3 (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="small shapes, fewer repetitions")
    parser.add_argument("--out", help="CSV path (default benchmarks/results/layer_<device>.csv)")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = args.shape or (QUICK_SHAPES if args.quick else BASELINE_SHAPES)
    meta = run_metadata(device)
    print(f"# per-layer fwd+bwd, train mode, 1 power iteration, {args.dtype} on {meta['device']}, "
          f"torch {meta['torch']}, sn_ext compiled kernels: {meta['sn_ext_compiled']}")
    rows = []
    for shape_text in shapes:
        shape = tuple(int(s) for s in shape_text.split("x"))
        reps = reps_for(math.prod(shape), args.quick)
        timings = {}
        for name, (step, param) in providers(shape, device, dtype).items():
            def clear_grad(param=param):
                param.grad = None
            timings[name] = time_call(step, device, reps=reps, warmup=max(3, reps // 10), before=clear_grad)
        row = {"shape": shape_text, "params": math.prod(shape), "dtype": args.dtype, **meta}
        for name, t in timings.items():
            row.update({f"{name}_median_us": round(t["median_us"], 1), f"{name}_p20_us": round(t["p20_us"], 1),
                        f"{name}_p80_us": round(t["p80_us"], 1)})
        row["torch_over_sn_ext"] = round(timings["torch"]["median_us"] / timings["sn_ext"]["median_us"], 2)
        row["sn_ext_over_plain"] = round(timings["sn_ext"]["median_us"] / timings["plain"]["median_us"], 2)
        rows.append(row)
        print(f"  {shape_text}: torch {timings['torch']['median_us']:.0f} us, sn_ext "
              f"{timings['sn_ext']['median_us']:.0f} us, plain {timings['plain']['median_us']:.0f} us", flush=True)

    print()
    print(markdown_table(
        ["weight shape", "params", "torch SN µs", "sn_ext µs", "plain µs", "torch / sn_ext", "sn_ext / plain"],
        [[r["shape"], r["params"], r["torch_median_us"], r["sn_ext_median_us"], r["plain_median_us"],
          r["torch_over_sn_ext"], r["sn_ext_over_plain"]] for r in rows]))
    out = args.out or RESULTS_DIR / f"layer_{device.type}.csv"
    write_csv(Path(out), rows)
    print(f"\nsaved {out}")
    return rows


if __name__ == "__main__":
    main()
