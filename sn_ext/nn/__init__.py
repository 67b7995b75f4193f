from .renormalize import renormalize_buffers_
from .spectral_norm import SpectralNorm, spectral_norm

__all__ = ["SpectralNorm", "renormalize_buffers_", "spectral_norm"]
