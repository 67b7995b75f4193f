"""The checks and timings of benchmarks/gpu_check.sh, in parts that its steps run in processes of their own
(benchmarks/gpu_check.py). Every result goes to <out>/<name>.json as soon as it is known, so that a later hang or
crash keeps what came before.

Checks (correctness: they decide the exit status):
- check_rounds (one process per round mode, first): the round mode that SN_EXT_CUDA_ROUND names (fused, the
  default; split, whose loops read W in 16-byte packs; split-scalar, the split round's earlier scalar loops) against
  the CPU kernels, u-first and v-first, n = 0, 1, 3, on shapes that take each path of the fused round and of the
  split round's loops; gpu_check.py runs everything after it with the first mode that passed;
- check_ops: every op (spectral_normalize_ u-first and v-first with n = 0, 1, 3; power_iteration_;
  spectral_normalize_backward) on a few shapes and dtypes against the CPU (normwise relative error), cooperative
  and phased launches (SN_EXT_CUDA_LAUNCH) bit for bit;
- check_grouped: the grouped ops on a 13-layer group (small layers and two spread over the grid), all u-first and
  mixed orders (u-first and v-first layers in one forward launch of the fused round), each layer's bits equal to its
  per-layer launch's;
- check_graphs: a forward + backward captured in a CUDA graph replays to the eager result, in each launch mode.

Timings (each record's "ok" says whether it meets its goal, issue #29; see the constants below):
- time_layers: one layer's train step (forward + backward, float32), plain `W * 1.0`, torch's spectral norm and
  sn_ext's cuda backend side by side: eager (what a training loop sees) and CUDA-graph replay (device time);
  4096x4096 against 3.5 device copies of W;
- time_rounds: the forward with each round mode that passed (--time-rounds), u-first and v-first;
- time_grouped: sngan's CNN and ResNet discriminators' spectral norms per train step, per layer and grouped,
  with the kernels per step;
- time_triton: time_layers' steps with the Triton backend, beside plain (after gpu_check.py's Triton warm-up).

    python -m benchmarks.gpu_smoke --out gpu_results                         # every part, into smoke.json
    SN_EXT_CUDA_ROUND=split python -m benchmarks.gpu_smoke --out gpu_results --only check_rounds --name rounds_split
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import traceback
from pathlib import Path

import torch

from sn_ext import backends, ops

from .gpu_summary import ROUND_MODES
from .layer import make_layer, make_steps, weights_and_grads
from .timing import Step, measure, measure_side_by_side

EPS = 1e-12
SHAPES = [(64, 3, 3, 3), (256, 256, 3, 3), (257, 129, 3), (1, 100003)]
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}  # normwise relative error allowed
# Where the timing parts run (tests/test_gpu_check.py runs them on the CPU, CUDA graphs aside).
TIMING_DEVICE = torch.device("cuda")
TIMED_SHAPES = ["64x3x3x3", "128x128x3x3", "256x256x3x3", "512x512x3x3", "4096x4096"]
COPY_SHAPE = "4096x4096"  # the one judged against device copies (bandwidth-bound), not against plain
TIMED_ROUND_SHAPES = [(4096, 4096), (512, 512, 3, 3)]
# The goals (issue #29): the eager train step within 1.4x of plain `W * 1.0` up to 512x512x3x3; 4096x4096 within
# 1.15x of 3.5 device copies of W (the 7 weight-sized passes a step must make); a v-first round within 1.15x of a
# u-first one; a grouped whole model in 2 launches per train step.
PLAIN_GOAL, COPY_GOAL, V_FIRST_GOAL, GROUPED_KERNELS_GOAL = 1.4, 1.15, 1.15, 2


class Results:
    """smoke.json, rewritten after every check."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"checks": [], "timings": [], "round_timings": []}

    def add(self, kind: str, record: dict) -> None:
        self.data[kind].append(record)
        status = record.get("ok", "")
        print(f"{kind[:-1]:6} {status!s:5} {json.dumps(record)}", flush=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


ROUND_ENV_VAR = "SN_EXT_CUDA_ROUND"  # the round mode: fused (default), split or split-scalar (csrc/cuda/launch.h)


@contextlib.contextmanager
def environment(name: str, value: str):
    """The environment variable `name` = value within the block (the CUDA kernels read theirs at every launch)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def launch_mode(mode: str):
    """SN_EXT_CUDA_LAUNCH=mode within the block."""
    return environment(backends.LAUNCH_ENV_VAR, mode)


def round_mode(mode: str):
    """SN_EXT_CUDA_ROUND=mode within the block."""
    return environment(ROUND_ENV_VAR, mode)


def cooperative_problem() -> str:
    """Why a forced cooperative launch cannot run on this device ("" when it can): the device has no cooperative
    launch, or refused one (csrc/cuda/launch.cu). The checks that force it then skip it, saying why."""
    from sn_ext import _library

    with launch_mode("auto"):
        how = _library.cuda_launch(torch.cuda.current_device())
    return "" if how.startswith("cooperative") else how


def forced_launch_modes(results: Results, check: str) -> list[str]:
    """The launch modes a check forces in turn: cooperative and phased, or phased alone (recorded as a skip)."""
    problem = cooperative_problem()
    if problem:
        results.add("checks", {"check": check, "mode": "cooperative", "ok": True, "skipped": problem})
        return ["phased"]
    return ["cooperative", "phased"]


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return float((ours.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def inputs(shape, dtype, seed=0):
    """A random weight, unit u and v, and a gradient, on the CPU in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    u, v = (torch.randn(n, generator=gen, dtype=torch.float64) for n in (shape[0], w[0].numel()))
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (w, u / u.norm(), v / v.norm(), g)]


