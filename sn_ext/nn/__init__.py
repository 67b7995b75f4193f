from .conv_parametrization import ConvSpectralNorm
from .conv_spectral_norm import conv_spectral_norm
from .grouped import SpectralNormGroup, grouped_spectral_norm, ungroup_spectral_norm
from .renormalize import renormalize_buffers_
from .sigma_reparam import SigmaReparam, sigma_reparam, sigma_reparam_model
from .spectral_norm import SpectralNorm, spectral_norm

__all__ = [
    "ConvSpectralNorm",
    "SpectralNorm",
    "SigmaReparam",
    "SpectralNormGroup",
    "conv_spectral_norm",
    "grouped_spectral_norm",
    "renormalize_buffers_",
    "sigma_reparam",
    "sigma_reparam_model",
    "spectral_norm",
    "ungroup_spectral_norm",
]
