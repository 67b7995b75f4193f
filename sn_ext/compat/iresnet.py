"""i-ResNet's spectral_norm_fc (jhjacobsen/invertible-resnet models/spectral_norm_fc.py), whose third positional
argument is `name` (DUE's is n_power_iterations), on sn_ext's fused ops: see sn_ext.compat."""

from torch import nn

from .. import legacy


def spectral_norm_fc(
    module: nn.Module,
    coeff: float,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> nn.Module:
    """W / max(1, sigma / coeff) on `module.<name>`, as i-ResNet's spectral_norm_fc; returns the module."""
    return legacy.spectral_norm(module, name, n_power_iterations, eps, dim, coeff=coeff)
