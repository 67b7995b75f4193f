"""What the per-op tests (tests/test_<op>.py) share: the backends they run each op on and why one cannot run here,
the weight cases of each backend's grid, the tolerance tables, the Triton launch paths, and the float64 oracles.

Backends (the id of every per-op test starts with one):
- "cpu": the sn_ext ops on CPU tensors: the compiled kernels (csrc/cpu), or with SN_EXT_DISABLE_EXT=1 the
  pure-PyTorch fallback that sn_ext registers in their place (`make test` runs both);
- "cuda": the sn_ext ops on CUDA tensors (csrc/cuda), where a CUDA device is visible;
- "triton": sn_ext::triton_spectral_normalize_(_backward) (sn_ext/triton): on a GPU in this process, the full grid;
  without one, in Triton's CPU interpreter, in the child process that tests/test_triton.py::test_interpreter_run
  starts for all per-op files at once (`pytest -k triton`), on a smaller grid. TRITON_INTERPRET must be set before
  triton is imported (triton.jit reads it when it decorates a kernel), hence the child;
- "reference": sn_ext.reference (pure PyTorch, also the oracle), on CPU tensors.

Each backend keeps its own case grid and tolerance table where they differ (the compiled CPU kernels are held to the
tight TOL of tests/helpers.py against float64, the GPU kernels to GPU_TOL; the interpreter runs a smaller grid).
"""

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
from helpers import TOL, numpy_matrix, numpy_power_iteration, randn, unit
from torch.nn.utils import parametrizations as torch_param

import sn_ext
from sn_ext import reference

EPS = 1e-12
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = ("cpu", "cuda", "triton", "reference")
CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------------------------------------------------------
# Triton: loaded on a GPU, or in the interpreter child; elsewhere its cases skip, saying where they run.

CHILD_ENV = "SN_EXT_TRITON_TEST_CHILD"  # set in the interpreter child (tests/test_triton.py::test_interpreter_run)
CHILD = os.environ.get(CHILD_ENV) == "1"


def _load_triton() -> tuple[bool, str]:
    if not CUDA and not CHILD:
        return False, "runs in a child process with TRITON_INTERPRET=1 (tests/test_triton.py::test_interpreter_run)"
    import sn_ext.triton as sn_triton

    return sn_triton.load()


TRITON_LOADED, TRITON_LOAD_REASON = _load_triton()
if TRITON_LOADED:
    import sn_ext.triton as sn_triton
    from sn_ext.triton import _host as triton_plan
    from sn_ext.triton import _one_program as triton_one_program

    TRITON_INTERPRETED = sn_triton.interpreted()
    try:  # older torch's wrap_triton rejects interpreted kernels
        _WRAPS = torch.library.wrap_triton(triton_one_program.fused_forward_kernel) is not None
    except RuntimeError:
        _WRAPS = False
else:
    triton_plan = None
    TRITON_INTERPRETED, _WRAPS = False, False

TRITON_WHY_NOT = (
    TRITON_LOAD_REASON
    if not TRITON_LOADED
    else (
        "loaded, but neither on a GPU nor interpreted (TRITON_INTERPRET=1 must "
        "be set when sn_ext.triton loads), or wrap_triton is too old"
    )
)
TRITON_RUNS = TRITON_LOADED and (CUDA or TRITON_INTERPRETED) and _WRAPS

# Launch paths, as launch-plan knob settings. The grid paths on tiny weights need tiny tiles and splits: "split" reads
# W twice per round (matvec and rmatvec), "gram" once (gram_kernel, forced: several row blocks per program, partial
# rows added across blocks, the parts summed in several steps).
_TINY_GRID = {
    "FUSED_MAX_NUMEL": 0,
    "TARGET_PROGRAMS": 8,
    "MIN_COLS_PER_SPLIT": 4,
    "MIN_ROWS_PER_SPLIT": 4,
    "TILE": 64,
    "VECTOR_BLOCK": 16,
    "MAX_LAMBDA_PARTS": 3,
}
TRITON_PATHS = {
    "fused_one_pass": {"FUSED_MAX_NUMEL": 1 << 40},
    "fused_two_pass": {"FUSED_MAX_NUMEL": 1 << 40, "ONE_PASS_MAX": 0},
    "split": {**_TINY_GRID, "GRAM_ROUNDS": False},
    "gram": {**_TINY_GRID, "GRID_TILE_COLS": 16, "GRAM_TILE_COLS": 16, "GRAM_MIN_BLOCKS": 1, "GRAM_PROGRAMS": 3},
}
# SN_EXT_TEST_GRID=reduced: on a GPU, the Triton cases the interpreter runs (every path and dtype, not every pair) and
# fewer real layer sizes, so that the GPU check's Triton step compiles few kernel variants (the full grid: every
# pair). The interpreter always runs the reduced grid.
REDUCED_GRID = os.environ.get("SN_EXT_TEST_GRID", "full") == "reduced" or not CUDA
if REDUCED_GRID:
    TRITON_GRID = [
        ("fused_one_pass", torch.float32),
        ("fused_one_pass", torch.bfloat16),
        ("fused_two_pass", torch.float64),
        ("fused_two_pass", torch.float16),
        ("split", torch.float32),
        ("split", torch.bfloat16),
        ("gram", torch.float32),
        ("gram", torch.float64),
    ]
