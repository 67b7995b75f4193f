"""sn_ext.legacy.spectral_norm: a drop-in for the legacy torch.nn.utils.spectral_norm (forward pre-hook).

As torch's: parameter `<name>_orig`, buffers `<name>_u`, `<name>_v`, a plain attribute `<name>` recomputed before
each forward, v-then-u power iteration in train mode, none in eval, no warm-up, and remove_spectral_norm bakes
the normalized weight in. The hook is a subclass of torch's (sn_ext/nn/legacy_hook.py), so torch's own
torch.nn.utils.remove_spectral_norm removes it. Beyond torch: a checkpoint of torch's parametrization version loads
too, a step whose weight is non-finite or zero leaves u and v as they were, and removal leaves no hook behind (torch's
removal of its own hook leaves its load_state_dict pre-hook). `coeff` gives the bounded form in DUE's and i-ResNet's
layout (sn_ext.compat has their spectral_norm_fc).
"""

from torch import nn
from torch.nn.utils.spectral_norm import remove_spectral_norm as _torch_remove_spectral_norm

from .nn.legacy_hook import SpectralNorm
from .nn.spectral_norm import default_dim


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    backend: str | None = None,
    coeff: float | None = None,
    sigma_grad: bool = True,
) -> nn.Module:
    """Applies legacy-style spectral normalization to `module.<name>`; torch.nn.utils.spectral_norm's arguments,
    and `backend` as sn_ext.spectral_norm's ("auto", "cpu", "cuda", "triton", "reference"; None: $SN_EXT_BACKEND,
    else "auto").

    `coeff=c` bounds the norm instead, W / max(1, sigma / c), in the layout of DUE's and i-ResNet's
    spectral_norm_fc (also the buffer `<name>_sigma`, the last sigma), whose checkpoints load and give their
    outputs (drop-ins with their argument orders: sn_ext.compat). `sigma_grad=False` stops the gradient through
    sigma. docs/variants.md."""
    if dim is None:
        dim = default_dim(module)
    SpectralNorm.apply(module, name, n_power_iterations, dim, eps, backend, coeff, sigma_grad)
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """torch.nn.utils.remove_spectral_norm, for either library's hook: bakes the normalized weight into a plain
    parameter and removes the hook with its state-dict hooks."""
    return _torch_remove_spectral_norm(module, name)
