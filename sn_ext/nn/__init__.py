from .spectral_norm import SpectralNorm, spectral_norm

__all__ = ["SpectralNorm", "spectral_norm"]
