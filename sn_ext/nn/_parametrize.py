"""A faster `module.<name>` for a tensor with one parametrization: the same result as torch.nn.utils.parametrize's
property, without its Python layers where they do nothing.

torch's property reads `self.parametrizations[name]` (nn.Module.__getattr__, ModuleDict) and calls the
ParametrizationList (nn.Module.__call__), whose forward indexes it (ModuleList.__getitem__), reads `original`
(nn.Module.__getattr__), calls the parametrization (nn.Module.__call__ again) and looks for a second one with
`hasattr(self, "1")`, which raises and catches an AttributeError: ~9 us per access on a CPU, more than a small
layer's spectral norm itself. The property installed here calls the parametrization's forward on `original` directly
when that is all torch's would do: one tensor parametrized once (`is_tensor`, no stacked parametrization), no
parametrize.cached() in effect, no hooks or compiled call on either module (nor global module hooks), not under
torch.jit.trace or torch.compile. In every other case it calls torch's property, which it keeps, as does the setter.
"""

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

# torch's global module hooks: dictionaries that torch fills and empties in place (never rebinds).
_GLOBAL_HOOKS = (
    _module._global_backward_pre_hooks,
    _module._global_backward_hooks,
    _module._global_forward_hooks,
    _module._global_forward_pre_hooks,
)


def _calls_forward(module: nn.Module) -> bool:
    """Whether nn.Module.__call__ would call module.forward and nothing else (global hooks checked by the caller)."""
    return not (
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_pre_hooks
        or module._backward_hooks
        or module.__dict__.get("_compiled_call_impl") is not None
    )


def _fast_getter(name: str, torch_getter):
    def get_parametrized(self) -> torch.Tensor:
        g0, g1, g2, g3 = _GLOBAL_HOOKS
        if not (
            parametrize._cache_enabled
            or g0
            or g1
            or g2
            or g3
            or torch._C._get_tracing_state() is not None
            or torch.compiler.is_compiling()
        ):
            plist = self._modules["parametrizations"]._modules[name]
            modules = plist._modules
            if type(plist) is parametrize.ParametrizationList and plist.is_tensor and len(modules) == 1:
                original = plist._parameters.get("original")
                if original is None:
                    original = plist._buffers["original"]
                parametrization = modules["0"]
                if _calls_forward(plist) and _calls_forward(parametrization):
                    return parametrization.forward(original)
        return torch_getter(self)

    get_parametrized.sn_ext_fast = True
    return get_parametrized


def install(module: nn.Module, name: str) -> None:
    """Replaces the property torch's register_parametrization put on `module`'s class (a class of its own, made by
    torch for this module and shared only with its deep copies) for `name` by the faster one."""
    cls = type(module)
    torch_property = cls.__dict__.get(name)
    if not isinstance(torch_property, property) or getattr(torch_property.fget, "sn_ext_fast", False):
        return
    setattr(cls, name, property(_fast_getter(name, torch_property.fget), torch_property.fset))
