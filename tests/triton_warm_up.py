"""The launches of the Triton test grid, for `python -m sn_ext.triton.warm_up --calls`: the GPU check compiles the
kernel variants of the Triton cases in parallel before running them (a cold compile is 0.3-0.5 s per variant, one
at a time inside pytest otherwise).

    SN_EXT_TEST_GRID=reduced python -m sn_ext.triton.warm_up --processes 16 \
        --calls tests/triton_warm_up.py:grid_launches

grid_launches() replays, on CPU tensors (the warm-up runs them under its dry run: bound as on the GPU, not run), the
"triton" cases of the per-op tests' main grids (test_matches_reference of tests/test_spectral_normalize.py and
tests/test_spectral_normalize_backward.py, the real layer sizes included) and the one-read round cases of
tests/test_triton.py, with the same weights, layouts, dtypes, launch paths and rounds: the variants those compile.
The few other Triton tests compile theirs when they run.
"""

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from op_cases import EPS, TRITON_PATHS, vectors  # noqa: E402

from sn_ext import reference  # noqa: E402
from sn_ext.triton import _host  # noqa: E402


def _triton_params(params) -> list[tuple]:
    return [p.values[1:] for p in params if p.values[0] == "triton"]


@contextlib.contextmanager
def _path(path: str | None):
    """The launch-plan knobs of a Triton test path (tests/op_cases.py; None: the default plan)."""
    knobs = TRITON_PATHS.get(path, {})
    saved = {name: getattr(_host, name) for name in knobs}
    for name, value in knobs.items():
        setattr(_host, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_host, name, value)


def grid_launches() -> None:
    import test_spectral_normalize
    import test_spectral_normalize_backward
    import test_triton
    from helpers import randn

    forward = torch.ops.sn_ext.triton_spectral_normalize_.default
    backward = torch.ops.sn_ext.triton_spectral_normalize_backward.default
    for case, vector_seed, dtype, n, v_first, path in _triton_params(
        test_spectral_normalize._matches_reference_params()
    ):
        weight = case.make(dtype, "cpu")
        u, v = vectors(weight, case.dim, vector_seed)
        with _path(path):
            forward(weight, u, v, case.dim, n, EPS, v_first)
    for case, dtype, _, path in _triton_params(test_spectral_normalize_backward._params()):
        weight = case.make(dtype, "cpu")
        u, v = vectors(weight, case.dim, seed=20)
        weight_sn, sigma, u_new, v_new = reference.spectral_normalize(weight, u, v, case.dim, 1, EPS)
        grad = randn(*weight.shape, dtype=dtype, seed=30)
        with _path(path):
            backward(grad, weight_sn, u_new, v_new, sigma, case.dim)
    for _, make, dim in test_triton.GRID_ONE_PASS_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            weight = make(dtype).cpu()
            u, v = vectors(weight, dim, seed=61)
            for n in (1, 2):
                with _path("gram"):
                    forward(weight, u, v, dim, n, EPS, False)
