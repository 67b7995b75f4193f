"""sn_ext's Triton backend: the fused forward and rank-1 backward as Triton kernels, one file per op (its launch plan
and op): spectral_normalize.py (sn_ext::triton_spectral_normalize_, its kernels in one module per launch path:
_one_program.py, _grid.py, _gram.py) and spectral_normalize_backward.py (sn_ext::triton_spectral_normalize_backward
and _scaled_backward, with their kernels); _host.py holds the launch-plan knobs and host helpers both use,
_launch.py how they launch, _helpers.py the device functions; warm_up.py compiles a model's kernel variants ahead of
a run.

Nothing here imports triton until `load()` is called (sn_ext.backends calls it the first time the "triton" backend
is chosen), so `import sn_ext` stays fast and works without triton. The kernels run on CUDA tensors; with
TRITON_INTERPRET=1 in the environment before `load()`, Triton's interpreter runs them on CPU tensors instead
(slowly: for tests).

Requirements: triton >= 3.2 and torch >= 2.6 (torch.library.triton_op / wrap_triton).
"""

import os

import torch

MIN_TRITON = (3, 2)
_status: tuple[bool, str] | None = None  # (loaded, reason), once load() ran
_interpreted: bool | None = None  # whether the loaded kernels are Triton's interpreted functions


def interpreted() -> bool:
    """Whether the kernels run (or, not loaded yet, would run) in Triton's CPU interpreter: TRITON_INTERPRET=1 when
    they were loaded, since triton.jit reads it then."""
    if _interpreted is not None:
        return _interpreted
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_status() -> tuple[bool, str] | None:
    """load()'s result, or None if it has not run."""
    return _status


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def load() -> tuple[bool, str]:
    """Imports triton and registers the Triton ops (once). Returns (loaded, why not / what was loaded)."""
    global _status
    if _status is not None:
        return _status
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        _status = (False, f"torch {torch.__version__} lacks torch.library.triton_op / wrap_triton (torch >= 2.6)")
        return _status
    try:
        import triton
    except ImportError as error:
        _status = (False, f"triton is not installed ({error}); pip install 'triton>=3.2'")
        return _status
    if _version_tuple(triton.__version__) < MIN_TRITON:
        _status = (False, f"triton {triton.__version__} is too old: sn_ext's kernels need triton >= 3.2")
        return _status
    try:  # defines the ops, then gives them the fake kernels and autograd formulas every backend shares (no
        # autocast exclusion: the kernels run in the inputs' dtype whatever autocast says)
        from .. import _library, ops
        from . import _one_program, spectral_normalize, spectral_normalize_backward

        eager_kernels = {
            spectral_normalize.FORWARD: spectral_normalize.eager,
            spectral_normalize_backward.BACKWARD: spectral_normalize_backward.eager,
            spectral_normalize_backward.SCALED_BACKWARD: spectral_normalize_backward.eager_scaled,
        }
        names = [qualname.split("::")[1] for qualname in eager_kernels]
        ops.register_backend_ops(*names, autocast=False)
        # Eager calls run the kernels directly; the triton_op's own kernel stays what torch.compile traces.
        lib = torch.library.Library("sn_ext", "IMPL")
        for name, eager in zip(names, eager_kernels.values()):
            _library.replace_impl(lib, name, eager, "CompositeExplicitAutograd")
        _library.keep_alive(lib)
    except Exception as error:  # a broken triton install, or an op registration torch rejects
        _status = (False, f"the Triton ops failed to register: {type(error).__name__}: {error}")
        return _status
    global _interpreted
    _interpreted = type(_one_program.fused_forward_kernel).__name__ == "InterpretedFunction"
    mode = "interpreter (TRITON_INTERPRET=1), CPU tensors" if _interpreted else "CUDA tensors"
    _status = (True, f"triton {triton.__version__}, {mode}")
    return _status