def all_ops(w, u, v, g, n, v_first):
    """Every per-layer op's outputs on these inputs (the in-place ops on copies of u and v, which are outputs too)."""
    u_sn, v_sn = u.clone(), v.clone()
    w_sn, sigma, u_used, v_used = ops.spectral_normalize_(w, u_sn, v_sn, 0, n, EPS, v_first)
    grad = ops.spectral_normalize_backward(g, w_sn, u_used, v_used, sigma, 0)
    u_pi, v_pi = u.clone(), v.clone()
    sigma_pi = ops.power_iteration_(w, u_pi, v_pi, 0, n, EPS, v_first)
    return {
        "w_sn": w_sn,
        "sigma": sigma,
        "u": u_used,
        "v": v_used,
        "u_in_place": u_sn,
        "v_in_place": v_sn,
        "grad": grad,
        "pi_sigma": sigma_pi,
        "pi_u": u_pi,
    }


def check_ops(results: Results) -> None:
    modes = forced_launch_modes(results, "op vs cpu")
    for dtype, tol in DTYPES.items():
        for shape in SHAPES:
            for n, v_first in [(0, False), (1, False), (3, False), (1, True)]:
                cpu = inputs(shape, dtype)
                expected = all_ops(*cpu, n, v_first)
                got = {}
                for mode in modes:
                    with launch_mode(mode):
                        got[mode] = all_ops(*(t.cuda() for t in cpu), n, v_first)
                first = got[modes[0]]
                errors = {k: _rel(first[k], expected[k]) for k in expected}
                same = all(torch.equal(first[k], got["phased"][k]) for k in expected)
                results.add(
                    "checks",
                    {
                        "check": "op vs cpu",
                        "shape": "x".join(map(str, shape)),
                        "dtype": str(dtype).removeprefix("torch."),
                        "n": n,
                        "v_first": v_first,
                        "max_rel_err": max(errors.values()),
                        "worst": max(errors, key=errors.get),
                        "cooperative_equals_phased": same,
                        "ok": max(errors.values()) <= tol and same,
                    },
                )


