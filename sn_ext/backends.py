"""Which kernels run a spectral norm: the backends, why each can or cannot take an input, and the automatic choice.

Every backend is a set of ops with the schemas of sn_ext::spectral_normalize_ (u and v updated in place),
sn_ext::spectral_normalize_backward and sn_ext::spectral_normalize_scaled_backward, sharing the fake kernels and
autograd formulas (sn_ext/ops.py):

=============  ==========================================  ====================================================
backend        ops                                         takes
=============  ==========================================  ====================================================
"cpu"          sn_ext::spectral_normalize_ (csrc/cpu)      CPU tensors, when the compiled library is loaded
"cuda"         sn_ext::spectral_normalize_ (csrc/cuda)     CUDA tensors, when the library was built with CUDA
"triton"       sn_ext::triton_spectral_normalize_          CUDA tensors, with triton >= 3.2 and torch >= 2.6
               (sn_ext/triton)                             (CPU tensors instead under TRITON_INTERPRET=1: slow)
"reference"    sn_ext::reference_spectral_normalize_       any device (pure PyTorch)
"auto"         the fastest that can take the weight: cuda, then triton, then reference on a CUDA device; cpu, then
               reference on the CPU; reference elsewhere
=============  ==========================================  ====================================================

How a module chooses (the `backend=` argument of sn_ext.spectral_norm and sn_ext.legacy.spectral_norm;
sn_ext/nn/_kernels.py keeps the choice in the module):

- the name is the argument, else $SN_EXT_BACKEND read when the module is created, else "auto";
- a named backend that cannot run on this machine at all (not built, triton missing, no GPU) raises
  BackendUnavailable at creation, with the reasons;
- the kernels for a (name, device, dtype) are chosen once and cached (what a backend takes depends on the device type);
  a module keeps its choice and looks again only if its weight's device or dtype changed since (after .cuda(), .half()
  ...), so a step calls one op and pays two comparisons (about 0.2 us). A named backend that cannot take the weight
  there (a CPU weight for "cuda") raises BackendUnavailable, saying why, when the module first runs on it; the warm-up
  at creation (and the run of the new parametrization that torch's register_parametrization makes), which run where the
  weight is, use "auto"'s choice in that case, so that a model can be built on the CPU and then moved to the GPU.
"""

import dataclasses
import importlib.util
import os

import torch

from . import _library, _matrix, ops

BACKENDS = ("cpu", "cuda", "triton", "reference")
CHOICES = ("auto", *BACKENDS)
ENV_VAR = "SN_EXT_BACKEND"
LAUNCH_ENV_VAR = "SN_EXT_CUDA_LAUNCH"  # how the CUDA kernels launch (csrc/cuda/launch.h)
# What "auto" tries, in order, by device type; any other device gets the reference.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailable(RuntimeError):
    """A backend chosen by name cannot run here, or cannot take this weight; the message says why."""


@dataclasses.dataclass(frozen=True, eq=False)
class Backend:
    name: str
    description: str
    forward_op: str  # names in the sn_ext namespace
    backward_op: str
    scaled_backward_op: str

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (empty when it can)."""
        return list(_MACHINE_REASONS[self.name]())

    def device_types(self) -> tuple[str, ...] | None:
        """The device types it takes (None: any)."""
        if self.name == "triton":
            from . import triton as sn_triton

            return ("cpu",) if sn_triton.interpreted() else ("cuda",)
        return {"cpu": ("cpu",), "cuda": ("cuda",)}.get(self.name)

    def not_supported_reasons(self, device: torch.device | str, dtype: torch.dtype) -> list[str]:
        """Why this backend cannot take a weight on `device` of `dtype` (empty when it can)."""
        reasons = self.unavailable_reasons()
        if reasons:
            return reasons
        device = torch.device(device)
        types = self.device_types()
        if types is not None and device.type not in types:
            where = " or ".join(t.upper() for t in types)
            reasons.append(
                f"it takes {where} tensors and the weight is on {device}"
                + (
                    " (set TRITON_INTERPRET=1 before sn_ext loads its Triton kernels to run them on the CPU, slowly)"
                    if self.name == "triton" and device.type == "cpu"
                    else ""
                )
            )
        if dtype in _matrix.COMPLEX_DTYPES and self.name != "reference":
            reasons.append(f"complex weights run on the reference backend only, not {dtype}")
        elif dtype not in _matrix.REAL_DTYPES and dtype not in _matrix.COMPLEX_DTYPES:
            reasons.append(f"it takes float32, float64, float16 or bfloat16 weights, not {dtype}")
        return reasons

    @property
    def forward(self):
        """(W, u, v, dim, n, eps, v_first=False, coeff=None, gamma=None, sigma_grad=True) -> (W_sn, sigma, u_used,
        v_used), u and v updated in place: sn_ext::spectral_normalize_'s schema, whichever backend."""
        return getattr(torch.ops.sn_ext, self.forward_op).default

    @property
    def backward(self):
        return getattr(torch.ops.sn_ext, self.backward_op).default

    @property
    def scaled_backward(self):
        return getattr(torch.ops.sn_ext, self.scaled_backward_op).default

    def __reduce__(self):  # pickles by name (ops do not pickle)
        return get, (self.name,)


