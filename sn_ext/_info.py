"""What sn_ext can run here, for `sn_ext.info()` and `python -m sn_ext.info`."""

import sys

import torch

from . import backends
from ._version import __version__
from .ops import library_status


def info() -> dict:
    """Versions; for each backend whether it is usable here and why (not); and what backend="auto" picks on each
    available device, per dtype (see sn_ext.backends)."""
    choice = backends.summary()
    return {
        "sn_ext": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "compiled_library": {"loaded": library_status.loaded, "reason": library_status.reason},
        "backends": choice["backends"],
        "auto": choice["auto"],
    }
