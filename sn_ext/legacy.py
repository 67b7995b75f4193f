"""sn_ext.legacy.spectral_norm: a drop-in for the legacy torch.nn.utils.spectral_norm (forward pre-hook).

As torch's: parameter `<name>_orig`, buffers `<name>_u`, `<name>_v`, a plain attribute `<name>` recomputed before
each forward, v-then-u power iteration in train mode, none in eval, no warm-up, and remove_spectral_norm bakes
the normalized weight in. Beyond torch: a checkpoint of torch's parametrization version loads too, and a step
whose weight is non-finite or zero leaves u and v as they were.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import _state_dict, backends
from ._matrix import to_matrix
from .nn.legacy_hook import SpectralNorm, _StateDictVersion
from .nn.spectral_norm import check_arguments, default_dim, has_spectral_norm


def make_hook(
    weight: torch.Tensor, name: str, n_power_iterations: int, dim: int, eps: float, backend: str | None = None
) -> SpectralNorm:
    """The forward pre-hook for `weight` (`<name>_orig`), its arguments checked and its kernels chosen; registers
    nothing (_apply does, and sn_ext.convert_spectral_norm puts it in place of torch's)."""
    check_arguments(weight, n_power_iterations, dim, eps, complex_ok=False)
    fn = SpectralNorm(name, n_power_iterations, dim % weight.ndim, eps)
    fn.backend = backends.requested_backend(backend)
    fn._kernels = backends.initial_kernels(fn.backend, weight)
    return fn


def _apply(
    module: nn.Module, name: str, n_power_iterations: int, dim: int, eps: float, backend: str | None = None
) -> SpectralNorm:
    """Registers the hook, as torch's SpectralNorm.apply does."""
    if has_spectral_norm(module, name):  # sn_ext's or torch's, either version
        raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name}")
    weight = module._parameters.get(name)
    if weight is None:
        raise ValueError(f"Module '{type(module).__name__}' has no parameter with name '{name}'")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            "The module passed to `SpectralNorm` can't have uninitialized parameters. "
            "Make sure to run the dummy forward before applying spectral normalization"
        )
    fn = make_hook(weight, name, n_power_iterations, dim, eps, backend)
    with torch.no_grad():
        h, w = to_matrix(weight, fn.dim).shape
        u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
        v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
    delattr(module, fn.name)
    module.register_parameter(fn.name + "_orig", weight)
    setattr(module, fn.name, weight.data)
    module.register_buffer(fn.name + "_u", u)
    module.register_buffer(fn.name + "_v", v)
    module.register_forward_pre_hook(fn)
    module._register_state_dict_hook(_StateDictVersion(fn))
    _state_dict.accept_both_layouts(module, name, legacy=True, dim=fn.dim)
    return fn


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Applies legacy-style spectral normalization to `module.<name>`; torch.nn.utils.spectral_norm's arguments,
    and `backend` as sn_ext.spectral_norm's ("auto", "cpu", "cuda", "triton", "reference"; None: $SN_EXT_BACKEND,
    else "auto")."""
    if dim is None:
        dim = default_dim(module)
    _apply(module, name, n_power_iterations, dim, eps, backend)
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Removes the spectral norm hook, baking the normalized weight into a plain parameter, and its state-dict hooks
    (as torch's)."""
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, SpectralNorm) and hook.name == name:
            hook.remove(module)
            del module._forward_pre_hooks[key]
            break
    else:
        raise ValueError(f"spectral_norm of '{name}' not found in {module}")
    for key, hook in list(module._state_dict_hooks.items()):
        if isinstance(hook, _StateDictVersion) and hook.fn.name == name:
            del module._state_dict_hooks[key]
    _state_dict.remove_layout_hooks(module, name)
    return module