# Every path of the fused round (block_walk.h's plans): rows of one register-held run in 16-byte packs a warp or less
# per row (5000x32: 2 threads a row; round_cases' 96x200, 160x96: dense), several warps (128x128x3x3) or the whole
# block (33x4096, a whole float32 segment), element by element (257x129x3, 5000x33: 387 and 33 columns; 64x3x3x3:
# dense), rows wider than one segment (40x4608; 1x100003, 1x100000: dense, one row), column sums of 8 to 32 threads
# per column, and (round_cases) a transposed weight: strided rows. And of the split round's loops (matvec_block,
# rmatvec_block): packed with whole unrolled groups and a tail (128x128x3x3, 40x4608), split columns whose chunks are
# rounded to whole packs (1x100000: 49 splits), packed columns shared by 32 threads each (5000x32), scalar (257x129x3,
# 5000x33, 1x100003), and (round_cases) rows contiguous but not 16-byte aligned (a storage offset of one element) and
# a strided v (the first matvec's x: scalar, the next rounds' packed).
ROUND_SHAPES = [
    (64, 3, 3, 3),
    (128, 128, 3, 3),
    (257, 129, 3),
    (40, 4608),
    (33, 4096),
    (1, 100003),
    (1, 100000),
    (5000, 33),
    (5000, 32),
]
ROUND_CASES = len(DTYPES) * (len(ROUND_SHAPES) + 3)


def _offset_by_one(w):
    """w's values in a view one element into a buffer: rows contiguous, the data not 16-byte aligned."""
    buffer = torch.empty(w.numel() + 1, dtype=w.dtype, device=w.device)
    return buffer[1:].view(w.shape).copy_(w)


def _strided(x):
    """x's values in a view of every other element of a buffer."""
    return torch.zeros(2 * x.numel(), dtype=x.dtype, device=x.device)[::2].copy_(x)


def round_cases():
    """ROUND_CASES cases (name, dtype, make) in float32/bfloat16/float64: make(device) gives [weight, u, v, g] there,
    the same values on every device."""
    for dtype in DTYPES:
        for shape in ROUND_SHAPES:
            cpu = inputs(shape, dtype)
            yield "x".join(map(str, shape)), dtype, lambda device, cpu=cpu: [t.to(device) for t in cpu]
        transposed = inputs((200, 300), dtype)
        yield (
            "300x200 transposed",
            dtype,
            lambda device, t=transposed: [x.to(device) for x in (t[0].t(), t[2], t[1], t[3].t())],
        )
        offset = inputs((96, 200), dtype)
        yield (
            "96x200 offset by one",
            dtype,
            lambda device, t=offset: [_offset_by_one(t[0].to(device)), *(x.to(device) for x in t[1:])],
        )
        strided = inputs((160, 96), dtype)
        yield (
            "160x96 strided v",
            dtype,
            lambda device, t=strided: [*(x.to(device) for x in t[:2]), _strided(t[2].to(device)), t[3].to(device)],
        )


def current_round() -> str:
    """The round mode this process runs: SN_EXT_CUDA_ROUND's, fused when unset."""
    return os.environ.get(ROUND_ENV_VAR) or ROUND_MODES[0]


# The rounds each case runs (n, v_first): u-first and v-first (the fused round's passes, or the split round's), and
# n = 0 (eval: sigma = u^T W v: the fused round's y pass, or the split round's matvec).
ROUND_RUNS = [(1, False), (3, False), (1, True), (0, False)]


def check_rounds(results: Results) -> None:
    """The current round mode (current_round) against the CPU kernels on every round case."""
    mode = current_round()
    for name, dtype, make in round_cases():
        for n, v_first in ROUND_RUNS:
            expected = all_ops(*make("cpu"), n, v_first)
            got = all_ops(*make("cuda"), n, v_first)
            errors = {k: _rel(got[k], expected[k]) for k in expected}
            results.add(
                "checks",
                {
                    "check": "round vs cpu",
                    "round": mode,
                    "shape": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "n": n,
                    "v_first": v_first,
                    "max_rel_err": max(errors.values()),
                    "worst": max(errors, key=errors.get),
                    "ok": max(errors.values()) <= DTYPES[dtype],
                },
            )


