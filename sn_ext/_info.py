"""What sn_ext can run here, for `sn_ext.info()` and `python -m sn_ext.info`."""
import json
import sys

import torch

from . import __version__, _library
from .ops import library_status


def _cuda_backend() -> dict:
    if not library_status.loaded:
        return {"usable": False, "reason": library_status.reason}
    if not _library.has_compiled_kernel("CUDA"):
        return {"usable": False, "reason": "the compiled library was built without CUDA "
                                           "(build with CUDA_HOME set and a CUDA build of torch, or FORCE_CUDA=1)"}
    if not torch.cuda.is_available():
        return {"usable": False, "reason": "compiled, but no CUDA device is visible"}
    return {"usable": True, "reason": f"compiled for CUDA {library_status.built_with_cuda}, "
                                      f"device {torch.cuda.get_device_name()}"}


def info() -> dict:
    """Versions, and for each backend whether it is usable here and why (not)."""
    cpu_compiled = library_status.loaded and _library.has_compiled_kernel("CPU")
    return {
        "sn_ext": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "compiled_library": {"loaded": library_status.loaded, "reason": library_status.reason},
        "backends": {
            "cpu": {"usable": cpu_compiled,
                    "reason": f"fused C++ kernels ({library_status.built_with_cpu_isa} build)" if cpu_compiled
                    else library_status.reason},
            "cuda": _cuda_backend(),
            "reference": {"usable": True, "reason": "pure PyTorch; serves every device without a compiled kernel"},
        },
    }


