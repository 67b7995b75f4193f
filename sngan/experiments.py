"""The results table: spectral norm and the seed's triplet loss on the 2-D mixtures and on scikit-learn digits.

    python -m sngan.experiments                  # the full table (about an hour on an idle 2-core machine)
    python -m sngan.experiments --only digits    # re-run one part, keep the other's runs
    python -m sngan.experiments --quick          # a smoke test of the whole pipeline (seconds)

Every 2-D run has the same budget (steps, batch, n_dis, preset "toy", MLP G/D) and differs only in loss and
spectral norm; every digits run likewise (standard CNN at width 0.25, preset C). Runs go to runs/experiments/NAME,
raw numbers to runs/experiments/results.json, the markdown table to runs/experiments/table.md (and stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

MIXTURE_METHODS = {
    "SN (sn_ext), hinge": dict(loss="hinge", sn="sn_ext"),
    "no SN, hinge": dict(loss="hinge", sn="none"),
    "SN, triplet (seed: no hinge, G = ‖D(G(z))‖²)": dict(loss="triplet", sn="sn_ext", triplet_g="seed"),
    "SN, triplet with hinge [.]+ (G = ‖D(G(z))‖²)": dict(loss="triplet_hinge", sn="sn_ext", triplet_g="seed"),
}
DIGITS_METHODS = {
    "SN (sn_ext), hinge": dict(loss="hinge", sn="sn_ext"),
    "no SN, hinge": dict(loss="hinge", sn="none"),
    "SN, triplet with hinge (G = ‖D(G(z))‖²)": dict(loss="triplet_hinge", sn="sn_ext", triplet_g="seed"),
    "SN, triplet with hinge (G = ‖D(x)-D(G(z))‖²)": dict(loss="triplet_hinge", sn="sn_ext", triplet_g="anchor"),
}


def _run(job: dict) -> dict:
    import torch

    from .train import Config, train

    torch.set_num_threads(job.pop("_threads"))
    name = job.pop("_name")
    t = time.time()
    try:
        m = train(Config(**job))
        return {
            "name": name,
            "config": job,
            "final": m["final"],
            "seconds": time.time() - t,
            "error": None,
            "steps_per_s": m["train"]["steps_per_s"],
        }
    except Exception as e:  # a diverging loss is a result too
        return {"name": name, "config": job, "final": None, "seconds": time.time() - t, "error": repr(e)}


def jobs_for(args) -> list[dict]:
    out_root = args.out
    jobs = []
    common = dict(progress=False, sample_every=0, eval_every=0, ckpt_every=10**9, metrics_cache=args.metrics_cache)
    for data in ("ring8", "grid25") if args.only in (None, "mixtures") else ():
        for label, m in MIXTURE_METHODS.items():
            for seed in range(args.seeds):
                name = f"{data}-{m['loss']}-{m['sn']}-{m.get('triplet_g', '')}-s{seed}"
                jobs.append(
                    dict(
                        common,
                        _name=name,
                        _group=(data, label),
                        data=data,
                        arch="mlp",
                        seed=seed,
                        steps=args.mixture_steps,
                        batch_size=args.mixture_batch,
                        threads=1,
                        preset="toy",
                        out=os.path.join(out_root, name),
                        **m,
                    )
                )
    if not args.no_digits and args.only in (None, "digits"):
        for label, m in DIGITS_METHODS.items():
            for seed in range(args.digits_seeds):
                name = f"digits-{m['loss']}-{m['sn']}-{m.get('triplet_g', '')}-s{seed}"
                jobs.append(
                    dict(
                        common,
                        _name=name,
                        _group=("digits", label),
                        data="digits",
                        arch="cnn",
                        width=args.digits_width,
                        seed=seed,
                        steps=args.digits_steps,
                        preset="C",
                        batch_size=64,
                        out=os.path.join(out_root, name),
                        **m,
                    )
                )
    return jobs


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: list[dict], baseline: dict | None) -> str:
    from .config import PRESETS

    groups: dict = {}
    for r in results:
        groups.setdefault(tuple(r["group"]), []).append(r)
    lines = []
    for data in ("ring8", "grid25"):
        rows = [(g, rs) for g, rs in groups.items() if g[0] == data]
        if not rows:
            continue
        n_modes = 8 if data == "ring8" else 25
        cfg = rows[0][1][0]["config"]
        p = PRESETS["toy"]
        lines += [
            f"**{data}** ({n_modes} modes; MLP G/D, {cfg['steps']} G steps, n_dis {p['n_dis']}, batch "
            f"{cfg['batch_size']}, D's output x {p['d_scale']:g}, Adam {p['lr']:g} ({p['beta1']}, {p['beta2']}) "
            f"decayed linearly; 2500 samples; mean ± std over {len(rows[0][1])} seeds)",
            "",
            "| method | modes covered | % high quality | failed runs | s / run |",
            "|---|---|---|---|---|",
        ]
        for (_, label), rs in rows:
            ok = [r for r in rs if r["final"]]
            lines.append(
                f"| {label} | {_fmt([r['final']['modes_covered'] for r in ok])} | "
                f"{_fmt([r['final']['high_quality_pct'] for r in ok])} | {len(rs) - len(ok)} | "
                f"{statistics.mean(r['seconds'] for r in rs):.0f} |"
            )
        lines.append("")
    rows = [(g, rs) for g, rs in groups.items() if g[0] == "digits"]
    if rows:
        cfg = rows[0][1][0]["config"]
        acc = next((r["final"]["classifier_test_accuracy"] for _, rs in rows for r in rs if r["final"]), None)
        lines += [
            f"**digits** (scikit-learn, 16x16; standard CNN at width {cfg['width']}, {cfg['steps']} G steps, "
            f"preset C, batch 64; metrics in the features of a classifier trained on digits, test accuracy "
            f"{acc:.3f}; {len(rows[0][1])} seed(s); 1500 real vs 1500 generated)"
            if acc is not None
            else "**digits**",
            "",
            "| method | classifier-FID | KID x 100 | precision | recall | density | coverage |",
            "|---|---|---|---|---|---|---|",
        ]
        if baseline:
            lines.append(
                f"| real held-out digits (297) | {baseline['fid']:.2f} | {100 * baseline['kid']:.2f} | "
                f"{baseline['precision']:.2f} | {baseline['recall']:.2f} | {baseline['density']:.2f} | "
                f"{baseline['coverage']:.2f} |"
            )
        for (_, label), rs in rows:
            ok = [r["final"] for r in rs if r["final"]]
            lines.append(
                f"| {label} | {_fmt([f['fid'] for f in ok], 2)} | {_fmt([100 * f['kid'] for f in ok], 2)} | "
                f"{_fmt([f['precision'] for f in ok], 2)} | {_fmt([f['recall'] for f in ok], 2)} | "
                f"{_fmt([f['density'] for f in ok], 2)} | {_fmt([f['coverage'] for f in ok], 2)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sngan.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "experiments"))
    p.add_argument("--metrics-cache", default=os.path.join("runs", "cache"))
    p.add_argument("--seeds", type=int, default=5)
    # The grid's modes sharpen until the learning rate reaches 0: 8000 G steps cover them (24.6/25) at ~53% high
    # quality, 24000 at 93-95% (n_dis 2: ~2.3 min a run on one core).
    p.add_argument("--mixture-steps", type=int, default=24000)
    p.add_argument("--mixture-batch", type=int, default=128)
    p.add_argument("--digits-steps", type=int, default=4000)
    p.add_argument("--digits-seeds", type=int, default=1)
    p.add_argument("--digits-width", type=float, default=0.25)
    p.add_argument("--no-digits", action="store_true")
    p.add_argument(
        "--only",
        choices=("mixtures", "digits"),
        help="re-run one part; the other part's runs are kept from OUT/results.json",
    )
    p.add_argument("--jobs", type=int, default=2, help="processes, one thread each")
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the pipeline, numbers mean nothing")
    p.add_argument("--table-only", action="store_true", help="re-render the table from OUT/results.json")
    args = p.parse_args(argv)
    if args.table_only:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        md = table(saved["runs"], saved.get("digits_real_baseline"))
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(md)
        print(md)
        return 0
    if args.quick:
        args.seeds, args.mixture_steps, args.digits_steps, args.digits_width = 1, 3, 3, 1 / 16
        args.mixture_batch = 16
    jobs = jobs_for(args)
    groups = {j["_name"]: j.pop("_group") for j in jobs}
    for j in jobs:
        j["_threads"] = 1 if args.jobs > 1 else 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if (
        not args.no_digits and args.only != "mixtures"
    ):  # train (or load) the metrics classifier once, before the parallel runs need it
        from .data import digits
        from .metrics import get_classifier

        get_classifier(digits(16), args.metrics_cache)
    print(f"{len(jobs)} runs, {args.jobs} at a time", file=sys.stderr)
    results = []
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            for r in ex.map(_run, jobs):
                results.append(r)
                _report(r, len(results), len(jobs), t0)
    else:
        for j in jobs:
            results.append(_run(j))
            _report(results[-1], len(results), len(jobs), t0)
    for r in results:
        r["group"] = groups[r["name"]]
    previous = os.path.join(args.out, "results.json")
    if args.only and os.path.isfile(previous):
        with open(previous) as f:
            kept = [r for r in json.load(f)["runs"] if (r["group"][0] == "digits") != (args.only == "digits")]
        results = kept + results
    baseline = None
    if not args.no_digits and any(r["group"][0] == "digits" for r in results):
        from .data import digits
        from .metrics import ImageMetrics

        baseline = ImageMetrics(digits(16), args.metrics_cache).real_baseline()
    md = table(results, baseline)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"runs": results, "digits_real_baseline": baseline, "seconds": time.time() - t0}, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"total {time.time() - t0:.0f}s; wrote {args.out}/table.md and results.json", file=sys.stderr)
    return 0


def _report(r: dict, i: int, n: int, t0: float) -> None:
    f = r["final"] or {}
    what = (
        f"modes {f.get('modes_covered')}, hq {f.get('high_quality_pct', 0):.1f}%"
        if "modes_covered" in f
        else f"fid {f.get('fid', float('nan')):.2f}"
        if f
        else f"error {r['error']}"
    )
    print(f"[{i}/{n} {time.time() - t0:.0f}s] {r['name']}: {what} ({r['seconds']:.0f}s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
