"""sn_ext: fused spectral normalization for PyTorch, a drop-in for torch's spectral_norm.

Usage::

    import sn_ext
    layer = sn_ext.spectral_norm(torch.nn.Linear(20, 40))  # as torch.nn.utils.parametrizations.spectral_norm
    layer = sn_ext.legacy.spectral_norm(torch.nn.Linear(20, 40))  # as torch.nn.utils.spectral_norm
    layer = sn_ext.spectral_norm(torch.nn.Linear(20, 40), coeff=0.95)  # bounded: W / max(1, sigma / 0.95)
    layer = sn_ext.sigma_reparam(torch.nn.Linear(20, 40))  # sigma-reparam: gamma W / sigma, gamma learned
    model = sn_ext.grouped_spectral_norm(model)  # every layer's W / sigma in one op per forward of the model
    conv = sn_ext.conv_spectral_norm(torch.nn.Conv2d(3, 64, 3), input_shape=(3, 32, 32))  # the operator's norm
    model = sn_ext.convert_spectral_norm(model)  # a built model's torch spectral norms -> sn_ext's, in place
    sn_ext.sigmas(model); print(sn_ext.spectral_report(model, x))  # each sigma; exact sigmas, operator norms
"""

from . import backends, compat, legacy, ops  # importing ops loads the kernels
from ._info import info
from ._version import __version__
from .convert import convert_spectral_norm, restore_torch_spectral_norm
from .diagnostics import SpectralReport, sigmas, spectral_report
from .nn import (
    ConvSpectralNorm,
    SigmaReparam,
    SpectralNorm,
    conv_spectral_norm,
    grouped_spectral_norm,
    renormalize_buffers_,
    sigma_reparam,
    sigma_reparam_model,
    spectral_norm,
    ungroup_spectral_norm,
)
from .patch import patch_torch

__all__ = [
    "__version__",
    "ConvSpectralNorm",
    "SigmaReparam",
    "SpectralNorm",
    "SpectralReport",
    "backends",
    "compat",
    "conv_spectral_norm",
    "convert_spectral_norm",
    "grouped_spectral_norm",
    "info",
    "legacy",
    "ops",
    "patch_torch",
    "renormalize_buffers_",
    "restore_torch_spectral_norm",
    "sigma_reparam",
    "sigma_reparam_model",
    "sigmas",
    "spectral_norm",
    "spectral_report",
    "ungroup_spectral_norm",
]
