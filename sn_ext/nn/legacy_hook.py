"""The legacy spectral norm's forward pre-hook (sn_ext.legacy.spectral_norm registers it): the state and attributes of
torch's legacy SpectralNorm, computed with sn_ext's kernels. Kept apart from sn_ext.legacy's registration functions
so that nn/spectral_norm.py can recognise it without importing sn_ext.legacy (which imports nn/)."""

import torch
from torch import nn

from .. import backends
from . import _kernels


class SpectralNorm:
    """The forward pre-hook; the attributes of torch's legacy SpectralNorm."""

    _version = 1

    def __init__(self, name: str = "weight", n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12):
        self.name = name
        self.dim = dim
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.backend = "auto"  # the name asked for; sn_ext.legacy.spectral_norm sets it and the kernels
        self._kernels = backends.unresolved(self.backend)
        self._sigma = None  # the sigma of the last computation (sn_ext.sigmas)

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
        weight = getattr(module, self.name + "_orig")
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        n = self.n_power_iterations if do_power_iteration else 0
        kernels = self._kernels
        if kernels.device != weight.device or kernels.dtype != weight.dtype:  # moved or cast
            kernels = _kernels.kernels_for(self, weight)
        # u and v updated in place (see nn/spectral_norm.py).
        weight_sn, sigma, _, _ = kernels.forward(weight, u, v, self.dim, n, self.eps, v_first=True)
        self._sigma = sigma.data  # for sn_ext.sigmas: a plain attribute, .data adds no op (nn/spectral_norm.py)
        return weight_sn

    def remove(self, module: nn.Module) -> None:
        with torch.no_grad():
            weight = self.compute_weight(module, do_power_iteration=False)
        delattr(module, self.name)
        delattr(module, self.name + "_u")
        delattr(module, self.name + "_v")
        delattr(module, self.name + "_orig")
        module.register_parameter(self.name, nn.Parameter(weight.detach()))

    def __call__(self, module: nn.Module, inputs) -> None:
        setattr(module, self.name, self.compute_weight(module, do_power_iteration=module.training))


class _StateDictVersion:
    """Writes the metadata torch's legacy spectral norm writes, so torch's hook reads our checkpoints as its own."""

    def __init__(self, fn: SpectralNorm):
        self.fn = fn

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        local_metadata.setdefault("spectral_norm", {})[self.fn.name + ".version"] = self.fn._version
