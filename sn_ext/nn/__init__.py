from .grouped import SpectralNormGroup, grouped_spectral_norm, ungroup_spectral_norm
from .renormalize import renormalize_buffers_
from .spectral_norm import SpectralNorm, spectral_norm

__all__ = [
    "SpectralNorm",
    "SpectralNormGroup",
    "grouped_spectral_norm",
    "renormalize_buffers_",
    "spectral_norm",
    "ungroup_spectral_norm",
]