# ---- machine-level reasons, per backend ----


def _cpu_reasons():
    if not ops.library_status.loaded:
        yield ops.library_status.reason
    elif not _library.has_compiled_kernel("CPU"):
        yield "the compiled library has no CPU kernels"


def _cuda_reasons():
    if not ops.library_status.loaded:
        yield ops.library_status.reason
    elif not _library.has_compiled_kernel("CUDA"):
        yield (
            "the compiled library was built without CUDA (build with CUDA_HOME set and a CUDA build of torch, "
            "or FORCE_CUDA=1)"
        )
    elif not torch.cuda.is_available():
        yield "compiled, but no CUDA device is visible"


def _triton_reasons():
    from . import triton as sn_triton

    if sn_triton.load_status() is None:  # not loaded yet: answer what we can without importing triton
        if not hasattr(torch.library, "triton_op"):
            yield f"torch {torch.__version__} lacks torch.library.triton_op / wrap_triton (torch >= 2.6)"
            return
        if importlib.util.find_spec("triton") is None:
            yield "triton is not installed (pip install 'triton>=3.2')"
            return
        if not sn_triton.interpreted() and not torch.cuda.is_available():
            yield (
                "no CUDA device is visible (set TRITON_INTERPRET=1 before sn_ext loads its Triton kernels to run "
                "them on the CPU, slowly)"
            )
            return
    loaded, reason = sn_triton.load()
    if not loaded:
        yield reason
    elif not sn_triton.interpreted() and not torch.cuda.is_available():
        yield "no CUDA device is visible"


def _no_reasons():
    return ()


_MACHINE_REASONS = {"cpu": _cpu_reasons, "cuda": _cuda_reasons, "triton": _triton_reasons, "reference": _no_reasons}

_BACKENDS = {
    "cpu": Backend("cpu", "fused C++ kernels (csrc/cpu)", *_library.BACKEND_SCHEMAS),
    "cuda": Backend("cuda", "fused CUDA kernels (csrc/cuda)", *_library.BACKEND_SCHEMAS),
    "triton": Backend(
        "triton",
        "Triton kernels (sn_ext/triton)",
        *(f"triton_{name}" for name in _library.BACKEND_SCHEMAS),
    ),
    "reference": Backend("reference", "pure PyTorch (sn_ext/reference.py)", *_library.REFERENCE_OPS),
}


def get(name: str) -> Backend:
    """The backend of that name ("cpu", "cuda", "triton", "reference")."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"sn_ext: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}") from None


# ---- the choice ----


class Kernels:
    """What a module calls: the chosen backend's forward (Backend.forward's op, or for the compiled
    spectral_normalize_ its direct binding: sn_ext.ops.eager_forward), for weights on one device of one dtype.
    Immutable.

    Modules check `kernels.device != weight.device or kernels.dtype != weight.dtype` before each call (about
    0.2 us; `weight.device.type` alone would cost twice that)."""

    def __init__(self, requested: str, backend: Backend | None, device: torch.device | None, dtype: torch.dtype | None):
        self.requested = requested
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.forward = ops.eager_forward(backend.forward_op) if backend is not None else None

    def __repr__(self) -> str:
        name = self.backend.name if self.backend is not None else "unresolved"
        return f"Kernels({self.requested!r} -> {name!r} for {self.device}, {self.dtype})"

    def __deepcopy__(self, memo) -> "Kernels":
        return self

    def __reduce__(self):  # ops do not pickle: an unpickled module chooses again when it first runs
        return unresolved, (self.requested,)


def unresolved(requested: str) -> Kernels:
    """A placeholder that matches no weight: the module chooses when it first runs."""
    return Kernels(requested, None, None, None)


def requested_backend(backend: str | None) -> str:
    """The backend a new module asks for: `backend`, else $SN_EXT_BACKEND, else "auto". Raises ValueError for an
    unknown name and BackendUnavailable for a backend that cannot run on this machine."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR, "") or "auto", ENV_VAR
    if backend not in CHOICES:
        raise ValueError(f"sn_ext: unknown backend {backend!r} (from {source}); expected one of {', '.join(CHOICES)}")
    if backend != "auto":
        reasons = get(backend).unavailable_reasons()
        if reasons:
            raise BackendUnavailable(
                f"sn_ext: the {backend!r} backend cannot run here: {'; '.join(reasons)}"
                + (f" (chosen by {ENV_VAR})" if source == ENV_VAR else "")
            )
    return backend


