"""One layer, train mode, one power iteration: `w = module.weight; w.backward(g)`, per provider.

Providers: sn_ext's spectral norm (backend "auto": the compiled kernels), sn_ext with backend="triton" ("sn_ext
triton", where the Triton backend can take the weight), torch's parametrization, torch's parametrization under
torch.compile ("torch compiled", where torch.compile works; the first calls compile, outside the timing), and the
floor of any autograd op on the same weight, `w = W * 1.0; w.backward(g)` ("plain"). A provider that cannot run
here is skipped with a note saying why. Prints a Markdown table and saves a CSV under benchmarks/results/.

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
from sn_ext import backends

from .timing import RESULTS_DIR, markdown_table, run_metadata, time_call, write_csv

BASELINE_SHAPES = ["64x3x3x3", "128x128x3x3", "256x256x3x3", "512x512x3x3", "1024x1024", "1024x1024x3x3",
                   "4096x4096"]
QUICK_SHAPES = BASELINE_SHAPES[:3]


class WeightHolder(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class WeightOf(nn.Module):
    """A module whose forward is `holder.weight`, so that torch.compile sees the parametrization."""

    def __init__(self, holder: nn.Module):
        super().__init__()
        self.holder = holder

    def forward(self) -> torch.Tensor:
        return self.holder.weight


OPTIONAL = ["sn_ext triton", "torch compiled"]  # providers that may not run everywhere


def providers(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """(name -> (step function, the parameter whose .grad the step fills), name -> why it was skipped)."""
    weight = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    plain = WeightHolder(weight.clone())
    torch_sn = nn.utils.parametrizations.spectral_norm(WeightHolder(weight.clone()))
    ours = sn_ext.spectral_norm(WeightHolder(weight.clone()))

    def plain_step():
        (plain.weight * 1.0).backward(grad)

    def module_step(module):
        return lambda: module.weight.backward(grad)

    steps = {
        "plain": (plain_step, plain.weight),
        "torch": (module_step(torch_sn), torch_sn.parametrizations.weight.original),
        "sn_ext": (module_step(ours), ours.parametrizations.weight.original),
    }
    skipped = {}
    reasons = backends.get("triton").not_supported_reasons(device, dtype)
    if reasons:
        skipped["sn_ext triton"] = "; ".join(reasons)
    else:
        tri = sn_ext.spectral_norm(WeightHolder(weight.clone()), backend="triton")
        steps["sn_ext triton"] = (module_step(tri), tri.parametrizations.weight.original)
    holder = nn.utils.parametrizations.spectral_norm(WeightHolder(weight.clone()))
    torch._dynamo.reset()  # a fresh compile per shape: no recompile limit across the shapes of a run
    compiled = torch.compile(WeightOf(holder))
    try:
        compiled().backward(grad)  # compiles here, outside the timing
    except Exception as error:  # no compiler, no triton for Inductor on this GPU ...
        skipped["torch compiled"] = f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    else:
        steps["torch compiled"] = (lambda: compiled().backward(grad), holder.parametrizations.weight.original)
    return steps, skipped


def _column(name: str) -> str:
    return name.replace(" ", "_")


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
    rows, notes = [], {}
    for shape_text in shapes:
        shape = tuple(int(s) for s in shape_text.split("x"))
        reps = reps_for(math.prod(shape), args.quick)
        timings = {}
        steps, skipped = providers(shape, device, dtype)
        for name, why in skipped.items():
            if name not in notes:
                notes[name] = why
                print(f"  ({name}: skipped, {why})", flush=True)
        for name, (step, param) in steps.items():
            def clear_grad(param=param):
                param.grad = None
            timings[name] = time_call(step, device, reps=reps, warmup=max(3, reps // 10), before=clear_grad)
        row = {"shape": shape_text, "params": math.prod(shape), "dtype": args.dtype, **meta}
        for name in ["plain", "torch", "sn_ext", *OPTIONAL]:  # every row has every column (empty: skipped)
            t = timings.get(name)
            for stat in ("median_us", "p20_us", "p80_us"):
                row[f"{_column(name)}_{stat}"] = round(t[stat], 1) if t else ""
        row["torch_over_sn_ext"] = round(timings["torch"]["median_us"] / timings["sn_ext"]["median_us"], 2)
        row["sn_ext_over_plain"] = round(timings["sn_ext"]["median_us"] / timings["plain"]["median_us"], 2)
        row["skipped"] = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        rows.append(row)
        print(f"  {shape_text}: " + ", ".join(f"{name} {t['median_us']:.0f} us" for name, t in timings.items()),
              flush=True)

    print()
    shown = [name for name in OPTIONAL if name not in notes]
    print(markdown_table(
        ["weight shape", "params", "torch SN µs", "sn_ext µs", *[f"{name} µs" for name in shown], "plain µs",
         "torch / sn_ext", "sn_ext / plain"],
        [[r["shape"], r["params"], r["torch_median_us"], r["sn_ext_median_us"],
          *[r[f"{_column(name)}_median_us"] for name in shown], r["plain_median_us"],
          r["torch_over_sn_ext"], r["sn_ext_over_plain"]] for r in rows]))
    for name, why in notes.items():
        print(f"\n{name}: skipped ({why})")
    out = args.out or RESULTS_DIR / f"layer_{device.type}.csv"
    write_csv(Path(out), rows)
    print(f"\nsaved {out}")
    return rows


if __name__ == "__main__":
    main()