def time_rounds(results: Results, modes=ROUND_MODES) -> None:
    """The forward (one round, then W / sigma), u-first and v-first, float32, with each of `modes` (those that passed
    their check: gpu_check.py's --time-rounds) side by side: which round and which split loops are faster, and the
    v-first round against the u-first one in the default mode (goal: within V_FIRST_GOAL)."""
    device = TIMING_DEVICE
    for shape in TIMED_ROUND_SHAPES:
        w, u, v, _ = (t.to(device) for t in inputs(shape, torch.float32))
        u_first_us = None
        for v_first in (False, True):
            steps = {}
            for mode in modes:
                with round_mode(mode):  # the op reads the mode at each launch: the step sets it
                    steps[mode] = [Step(_forward_in_mode(mode, w, u, v, v_first))]
            times = {mode: t["median_us"] for mode, t in measure_side_by_side(steps, device, budget_s=0.1).items()}
            record = {
                "shape": "x".join(map(str, shape)),
                "order": "v-first" if v_first else "u-first",
                "mode": "forward (spectral_normalize_, n = 1), float32",
                **{f"{mode}_us": t for mode, t in times.items()},
            }
            if times:
                record["fastest"] = min(times, key=times.get)
            ours = times.get(current_round())
            if not v_first:
                u_first_us = ours
            elif ours is not None and u_first_us is not None:  # the goal, in the mode the run uses
                record["over_u_first"] = round(ours / u_first_us, 3)
                record["ok"] = record["over_u_first"] <= V_FIRST_GOAL
            results.add("round_timings", record)


def _forward_in_mode(mode: str, w, u, v, v_first: bool):
    def forward():
        with round_mode(mode):
            return ops.spectral_normalize_(w, u, v, 0, 1, EPS, v_first)

    return forward


def _grouped_shape(i: int) -> tuple[int, ...]:
    """check_grouped's layer i: small ones (each in one block) and two spread over the grid (4: u-first, 6: v-first in
    the mixed group), so that a launch runs both kinds and, mixed, both orders (block_walk::layer_step)."""
    if i in (4, 6):
        return (128 if i == 4 else 192, 64, 3, 3)
    return (16 + 8 * (i % 5), 3 + i % 4, 3, 3)


def check_grouped(results: Results) -> None:
    count = 13  # two grouped launches: 12 layers, then 1
    layers = [inputs(_grouped_shape(i), torch.float32, seed=i) for i in range(count)]
    ws, us, vs, gs = (list(t) for t in zip(*layers))
    dims = [0] * count
    # All u-first (the parametrization), and mixed with v-first layers (legacy ones): the fused round runs both
    # orders in one forward launch, the split round one per order.
    for what, orders in (("u-first", [False] * count), ("mixed orders", [i % 3 == 0 for i in range(count)])):
        check = f"grouped, {count} layers, {what}"
        cpu_sn = ops.spectral_normalize_grouped_(
            ws, [u.clone() for u in us], [v.clone() for v in vs], dims, 1, EPS, orders
        )[0]
        for mode in forced_launch_modes(results, check):
            with launch_mode(mode):
                w, u, v, g = ([t.clone().cuda() for t in ts] for ts in (ws, us, vs, gs))
                w_sn, sigmas, u_used, v_used = ops.spectral_normalize_grouped_(w, u, v, dims, 1, EPS, orders)
                grads = ops.spectral_normalize_grouped_backward(g, w_sn, u_used, v_used, sigmas, dims)
                same = True
                for i in range(count):  # each layer's bits equal its per-layer launch's
                    w_sn_i, sigma_i, u_i, v_i = ops.spectral_normalize_(
                        w[i], us[i].cuda(), vs[i].cuda(), 0, 1, EPS, orders[i]
                    )
                    grad_i = ops.spectral_normalize_backward(g[i], w_sn_i, u_i, v_i, sigma_i, 0)
                    same &= (
                        torch.equal(w_sn_i, w_sn[i])
                        and torch.equal(sigma_i, sigmas[i])
                        and torch.equal(grad_i, grads[i])
                    )
            err = max(_rel(a, b) for a, b in zip(w_sn, cpu_sn))
            results.add(
                "checks",
                {
                    "check": check,
                    "mode": mode,
                    "max_rel_err": err,
                    "layers_equal_per_layer": same,
                    "ok": same and err <= DTYPES[torch.float32],
                },
            )