def auto_backend(device: torch.device | str, dtype: torch.dtype) -> Backend:
    """What "auto" picks for a weight on `device` of `dtype`: the first of AUTO_ORDER that can take it."""
    device_type = torch.device(device).type
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        if not get(name).not_supported_reasons(device, dtype):
            return get(name)
    return get("reference")


# (requested, device, dtype) -> the choice, or the error to raise. A plain dict, so that torch.compile traces a
# lookup of a cached choice (initial_kernels() fills it for a new module's weight on every usable device).
_CHOSEN: dict[tuple[str, torch.device, torch.dtype], "Kernels | BackendUnavailable"] = {}


def _choose(requested: str, device: torch.device, dtype: torch.dtype) -> "Kernels | BackendUnavailable":
    if requested == "auto":
        return Kernels(requested, auto_backend(device, dtype), device, dtype)
    reasons = get(requested).not_supported_reasons(device, dtype)
    if reasons:
        return BackendUnavailable(
            f"sn_ext: the {requested!r} backend cannot take a {dtype} weight on {device}: {'; '.join(reasons)}"
        )
    return Kernels(requested, get(requested), device, dtype)


def _chosen(requested: str, device: torch.device, dtype: torch.dtype) -> "Kernels | BackendUnavailable":
    key = (requested, device, dtype)
    kernels = _CHOSEN.get(key)
    if kernels is None:
        kernels = _CHOSEN[key] = _choose(requested, device, dtype)
    return kernels


def select(requested: str, device: torch.device | str, dtype: torch.dtype) -> Kernels:
    """The kernels for a weight on `device` of `dtype` (chosen once per name, device and dtype; what a backend
    takes depends on the device type only). Raises BackendUnavailable when a named backend cannot take it."""
    kernels = _chosen(requested, torch.device(device), dtype)
    if isinstance(kernels, BackendUnavailable):
        raise kernels
    return kernels


def initial_kernels(requested: str, weight: torch.Tensor) -> Kernels:
    """The kernels a new module keeps: the choice for its weight, or unresolved() if the requested backend cannot
    take the weight where it is (the module chooses again, strictly, when it runs). Also fills the cache for the
    weight's dtype on the other usable devices, so that a module moved there finds its kernels with a dictionary
    lookup (which torch.compile traces) rather than a fresh choice."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    for device in devices:
        _chosen(requested, device, weight.dtype)
    try:
        return select(requested, weight.device, weight.dtype)
    except BackendUnavailable:
        return unresolved(requested)


def summary() -> dict:
    """For sn_ext.info(): each backend's usability and reason, and what "auto" picks per device and dtype."""
    backends = {}
    for name, backend in _BACKENDS.items():
        reasons = backend.unavailable_reasons()
        if reasons:
            backends[name] = {"usable": False, "reason": "; ".join(reasons)}
        else:
            backends[name] = {"usable": True, "reason": _usable_reason(backend)}
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    auto = {
        device: {
            str(dtype).replace("torch.", ""): auto_backend(device, dtype).name
            for dtype in (*_matrix.REAL_DTYPES, *_matrix.COMPLEX_DTYPES)
        }
        for device in devices
    }
    return {"backends": backends, "auto": auto}


def _usable_reason(backend: Backend) -> str:
    if backend.name == "cpu":
        return f"fused C++ kernels ({ops.library_status.built_with_cpu_isa} build)"
    if backend.name == "cuda":
        device = torch.cuda.current_device()
        return (
            f"compiled for CUDA {ops.library_status.built_with_cuda}, device {torch.cuda.get_device_name(device)}, "
            f"launches: {_library.cuda_launch(device)} (${LAUNCH_ENV_VAR}: auto, cooperative or phased)"
        )
    if backend.name == "triton":
        from . import triton as sn_triton

        return f"Triton kernels: {sn_triton.load()[1]}"
    return "pure PyTorch; serves every device without a compiled kernel"
