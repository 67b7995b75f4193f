"""sn_ext: fused spectral normalization for PyTorch, a drop-in for torch's spectral_norm.

Usage::

    import sn_ext
    layer = sn_ext.spectral_norm(torch.nn.Linear(20, 40))  # as torch.nn.utils.parametrizations.spectral_norm
    layer = sn_ext.legacy.spectral_norm(torch.nn.Linear(20, 40))  # as torch.nn.utils.spectral_norm
    model = sn_ext.grouped_spectral_norm(model)  # every layer's W / sigma in one op per forward of the model
"""

from . import backends, legacy, ops  # importing ops loads the kernels
from ._info import info
from ._version import __version__
from .nn import (
    SpectralNorm,
    grouped_spectral_norm,
    renormalize_buffers_,
    spectral_norm,
    ungroup_spectral_norm,
)

__all__ = [
    "__version__",
    "SpectralNorm",
    "backends",
    "grouped_spectral_norm",
    "info",
    "legacy",
    "ops",
    "renormalize_buffers_",
    "spectral_norm",
    "ungroup_spectral_norm",
]
