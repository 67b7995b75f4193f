"""The Python twin of csrc/autocast.cpp: sn_ext's ops run in their inputs' dtype (the weight's) with autocast off
inside them, whatever the autocast dtype. A custom op with no Autocast kernel falls through that key with autocast
still on, and the reference's matmuls then ran in bfloat16/float16 and returned a bfloat16 sigma (the fake kernel
says float32). The compiled library registers this in C++; without it, register() does it here (sn_ext/ops.py), and
the other backends' ops get it through register_ops()."""

import contextlib

import torch

from . import _library

_ops = torch.ops.sn_ext

_AUTOCAST_KEYS = {"AutocastCPU": "cpu", "AutocastCUDA": "cuda"}


def autocast_off(device_type: str):
    """Autocast off for `device_type` within the block (nothing where autocast does not exist). CPU and CUDA, which
    always have it, skip the availability query: torch 2.11's dynamo cannot trace it (torch.compile of a layer)."""
    if device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type):  # a tuple: 2.6's dynamo
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _without_autocast(op, device_type: str):
    def kernel(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)

    return kernel


def register_ops(names) -> None:
    """Registers the autocast exclusion for these ops (names in the sn_ext namespace)."""
    lib = torch.library.Library("sn_ext", "IMPL")
    for name in names:
        for key, device in _AUTOCAST_KEYS.items():
            lib.impl(name, _without_autocast(getattr(_ops, name).default, device), key)
    _library.keep_alive(lib)


def register() -> None:
    """Without the compiled library: the exclusion for every sn_ext op, as csrc/autocast.cpp registers it."""
    register_ops(
        (
            "power_iteration_",
            "spectral_normalize_",
            "spectral_normalize_backward",
            "spectral_normalize_scaled_backward",
            "spectral_normalize_grouped_",
            "spectral_normalize_grouped_backward",
        )
    )