def captured(step):
    """(graph, its outputs): `step` captured in a CUDA graph after a warm-up call on a side stream (as
    torch.cuda.graphs asks); graph.replay() reruns it into those outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def check_graphs(results: Results) -> None:
    """Capture and replay in each forced mode, and in auto (what users get: cooperative inside the capture once the
    eager warm-up call has proven it, csrc/cuda/launch.h)."""
    w, u0, v0, g = (t.cuda() for t in inputs((256, 128, 3, 3), torch.float32))
    u, v = u0.clone(), v0.clone()
    for mode in [*forced_launch_modes(results, "cuda graph"), "auto"]:
        with launch_mode(mode):

            def step():  # from the same vectors every time (the op updates u, v in place)
                u.copy_(u0)
                v.copy_(v0)
                w_sn, sigma, u_used, v_used = ops.spectral_normalize_(w, u, v, 0, 1, EPS)
                return ops.spectral_normalize_backward(g, w_sn, u_used, v_used, sigma, 0)

            eager = step()
            graph, static = captured(step)
            graph.replay()
            torch.cuda.synchronize()
            results.add("checks", {"check": "cuda graph", "mode": mode, "ok": torch.equal(static, eager)})


def graph_replay_us(steps: list[Step], device: torch.device) -> float:
    """Device time per step: each step (its own copy of W) captured in a CUDA graph, the graphs replayed in turn and
    timed with CUDA events: no host time, no launch gaps, what a step costs the GPU."""
    graphs = []
    for step in steps:
        if step.reset:
            step.reset()
        graphs.append(captured(step.run)[0])
    return measure([Step(graph.replay) for graph in graphs], device, budget_s=0.1)["median_us"]


def modelled_us(backend: str, shape: str, device: torch.device) -> list[float] | str:
    """The device-time model's (low, high) µs for one train step of `shape` in float32 on `backend`, on this GPU
    (benchmarks/device_model.py), beside what the step measured; why not, where the model has no such GPU."""
    from . import device_model
    from .layer import parse_shape

    try:
        gpu = device_model.gpu_key(torch.cuda.get_device_name(device))
        return list(device_model.modelled_step_us(backend, parse_shape(shape), torch.float32, gpu))
    except Exception as error:  # another GPU than the model's (an H100 PCIe, ...), or a CPU stand-in
        return f"not modelled: {error}"[:200]


def _layer_record(shape: str, params: int, providers: list[str], weights, grads, device) -> dict:
    """The providers' eager train steps side by side (median µs per step, wall time on the GPU's timeline), and
    each one's device time from CUDA-graph replay, beside the model's."""
    steps, record, graph = {}, {"kind": "layer", "shape": shape, "params": params}, {}
    for provider in providers:
        try:
            modules = [make_layer(provider, w.clone()) for w in weights]
            steps[provider] = make_steps(modules, grads, "train")
        except Exception as error:  # a backend that cannot run here: say why, time the others
            record[provider] = f"failed: {type(error).__name__}: {error}"[:200]
    for provider, t in measure_side_by_side(steps, device, budget_s=0.2).items():
        record[provider] = t["median_us"]
    for provider, provider_steps in steps.items():
        try:
            graph[provider] = graph_replay_us(provider_steps, device)
        except Exception as error:  # capture refused: eager times stand
            graph[provider] = f"failed: {type(error).__name__}: {error}"[:200]
    record["graph_us"] = graph
    return record


def time_layers(results: Results) -> None:
    """One layer's train step, plain vs torch vs sn_ext cuda (goal: PLAIN_GOAL up to 512x512x3x3, eager), and
    4096x4096 against 3.5 device copies of W (goal: COPY_GOAL, device time)."""
    device = TIMING_DEVICE
    for shape in TIMED_SHAPES:
        params, weights, grads = weights_and_grads(shape, torch.float32, device, quick=False)
        record = _layer_record(shape, params, ["plain", "torch", "sn_ext cuda"], weights, grads, device)
        record["modelled_us"] = {"sn_ext cuda": modelled_us("cuda", shape, device)}
        ours, plain = record.get("sn_ext cuda"), record.get("plain")
        if isinstance(ours, float) and isinstance(plain, float):
            record["cuda_over_plain"] = round(ours / plain, 3)
            if shape != COPY_SHAPE:
                record["ok"] = record["cuda_over_plain"] <= PLAIN_GOAL
        ours_device = record["graph_us"].get("sn_ext cuda")
        if shape == COPY_SHAPE and isinstance(ours_device, float):
            outs = [torch.empty_like(w) for w in weights]
            copy = measure([Step(lambda w=w, o=o: o.copy_(w)) for w, o in zip(weights, outs)], device, budget_s=0.2)
            record["copy_us"] = copy["median_us"]
            record["cuda_over_3.5_copies"] = round(ours_device / (3.5 * copy["median_us"]), 3)
            record["ok"] = record["cuda_over_3.5_copies"] <= COPY_GOAL
        results.add("timings", record)


def time_triton(results: Results) -> None:
    """The same train steps with sn_ext's Triton backend, beside plain (after the Triton warm-up of gpu_check)."""
    device = TIMING_DEVICE
    for shape in TIMED_SHAPES:
        params, weights, grads = weights_and_grads(shape, torch.float32, device, quick=False)
        record = _layer_record(shape, params, ["plain", "sn_ext triton"], weights, grads, device)
        ours, plain = record.get("sn_ext triton"), record.pop("plain")
        record["graph_us"] = {"sn_ext triton": record["graph_us"].get("sn_ext triton")}
        record["modelled_us"] = {"sn_ext triton": modelled_us("triton", shape, device)}
        if isinstance(ours, float) and isinstance(plain, float):
            record["triton_over_plain"] = round(ours / plain, 3)
        results.add("timings", record)


