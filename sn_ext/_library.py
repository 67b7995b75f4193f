"""Loads the compiled kernels, or defines the ops without them, and fills every gap with the reference.

After `load()`, every sn_ext op exists with the same schema whatever happened:
- the compiled library `sn_ext._C` defines the schemas and registers CPU (and, in a CUDA build, CUDA) kernels;
- without it (not built, failed to load, or SN_EXT_DISABLE_EXT=1) the schemas come from _schemas.py;
- the pure-PyTorch reference is registered as the CompositeExplicitAutograd kernel, so it serves every device
  that has no compiled kernel (a CUDA tensor with a CPU-only build, MPS, ...): compiled kernels always win;
- the reference is also defined as sn_ext::reference_spectral_normalize_(_backward, _scaled_backward), for the
  "reference" backend.
"""

import dataclasses
import importlib.util
import inspect
import os
import warnings

import torch

from . import _schemas, reference


@dataclasses.dataclass(frozen=True)
class LibraryStatus:
    loaded: bool  # the compiled library is in use
    reason: str  # why it is not, or what it was built with
    built_with_torch: str | None = None
    built_with_cuda: str | None = None  # "" for a CPU-only build
    built_with_cpu_isa: str | None = None  # "avx2" or "baseline"


_libraries: list[torch.library.Library] = []  # kept alive: a Library's registrations end when it is collected
compiled = None  # the compiled library's module (sn_ext._C) once load() found it usable, else None


def _load_compiled() -> LibraryStatus:
    if os.environ.get("SN_EXT_DISABLE_EXT", "0") == "1":
        return LibraryStatus(False, "disabled by SN_EXT_DISABLE_EXT=1")
    try:
        from . import _C
    except ImportError as error:
        reason = f"the compiled library could not be imported: {error}"
        if importlib.util.find_spec(f"{__package__}._C") is not None:  # built, but broken: say so once, loudly
            warnings.warn(
                f"sn_ext: {reason}. sn_ext runs on its pure-PyTorch reference kernels (slow) until it is "
                "rebuilt against this torch (pip install --no-build-isolation sn_ext); set "
                "SN_EXT_DISABLE_EXT=1 to use them without this warning.",
                RuntimeWarning,
                stacklevel=2,
            )
        return LibraryStatus(False, reason)
    global compiled
    compiled = _C
    cuda = f"CUDA {_C.built_with_cuda}" if _C.built_with_cuda else "CPU only"
    return LibraryStatus(
        True,
        f"built for torch {_C.built_with_torch}, {cuda}, CPU code for {_C.built_with_cpu_isa}",
        _C.built_with_torch,
        _C.built_with_cuda,
        _C.built_with_cpu_isa,
    )


def cuda_launch(device_index: int) -> str:
    """How the compiled CUDA kernels launch on a device (csrc/cuda/launch.h): "cooperative", or "phased (why)"."""
    from . import _C

    return _C.cuda_launch(device_index)


def _define_schemas() -> None:
    lib = torch.library.Library(_schemas.NAMESPACE, "DEF")
    for name, schema in _schemas.SCHEMAS.items():
        lib.define(name + schema)
    _libraries.append(lib)


def _register_reference() -> None:
    lib = torch.library.Library(_schemas.NAMESPACE, "IMPL")
    for name in _schemas.SCHEMAS:
        lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
    _libraries.append(lib)


# The ops of a backend's set (sn_ext.backends), as the compiled library names them; every other backend's have the
# same schemas under its own prefix.
BACKEND_SCHEMAS = ("spectral_normalize_", "spectral_normalize_backward", "spectral_normalize_scaled_backward")
# The reference again under its own names, with the same schemas: the "reference" backend (sn_ext.backends) calls
# these, so that it can be chosen on a device whose sn_ext::spectral_normalize_ runs compiled kernels.
REFERENCE_OPS = tuple(f"reference_{name}" for name in BACKEND_SCHEMAS)


def _define_reference_ops() -> None:
    lib = torch.library.Library(_schemas.NAMESPACE, "FRAGMENT")
    schemas = [_schemas.SCHEMAS[name] for name in BACKEND_SCHEMAS]
    for name, schema in zip(REFERENCE_OPS, schemas):
        lib.define(name + schema)
        lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
    _libraries.append(lib)


def replace_impl(lib: torch.library.Library, name: str, kernel, dispatch_key: str) -> None:
    """lib.impl(name, kernel, dispatch_key), replacing a kernel registered before from Python (torch.library.triton_op
    gives its ops an Autograd kernel of its own). torch 2.11 refuses that unless told; torch 2.6 knows no such flag
    (its check is a set of registered keys) and warns from the dispatcher."""
    if "allow_override" in inspect.signature(lib.impl).parameters:
        lib.impl(name, kernel, dispatch_key, allow_override=True)
        return
    torch.library._impls.discard(f"{lib.ns}/{name}/{dispatch_key}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        lib.impl(name, kernel, dispatch_key)


def keep_alive(lib: torch.library.Library) -> None:
    """Keeps a Library's registrations for the life of the process."""
    _libraries.append(lib)


def load() -> LibraryStatus:
    status = _load_compiled()
    if not status.loaded:
        _define_schemas()
    _register_reference()
    _define_reference_ops()
    return status


def has_compiled_kernel(dispatch_key: str) -> bool:
    """Whether the compiled library registered a kernel for this dispatch key ("CPU", "CUDA")."""
    qualname = f"{_schemas.NAMESPACE}::spectral_normalize_"
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
