"""Every spectral norm registered in a model, of any kind: sn_ext's and torch's, parametrization and legacy forward
pre-hook. sn_ext.convert_spectral_norm and sn_ext.diagnostics find them with it."""

import dataclasses
from collections.abc import Iterator

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm

from .conv_parametrization import ConvSpectralNorm
from .legacy_hook import SpectralNorm as LegacyHook
from .spectral_norm import SpectralNorm

PARAMETRIZATIONS = (SpectralNorm, _TorchSpectralNorm, ConvSpectralNorm)
HOOKS = (_TorchLegacySpectralNorm,)  # torch's legacy hook and its subclasses: sn_ext's (LegacyHook), DUE's, ...


@dataclasses.dataclass
class Registered:
    """One spectral norm: `norm` on `module.<tensor_name>`, `module` being model.get_submodule(qualname)."""

    qualname: str
    module: nn.Module
    tensor_name: str
    norm: object  # a parametrization or a legacy hook
    key: object  # the index in module.parametrizations[tensor_name], or the key among the forward pre-hooks

    @property
    def is_hook(self) -> bool:
        return not isinstance(self.norm, nn.Module)


def is_sn_ext(norm: object) -> bool:
    """Whether a spectral norm is sn_ext's (its legacy hook is an instance of torch's class too)."""
    return isinstance(norm, (SpectralNorm, LegacyHook))


def registered_on(
    module: nn.Module, qualname: str = "", parametrizations: tuple = PARAMETRIZATIONS, hooks: tuple = HOOKS
) -> Iterator[Registered]:
    """The spectral norms registered on `module` itself (not its children) that are instances of `parametrizations`
    (at any place in a tensor's list) or `hooks`: its parametrizations, then its hooks. `qualname`: the module's
    name in the model, for the entries."""
    if parametrize.is_parametrized(module):
        for tensor_name, plist in module.parametrizations.items():
            for index, norm in enumerate(plist):
                if isinstance(norm, parametrizations):
                    yield Registered(qualname, module, tensor_name, norm, index)
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, hooks):
            yield Registered(qualname, module, hook.name, hook, key)


def spectral_norms(
    model: nn.Module, parametrizations: tuple = PARAMETRIZATIONS, hooks: tuple = HOOKS
) -> Iterator[Registered]:
    """registered_on every module of `model`, in named_modules order."""
    for qualname, module in model.named_modules():
        yield from registered_on(module, qualname, parametrizations, hooks)
