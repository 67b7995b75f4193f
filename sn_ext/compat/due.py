"""DUE's spectral_norm_fc (y0ast/DUE due/layers/spectral_norm_fc.py; DDU's and lightning-uq-box's are copies of it,
with this argument order), on sn_ext's fused ops: see sn_ext.compat."""

from torch import nn

from .. import legacy


def spectral_norm_fc(
    module: nn.Module,
    coeff: float,
    n_power_iterations: int = 1,
    name: str = "weight",
    eps: float = 1e-12,
    dim: int | None = None,
) -> nn.Module:
    """W / max(1, sigma / coeff) on `module.<name>`, as DUE's spectral_norm_fc; returns the module."""
    return legacy.spectral_norm(module, name, n_power_iterations, eps, dim, coeff=coeff)
