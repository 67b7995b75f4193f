"""sn_ext's legacy spectral norm (sn_ext.legacy.spectral_norm registers it): the forward pre-hook and its state-dict
hook, subclasses of torch's legacy SpectralNorm and SpectralNormStateDictHook, with their state and attributes,
computing W / sigma with sn_ext's kernels.

Subclasses, so that torch's code finds them as its own: torch.nn.utils.remove_spectral_norm removes sn_ext's hook
exactly as torch's (it calls remove() below, which also takes sn_ext's load_state_dict pre-hook away, then deletes
the state-dict hook), and so does every isinstance check of other libraries. sn_ext tells its hooks from torch's
by their exact type (nn/registered.py)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm as TorchLegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormStateDictHook as TorchStateDictHook

from .. import _state_dict, backends, sharded
from .._matrix import to_matrix
from . import _kernels
from .spectral_norm import check_arguments, check_scaling_arguments, has_spectral_norm


class _StateDictVersion(TorchStateDictHook):
    """Writes the metadata torch's legacy spectral norm writes, so torch's hook reads our checkpoints as its own; a
    subclass of torch's, so that torch's remove_spectral_norm deletes it."""

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        local_metadata.setdefault("spectral_norm", {})[self.fn.name + ".version"] = self.fn._version


class SpectralNorm(TorchLegacySpectralNorm):
    """The forward pre-hook: torch's, with compute_weight on sn_ext's fused op (u and v updated in place, v-first
    rounds in train mode, none in eval) and the result of a grouped computation taken when there is one.

    `coeff` (bounded: W / max(1, sigma / coeff)) keeps DUE's and i-ResNet's layout: the buffer `<name>_sigma` holds
    the sigma of the last computation, as their spectral_norm_fc logs it. `sigma_grad=False` stops the gradient
    through sigma."""

    # W / sigma computed with the other layers of a grouped model (nn/grouped.py), for this hook's next call.
    _grouped_result: torch.Tensor | None = None
    # The sigma of the last computation (sn_ext.sigmas), and its index in a grouped computation's vector of sigmas,
    # as the parametrization keeps them (nn/spectral_norm.py).
    _sigma: torch.Tensor | None = None
    _sigma_index: int = 0

    def __init__(self, name: str = "weight", n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12):
        super().__init__(name, n_power_iterations, dim, eps)
        self.backend = "auto"  # the name asked for; make_hook sets it and the kernels
        self._kernels = backends.unresolved(self.backend)
        self.coeff: float | None = None  # make_hook sets them
        self.sigma_grad = True

    @property
    def plain(self) -> bool:
        """Whether it is torch's legacy spectral norm (no coeff, the gradient through sigma)."""
        return self.coeff is None and self.sigma_grad

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
        weight = getattr(module, self.name + "_orig")
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        n = self.n_power_iterations if do_power_iteration else 0
        kernels = self._kernels
        if kernels.device != weight.device or kernels.dtype != weight.dtype:  # moved or cast
            kernels = _kernels.kernels_for(self, weight)
        # u and v updated in place (see nn/spectral_norm.py).
        if self.plain:
            weight_sn, sigma, _, _ = kernels.forward(weight, u, v, self.dim, n, self.eps, v_first=True)
        else:
            weight_sn, sigma, _, _ = kernels.forward(
                weight, u, v, self.dim, n, self.eps, True, self.coeff, None, self.sigma_grad
            )
        self._sigma = sigma.data  # for sn_ext.sigmas: a plain attribute, .data adds no op (nn/spectral_norm.py)
        self._log_sigma(module, sigma.data)
        return weight_sn

    def _log_sigma(self, module: nn.Module, sigma: torch.Tensor) -> None:
        """DUE's layout (with a coeff): `<name>_sigma` holds the last sigma."""
        logged = module._buffers.get(self.name + "_sigma") if self.coeff is not None else None
        if logged is not None:
            with torch.no_grad():
                logged.copy_(sigma)

    def remove(self, module: nn.Module) -> None:
        """torch's (W / sigma baked into a plain Parameter), and sn_ext's load_state_dict pre-hook of this tensor
        removed with it: torch's remove_spectral_norm, which calls this, looks for its own class among the module's
        load_state_dict pre-hooks but never finds one there (nn.Module keeps them wrapped). DUE's `<name>_sigma` goes
        too."""
        super().remove(module)
        _state_dict.remove_layout_hooks(module, self.name)
        if self.coeff is not None:
            module._buffers.pop(self.name + "_sigma", None)

    def __call__(self, module: nn.Module, inputs) -> None:
        weight = self._grouped_result
        if weight is None:
            weight = self.compute_weight(module, do_power_iteration=module.training)
        else:
            self._grouped_result = None
            self._log_sigma(module, self._sigma[self._sigma_index])
        setattr(module, self.name, weight)

    @staticmethod
    def apply(
        module: nn.Module,
        name: str,
        n_power_iterations: int,
        dim: int,
        eps: float,
        backend: str | None = None,
        coeff: float | None = None,
        sigma_grad: bool = True,
    ) -> "SpectralNorm":
        """Registers sn_ext's hook on `module.<name>` as torch's SpectralNorm.apply registers torch's: parameter
        `<name>_orig`, buffers `<name>_u`, `<name>_v` (torch's random draws), `<name>` a plain attribute; plus a
        load_state_dict pre-hook that takes either torch layout. With `coeff`, DUE's and i-ResNet's layout: also the
        buffer `<name>_sigma` (float32, one value, 1 at first, as theirs)."""
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
        fn = make_hook(weight, name, n_power_iterations, dim, eps, backend, coeff, sigma_grad)
        with torch.no_grad():
            h, w = to_matrix(weight, fn.dim).shape
            u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
            v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
        delattr(module, fn.name)
        module.register_parameter(fn.name + "_orig", weight)
        setattr(module, fn.name, weight.data)
        module.register_buffer(fn.name + "_u", u)
        module.register_buffer(fn.name + "_v", v)
        if coeff is not None:
            module.register_buffer(fn.name + "_sigma", torch.ones(1, device=weight.device))
        module.register_forward_pre_hook(fn)
        module._register_state_dict_hook(_StateDictVersion(fn))
        _state_dict.accept_both_layouts(module, name, legacy=True, dim=fn.dim, logged_sigma=coeff is not None)
        return fn


def make_hook(
    weight: torch.Tensor,
    name: str,
    n_power_iterations: int,
    dim: int,
    eps: float,
    backend: str | None = None,
    coeff: float | None = None,
    sigma_grad: bool = True,
) -> SpectralNorm:
    """The forward pre-hook for `weight` (`<name>_orig`), its arguments checked and its kernels chosen; registers
    nothing (SpectralNorm.apply does, and sn_ext.convert_spectral_norm puts it in place of torch's or DUE's)."""
    check_arguments(weight, n_power_iterations, dim, eps, complex_ok=False)
    check_scaling_arguments(weight, coeff, sigma_grad)
    if sharded.is_dtensor(weight):  # before anything changes (convert and registration both come here first)
        raise NotImplementedError(
            f"the legacy spectral norm does not run on a DTensor (tensor-parallel) '{name}': use "
            f"sn_ext.spectral_norm (the parametrization), which runs on sharded weights (docs/distributed.md)"
        )
    fn = SpectralNorm(name, n_power_iterations, dim % weight.ndim, eps)
    fn.coeff = None if coeff is None else float(coeff)
    fn.sigma_grad = sigma_grad
    fn.backend = backends.requested_backend(backend)
    fn._kernels = backends.initial_kernels(fn.backend, weight)
    return fn
