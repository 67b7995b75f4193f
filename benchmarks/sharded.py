"""A tensor-parallel layer's spectral norm on 2 CPU processes (gloo): sn_ext on the DTensor weight (the power
iteration on each rank's shard, vectors all-gathered and all-reduced: sn_ext/sharded.py) against what a user without
it would do, gather W and run torch's spectral norm on it (W.full_tensor(): an all-gather of W forward, a
reduce-scatter of its gradient backward). One train step (one power iteration, forward and backward) per rep, and the
numbers each step communicates, counted from the collectives it runs (CollectiveCounter).

    python -m benchmarks.sharded [--shape 4096x4096 ...] [--reps 20]

Writes sharded.csv (a row per shape, sharding and provider, with device, versions and commit) and sharded.md (the
table) under benchmarks/results/<device>/ (or --out). Each process runs on one thread; the times are rank 0's, each
step started after a barrier.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .records import RESULTS_DIR, RowWriter, device_slug, markdown_table, run_metadata

WORLD = 2
SHAPES = ("1024x1024", "4096x4096", "512x512x3x3")
COLUMNS = ["shape", "sharded", "provider", "median_ms", "p20_ms", "p80_ms", "numbers_per_step", "collectives_per_step"]


class CollectiveCounter(TorchDispatchMode):
    """Records each collective run inside as (op name, the numel of its largest tensor: an all-gather's output, a
    reduce-scatter's input, an all-reduce's vector). DTensor ops first desugar into their collectives (returning
    NotImplemented for them, as torch's CommDebugMode does), so the collectives inside them count too."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        if func.namespace in ("c10d", "_c10d_functional") and name not in ("wait_tensor", "_wrap_tensor_autograd"):
            tensors = [t for t in tree_leaves((args, out)) if isinstance(t, torch.Tensor)]
            self.calls.append((name, max((t.numel() for t in tensors), default=0)))
        return out


def _steps(shape: tuple[int, ...], shard: int, mesh) -> dict:
    """Each provider's train step of the layer (a function of nothing: W_sn, a DTensor sharded as W, and its
    backward) and the layer's weight, whose gradient the step accumulates."""
    from torch import nn
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import sn_ext

    torch.manual_seed(0)
    weight = distribute_tensor(torch.randn(shape), mesh, [Shard(shard)])
    grad = distribute_tensor(torch.randn(shape), mesh, [Shard(shard)])
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.clone())
    sn_ext.spectral_norm(holder)
    # Without sn_ext: W gathered (its gradient reduce-scattered: every rank's W_sn shard adds to it), torch's
    # spectral norm on the whole W on every rank (the same u, v everywhere), each rank keeping its shard of W_sn.
    gathered = nn.Parameter(weight.clone())
    torch_norm = nn.utils.parametrizations._SpectralNorm(weight.full_tensor(), 1, 0, 1e-12)
    torch_norm.load_state_dict(holder.parametrizations.weight[0].state_dict())  # the same u, v as sn_ext's
    rank, world = mesh.get_local_rank(), mesh.size()

    def gather_and_torch():
        whole = gathered.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        local = torch_norm(whole).tensor_split(world, dim=shard)[rank]
        DTensor.from_local(local, mesh, [Shard(shard)], shape=weight.shape, stride=weight.stride()).backward(grad)

    return {
        "sn_ext": (lambda: holder.weight.backward(grad), holder.parametrizations.weight.original),
        "gather + torch": (gather_and_torch, gathered),
    }


def _check_same_gradient(steps: dict) -> None:
    """The providers' first steps give the same gradient: the baseline does what it claims."""
    grads = []
    for step, weight in steps.values():
        weight.grad = None
        step()
        grads.append(weight.grad.to_local())
    error = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
    if not error < 1e-4:
        raise AssertionError(f"the providers' gradients differ: relative error {error:.2e}")


def _worker(rank: int, port: int, shapes: list[str], reps: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(60)
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    cases = [(s, sharded) for s in shapes for sharded in ("rows", "cols")]
    if rank == 0:
        from tqdm import tqdm

        cases = tqdm(cases, desc="sharded", unit="case")
    rows = []
    for shape_text, sharded in cases:
        shape = tuple(int(d) for d in shape_text.split("x"))
        steps = _steps(shape, 0 if sharded == "rows" else 1, mesh)
        _check_same_gradient(steps)
        times = {provider: [] for provider in steps}
        counters = {}
        for provider, (step, _) in steps.items():
            with CollectiveCounter() as counters[provider]:
                step()
        for _ in range(reps):  # the providers' steps interleaved: a shared machine's drift hits both alike
            for provider, (step, _) in steps.items():
                dist.barrier()
                start = time.perf_counter()
                step()
                times[provider].append((time.perf_counter() - start) * 1e3)
        for provider, samples in times.items():
            quintiles = statistics.quantiles(samples, n=5)
            calls = counters[provider].calls
            rows.append(
                {
                    "shape": shape_text,
                    "sharded": sharded,
                    "provider": provider,
                    "median_ms": round(statistics.median(samples), 3),
                    "p20_ms": round(quintiles[0], 3),
                    "p80_ms": round(quintiles[3], 3),
                    "numbers_per_step": sum(n for _, n in calls),
                    "collectives_per_step": len(calls),
                }
            )
    if rank == 0:
        torch.save(rows, os.path.join(out_dir, "rows.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(shapes: list[str], reps: int, out: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(_free_port(), shapes, reps, tmp), nprocs=WORLD, start_method="spawn")
        rows = torch.load(os.path.join(tmp, "rows.pt"))
    meta = run_metadata(torch.device("cpu"))
    with RowWriter(out / "sharded.csv", COLUMNS, meta) as writer:
        for row in rows:
            writer.write(row)
    table = markdown_table(
        ["weight", "sharded", "provider", "ms per step (median)", "p20-p80 ms", "numbers sent", "collectives"],
        [
            [
                r["shape"],
                r["sharded"],
                r["provider"],
                r["median_ms"],
                f"{r['p20_ms']}-{r['p80_ms']}",
                r["numbers_per_step"],
                r["collectives_per_step"],
            ]
            for r in rows
        ],
    )
    text = (
        f"# Tensor-parallel spectral norm: {WORLD} processes (gloo), one thread each\n\n"
        f"{meta['device']}, torch {meta['torch']}, sn_ext {meta['sn_ext']} (compiled: {meta['sn_ext_compiled']}), "
        f"commit {meta['commit']}, {meta['date']}. One train step (a power iteration, forward and backward) of a "
        f"float32 weight sharded on 2 ranks; rank 0's times over {reps} steps.\n\n{table}\n"
    )
    (out / "sharded.md").write_text(text)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharded", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help=f"weight shapes (repeatable; default {', '.join(SHAPES)})")
    p.add_argument("--reps", type=int, default=20, help="timed steps per case (default 20)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>/)")
    args = p.parse_args(argv)
    if args.reps < 2:
        p.error("--reps must be at least 2 (the table gives the p20-p80 spread)")
    out = args.out or RESULTS_DIR / device_slug(torch.device("cpu"))
    run(args.shape or list(SHAPES), args.reps, out)
    print((out / "sharded.md").read_text())


if __name__ == "__main__":
    main()