else:
    TRITON_GRID = [(p, dt) for p in TRITON_PATHS for dt in DTYPES]


def use_triton_path(monkeypatch, path: str | None) -> None:
    """Sets the Triton launch-plan knobs of a path (None: the default plan)."""
    for name, value in TRITON_PATHS.get(path, {}).items():
        monkeypatch.setattr(triton_plan, name, value)


# ---------------------------------------------------------------------------------------------------------------
# Backends: where each runs, why it cannot, and its ops.

DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if CUDA else "cpu", "reference": "cpu"}
WHY_NOT = {
    "cpu": None,
    "cuda": None if CUDA else "needs a CUDA device",
    "triton": None if TRITON_RUNS else f"the Triton kernels cannot run here: {TRITON_WHY_NOT}",
    "reference": None,
}
ON_GPU_ONLY = "a GPU-only case (real layer sizes, too slow for the Triton interpreter)"
NO_TRITON_OP = "sn_ext/triton has kernels for spectral_normalize_ and spectral_normalize_backward only"


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def param(backend: str, *values, id: str, gpu_only: bool = False):
    """A pytest.param (backend, *values) with id "<backend>-<id>", skipped (saying why) where the backend cannot run."""
    why = WHY_NOT[backend] or (ON_GPU_ONLY if gpu_only and not CUDA else None)
    marks = [pytest.mark.skip(reason=why)] if why else []
    return pytest.param(backend, *values, id=f"{backend}-{id}", marks=marks)


def not_run(backend: str, reason: str, n_values: int):
    """A skipped pytest.param for a backend that has no kernel for the op under test."""
    return pytest.param(backend, *([None] * n_values), id=f"{backend}-no_kernel", marks=pytest.mark.skip(reason=reason))


def forward_op(backend: str):
    """The backend's forward op itself (for opcheck), spectral_normalize_'s schema (u, v updated in place)."""
    return getattr(torch.ops.sn_ext, sn_ext.backends.get(backend).forward_op).default