def discriminator_weights(arch: str) -> list[tuple[int, ...]]:
    """The shapes of the weights spectral norm normalizes in sngan's `arch` discriminator for 32x32 RGB images."""
    from sngan.models import build_models

    _, D = build_models(arch, (3, 32, 32), z_dim=128)
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)
    return [tuple(m.weight.shape) for m in D.modules() if isinstance(m, kinds)]


def time_grouped(results: Results) -> None:
    """A whole discriminator's spectral norms per train step: per layer vs grouped (goal: GROUPED_KERNELS_GOAL
    kernels per step), and plain, side by side; kernels per step counted with the profiler."""
    from .op_count import count_ops
    from .spectral_normalize_grouped import make_model

    device = TIMING_DEVICE
    for arch in ("cnn", "resnet"):
        shapes = discriminator_weights(arch)
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
        grads = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
        providers = {"plain": "plain", "per layer": "sn_ext cuda", "grouped": "sn_ext grouped"}
        steps = {name: make_steps([make_model(p, weights)], [grads], "train") for name, p in providers.items()}
        record = {"kind": "grouped", "model": f"sngan {arch} D (32x32)", "layers": len(shapes)}
        for name, t in measure_side_by_side(steps, device, budget_s=0.2).items():
            record[name] = t["median_us"]
        for name, (step,) in steps.items():
            step.reset()
            record[f"{name} kernels"] = count_ops(step.run, device)[0]
        record["ok"] = record["grouped kernels"] <= GROUPED_KERNELS_GOAL
        results.add("timings", record)


PARTS = {
    f.__name__: f
    for f in (
        check_rounds,
        time_rounds,
        time_layers,
        time_grouped,
        check_ops,
        check_grouped,
        check_graphs,
        time_triton,
    )
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("gpu_results"))
    p.add_argument("--only", action="append", choices=list(PARTS), help="run these parts (default: all)")
    p.add_argument("--name", default="smoke", help="the results file: <out>/<name>.json")
    p.add_argument(
        "--time-rounds",
        nargs="*",
        choices=ROUND_MODES,
        default=ROUND_MODES,
        metavar="MODE",
        help="the round modes time_rounds times (default: all; gpu_check.sh: those that passed their check)",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.only or list(PARTS)
    results = Results(args.out / f"{args.name}.json")
    results.data["device"] = torch.cuda.get_device_name()
    results.data["round"] = current_round()
    failed = False
    for part in (PARTS[name] for name in parts):
        start = time.perf_counter()
        try:
            part(results, args.time_rounds) if part is time_rounds else part(results)
        except Exception:
            failed = True
            results.add("checks", {"check": part.__name__, "ok": False, "error": traceback.format_exc()[-2000:]})
        print(f"# {part.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
    # Correctness decides the exit status; a timing's goal (its "ok") is a result, read in the summary.
    checks_ok = all(c["ok"] for c in results.data["checks"])
    return 0 if checks_ok and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