def _copy_keeping_strides(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def forward(backend: str) -> Callable:
    """The backend's forward as modules call it (sn_ext.backends.Backend.forward: u and v updated in place),
    called on copies of u and v (same strides) so that the caller's stay the inputs the tests compare against.
    Checks that contract on every call: afterwards the copies hold the vectors used (the inputs when n == 0 or a
    round was degenerate), those are fresh contiguous tensors, and the copies' versions were bumped as an in-place
    aten op bumps them (outside inference mode, where tensors have none)."""
    run = sn_ext.backends.get(backend).forward

    def call(weight, u, v, *args):
        u_buffer, v_buffer = _copy_keeping_strides(u), _copy_keeping_strides(v)
        versions = None if torch.is_inference_mode_enabled() else (u_buffer._version, v_buffer._version)
        out = run(weight, u_buffer, v_buffer, *args)
        for buffer, used, name in ((u_buffer, out[2], "u"), (v_buffer, out[3], "v")):
            torch.testing.assert_close(buffer, used, rtol=0, atol=0, equal_nan=True, msg=f"{name} updated in place")
            assert used.data_ptr() != buffer.data_ptr(), f"{name}_used must be a fresh tensor"
        if versions is not None:
            assert u_buffer._version > versions[0] and v_buffer._version > versions[1], "u, v versions not bumped"
        return out

    return call


def backward_op(backend: str):
    return {
        "triton": lambda: torch.ops.sn_ext.triton_spectral_normalize_backward.default,
        "reference": lambda: torch.ops.sn_ext.reference_spectral_normalize_backward.default,
    }.get(backend, lambda: torch.ops.sn_ext.spectral_normalize_backward.default)()


def power_iteration_op(backend: str):
    return reference.power_iteration_ if backend == "reference" else torch.ops.sn_ext.power_iteration_.default


def sigma_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Normwise error allowed against the float64 oracle (and between backends), by backend and dtype: TOL for the CPU
# kernels and the reference, GPU_TOL for the GPU kernels (fp32 accumulation in another order, split reductions).
GPU_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BACKEND_TOL = {"cpu": TOL, "reference": TOL, "cuda": GPU_TOL, "triton": GPU_TOL}
# Against torch's spectral norm in the same dtype on CUDA, whose own low-precision error is larger (half-precision mv
# and normalization): the flash-attention rule, ours may be at most twice as far from float64 as torch is, or GPU_TOL.
TORCH_CUDA_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@contextlib.contextmanager
def no_tf32():
    """cuDNN convolutions default to TF32 for float32: ~1e-3 rounding that would swamp the float32 comparisons."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------------
# Weight cases: a name, make(dtype, device) -> weight, the dim to normalize over. Fresh random values (never zeros).

Make = Callable[[torch.dtype, str], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class WeightCase:
    id: str
    make: Make
    dim: int

    def __iter__(self):  # unpacks as (id, make, dim)
        return iter((self.id, self.make, self.dim))


def plain(*shape: int, seed: int | None = None) -> Make:
    s = len(shape) + sum(shape) if seed is None else seed
    return lambda dtype, device: randn(*shape, dtype=dtype, seed=s, device=device)


def transposed(h: int, w: int, seed: int) -> Make:
    """An (h, w) view of a (w, h) tensor: strides (1, h), as a Linear weight stored transposed."""
    return lambda dtype, device: randn(w, h, dtype=dtype, seed=seed, device=device).t()


def sliced(h: int, w: int, seed: int, start: int = 1, total: int | None = None) -> Make:
    """Every other column of an (h, total) tensor (default 2w + 1 columns), from `start`: not dense."""
    cols = 2 * w + 1 if total is None else total
    return lambda dtype, device: randn(h, cols, dtype=dtype, seed=seed, device=device)[:, start::2]


def permuted(c_out: int, c_in: int, k: int, seed: int) -> Make:
    """A (c_out, c_in, k, k) view of a (k, k, c_out, c_in) tensor: no (outer, rows, inner) view exists."""
    return lambda dtype, device: randn(k, k, c_out, c_in, dtype=dtype, seed=seed, device=device).permute(2, 3, 0, 1)


def channels_last(*shape: int, seed: int) -> Make:
    return lambda dtype, device: randn(*shape, dtype=dtype, seed=seed, device=device).contiguous(
        memory_format=torch.channels_last
    )


def permuted_3d(seed: int) -> Make:
    """A (5, 3, 2) view of a (3, 2, 5) tensor."""
    return lambda dtype, device: randn(3, 2, 5, dtype=dtype, seed=seed, device=device).permute(2, 0, 1)


def permuted_4d(seed: int) -> Make:
    """A (2, 4, 3, 5) view of a (2, 3, 4, 5) tensor: with dim=0 its columns are three strided runs, which no split
    of the Triton kernels' matrix view addresses (they read a copy, and write through scratch)."""
    return lambda dtype, device: randn(2, 3, 4, 5, dtype=dtype, seed=seed, device=device).permute(0, 2, 1, 3)


# The CPU kernels' and the reference's grid: small weights in every layout; `seed` varies per test.
CPU_LAYOUTS = [
    "contiguous",
    "transposed",
    "channels_last",
    "slice",
    "permuted",
    "conv_dim_neg",
    "column",
    "row",
    "vector",
]


def cpu_case(layout: str, seed: int) -> WeightCase:
    make, dim = {
        "contiguous": (plain(5, 7, seed=seed), 0),
        "transposed": (transposed(5, 7, seed), 0),  # a Linear weight stored as the transpose of a (in, out) tensor
        "channels_last": (channels_last(4, 3, 2, 3, seed=seed), 0),  # dim 0: no (outer, rows, inner) view exists
        "slice": (sliced(5, 7, seed, start=0, total=14), 1),  # not dense: every other column
        "permuted": (permuted_3d(seed), 1),  # 3-D, permuted, dim=1
        "conv_dim_neg": (plain(3, 4, 2, 5, seed=seed), -3),  # 4-D contiguous, negative dim
        "column": (plain(11, 1, seed=seed), 0),  # N x 1
        "row": (plain(1, 13, seed=seed), 0),  # 1 x N
        "vector": (plain(9, seed=seed), 0),  # 1-D
    }[layout]
    return WeightCase(layout, make, dim)


VF = {False: "u_first", True: "v_first"}


def cpu_round_grid() -> list[tuple]:
    """The CPU grid of the forward ops: (case, dtype, n, v_first, id) for every dtype, layout, n in (1, 3) and order;
    the weight's seed is n (the tests draw u, v with seed 20 + n)."""
    return [
        (cpu_case(layout, seed=n), dtype, n, v_first, f"{dtype_id(dtype)}-{layout}-{n}-{VF[v_first]}")
        for dtype in DTYPES
        for layout in CPU_LAYOUTS
        for n in (1, 3)
        for v_first in (False, True)
    ]


# opcheck on the CPU: every layout in float32, a few in the other dtypes (its checks pass for float16/bfloat16 too).
CPU_OPCHECK = (
    [(torch.float32, layout) for layout in CPU_LAYOUTS if layout not in ("row", "column")]
    + [(torch.float64, layout) for layout in ("contiguous", "permuted")]
    + [(torch.float16, "transposed"), (torch.bfloat16, "slice")]
)

# The CUDA kernels' grid: odd sizes, every layout, and shapes that exercise the split reductions.
CUDA_SMALL = [
    WeightCase("1x1", plain(1, 1), 0),
    WeightCase("1x300", plain(1, 300), 0),
    WeightCase("300x1", plain(300, 1), 0),
    WeightCase("61x37", plain(61, 37), 0),
    WeightCase("64x3x3x3", plain(64, 3, 3, 3), 0),
    WeightCase("vector_13", plain(13), 0),
    WeightCase("conv_transpose_32x16x4x4_dim1", plain(32, 16, 4, 4), 1),
    WeightCase("5x4x7x3_dim2", plain(5, 4, 7, 3), 2),
    WeightCase("5x4x3x7_dim-1", plain(5, 4, 3, 7), -1),
    WeightCase("transposed_61x37", transposed(61, 37, seed=1), 0),
    WeightCase("sliced_33x40", sliced(33, 40, seed=2), 0),
    WeightCase("sliced_33x40_dim1", sliced(33, 40, seed=2), 1),
    WeightCase("permuted_64x3x3x3", permuted(64, 3, 3, seed=3), 0),
    WeightCase("channels_last_16x8x3x3", channels_last(16, 8, 3, 3, seed=4), 0),
    WeightCase("channels_last_16x8x3x3_dim1", channels_last(16, 8, 3, 3, seed=4), 1),
]
# A long row (matvec split), a long column (W^T matvec split), and both.
CUDA_SPLIT = [
    WeightCase("1x100003", plain(1, 100003), 0),
    WeightCase("20011x1", plain(20011, 1), 0),
    WeightCase("97x4099", plain(97, 4099), 0),
]
CUDA_LARGE = [
    WeightCase("512x512x3x3", plain(512, 512, 3, 3), 0),
    WeightCase("4096x4096", plain(4096, 4096), 0),
    # channels_last read in place (its memory order's columns, v's elements found by block_walk::ColumnOrder): over
    # the grid, narrow and wide (4608 columns: two segments) rows
    WeightCase("channels_last_256x128x3x3", channels_last(256, 128, 3, 3, seed=5), 0),
    WeightCase("channels_last_64x512x3x3", channels_last(64, 512, 3, 3, seed=6), 0),
]
CUDA_SOME = [CUDA_SMALL[3], CUDA_SMALL[6], CUDA_SMALL[12], CUDA_SPLIT[2]]  # agreement with the CPU kernels
CUDA_OPCHECK = [
    (case, dtype) for dtype in (torch.float32, torch.float16) for case in [CUDA_SMALL[i] for i in (3, 6, 9, 13)]
]

# The Triton grid: odd sizes, a ConvTranspose-like dim=1, and layouts without a plain view, on every launch path.
TRITON_CASES = [
    WeightCase("13x7", plain(13, 7, seed=1), 0),
    WeightCase("conv_transpose_dim1", plain(3, 5, 2, 3, seed=2), 1),
    WeightCase("transposed", transposed(6, 7, seed=3), 0),
    WeightCase("channels_last", channels_last(4, 3, 2, 3, seed=4), 0),
    WeightCase("permuted_4d", permuted_4d(seed=14), 0),
    WeightCase("sliced_dim1", sliced(5, 7, seed=5, start=0, total=14), 1),
    WeightCase("1xN", plain(1, 37, seed=6), 0),
    WeightCase("Nx1", plain(41, 1, seed=7), 0),
    WeightCase("vector", plain(9, seed=8), 0),
]
# Real layer sizes, on the GPU only, with the default launch plan (one program up to FUSED_MAX_NUMEL, else the grid;
# every u-first round on them reads W once). The reduced grid runs them in float32 and bfloat16 only.
TRITON_BIG_DTYPES = [torch.float32, torch.bfloat16] if REDUCED_GRID else DTYPES
TRITON_BIG = [
    WeightCase("conv_64x3x3x3", plain(64, 3, 3, 3, seed=11), 0),
    WeightCase("linear_1000x2048", plain(1000, 2048, seed=12), 0),
    WeightCase("conv_512x256x3x3", plain(512, 256, 3, 3, seed=9), 0),
    WeightCase("conv_transpose_256x384x4x4_dim1", plain(256, 384, 4, 4, seed=10), 1),
    WeightCase("embedding_30011x128", plain(30011, 128, seed=13), 0),
    WeightCase("linear_1x8192", plain(1, 8192, seed=15), 0),  # one program, [1, 4096] tiles
    WeightCase("conv_channels_last_256x128x3x3", channels_last(256, 128, 3, 3, seed=16), 0),  # the grid, (C, H*W)
    WeightCase("conv_512x512x3x3", plain(512, 512, 3, 3, seed=17), 0),  # gram rounds on a GAN's widest layer
]


def matrix_size(weight: torch.Tensor, dim: int) -> tuple[int, int]:
    h = weight.shape[dim]
    return h, weight.numel() // h


def vectors(weight: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unit u, v of the matrix view's sizes, on the weight's device, in its dtype."""
    h, w = matrix_size(weight, dim)
    return unit(h, weight.dtype, seed, weight.device), unit(w, weight.dtype, seed + 1, weight.device)


# ---------------------------------------------------------------------------------------------------------------
# float64 oracles


def reference_forward_f64(weight, u, v, dim, n, v_first):
    """sn_ext.reference on float64 copies of the inputs."""
    return reference.spectral_normalize(weight.double(), u.double(), v.double(), dim, n, EPS, v_first)


def reference_backward_f64(grad, weight_sn, u, v, sigma, dim):
    return reference.spectral_normalize_backward(
        grad.double(), weight_sn.double(), u.double(), v.double(), sigma.double(), dim
    )


def numpy_forward(weight, u, v, dim, n, v_first):
    """An independent float64 numpy computation: (sigma, u, v, W_sn)."""
    mat = numpy_matrix(weight, dim)
    sigma, uo, vo = numpy_power_iteration(mat, u.double().cpu().numpy(), v.double().cpu().numpy(), n, EPS, v_first)
    return sigma, torch.from_numpy(uo), torch.from_numpy(vo), weight.double().cpu() / sigma


def numpy_backward(grad, weight_sn, u, v, sigma: float, dim):
    """(G - <G, S> u v^T) / sigma in float64 numpy, on the matrix views."""
    g, s = numpy_matrix(grad, dim), numpy_matrix(weight_sn, dim)
    un, vn = u.double().cpu().numpy(), v.double().cpu().numpy()
    return (g - np.sum(g * s) * np.outer(un, vn)) / sigma


def cuda_twins(make, dtype, seed=80, n_power_iterations=1):
    """(torch module, sn_ext module) on CUDA: equal weights, sn_ext's u, v copied from torch's."""
    torch.manual_seed(seed)
    base = make().to(device="cuda", dtype=dtype)
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch_param.spectral_norm(theirs, n_power_iterations=n_power_iterations)
    sn_ext.spectral_norm(ours, n_power_iterations=n_power_iterations)
    with torch.no_grad():
        ours.parametrizations.weight[0]._u.copy_(theirs.parametrizations.weight[0]._u)
        ours.parametrizations.weight[0]._v.copy_(theirs.parametrizations.weight[0]._v)
    return theirs, ours


def grouped_layers(dtype, device, seed=0):
    """The grouped ops' test model: weights of several shapes and layouts (dims 0 and 1), with unit u, v."""
    weights = [
        randn(6, 4, 3, 3, dtype=dtype, seed=seed),
        randn(5, 9, dtype=dtype, seed=seed + 1).t(),
        randn(4, 7, 2, 2, dtype=dtype, seed=seed + 2),
        randn(1, 13, dtype=dtype, seed=seed + 3),
    ]
    dims = [0, 0, 1, 0]
    weights = [w.to(device) for w in weights]
    us = [unit(w.shape[d], dtype, seed + 10 + i).to(device) for i, (w, d) in enumerate(zip(weights, dims))]
    vs = [unit(w.numel() // w.shape[d], dtype, seed + 20 + i).to(device) for i, (w, d) in enumerate(zip(weights, dims))]
    return weights, us, vs, dims
