"""Swapping one spectral norm, in place, between torch's implementation and sn_ext's of the same version:
sn_ext.convert_spectral_norm and restore_torch_spectral_norm swap every spectral norm of a model, and
sn_ext.grouped_spectral_norm the torch ones of the layers it groups.

A swap keeps the version (parametrization or legacy forward pre-hook), tensor name, dim, eps and n_power_iterations,
the Parameter object (an optimizer that holds it keeps working), the u and v tensors (no random draw, no warm-up) and
so the state_dict: keys, values and metadata. Only the object that computes W / sigma is replaced (in
`parametrizations.<name>`, or at the same place among the module's forward pre-hooks), with the state-dict hooks
that belong to it. to_sn_ext and to_torch build the new object, raising (saying why) for a spectral norm that cannot
be swapped, and change nothing: install() does.
"""

import dataclasses
import numbers

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook as _TorchLoadHook
from torch.nn.utils.spectral_norm import SpectralNormStateDictHook as _TorchStateDictHook

from .. import _state_dict
from .._matrix import to_matrix
from . import _parametrize
from .legacy_hook import SpectralNorm as LegacyHook
from .legacy_hook import _StateDictVersion, make_hook
from .registered import Registered
from .spectral_norm import SpectralNorm

# What a failed check raises (the argument checks of sn_ext's constructors included).
ERRORS = (ValueError, TypeError, IndexError, RuntimeError)


@dataclasses.dataclass
class Swap:
    """One spectral norm to replace: `old` by `new` (built before the model changes) on `module.<name>`."""

    where: str
    module: nn.Module
    name: str
    old: object
    new: object
    key: int  # the index in parametrizations[name], or the key among the forward pre-hooks (legacy)

    @property
    def is_legacy(self) -> bool:
        return not isinstance(self.old, nn.Module)


def where(found: Registered) -> str:
    """The layer and tensor, for messages: "'blocks.1' (Linear), tensor 'weight'"."""
    kind = parametrize.type_before_parametrizations(found.module).__name__  # Linear, not torch's ParametrizedLinear
    layer = f"'{found.qualname}' ({kind}), tensor" if found.qualname else f"the model's ({kind}) tensor"
    return f"{layer} '{found.tensor_name}'"


def _check_exact(norm: object, torch_type: type) -> None:
    if type(norm) is not torch_type:  # a subclass may compute something else: converting would change the model
        cls = type(norm)
        hint = ""
        if cls.__name__ == "SpectralNormConv":  # DUE's, i-ResNet's, DDU's spectral_norm_conv
            hint = " (the convolution operator's norm: its vectors do not convert; use sn_ext.conv_spectral_norm)"
        raise ValueError(
            f"it is {cls.__module__}.{cls.__qualname__}, a subclass of torch's {torch_type.__qualname__} that may "
            f"compute something else: sn_ext converts torch's own classes and the bounded SpectralNormFC of DUE, "
            f"i-ResNet and DDU only{hint}"
        )


def bounded_fc_coeff(module: nn.Module, fn) -> float | None:
    """The coeff of a bounded spectral norm of DUE, i-ResNet, DDU or lightning-uq-box (their spectral_norm_fc), else
    None. Theirs is a subclass of torch's legacy hook named SpectralNormFC, with a `coeff` and the buffer
    `<name>_sigma`, whose compute_weight gives W / max(1, sigma / coeff) from torch's v-first rounds, the gradient
    through sigma, logging sigma: what sn_ext's legacy hook computes with that coeff (tests/test_variants.py)."""
    coeff = getattr(fn, "coeff", None)
    if (
        type(fn).__name__ == "SpectralNormFC"
        and isinstance(coeff, numbers.Real)
        and not isinstance(coeff, bool)
        and fn.name + "_sigma" in module._buffers
    ):
        return float(coeff)
    return None


def _check_vectors(weight, u, v, dim: int) -> None:
    rows, cols = to_matrix(weight, dim).shape
    for what, vector, size in (("u", u, rows), ("v", v, cols)):
        if vector is None or vector.shape != (size,) or vector.dtype != weight.dtype:
            got = "missing" if vector is None else f"{vector.dtype} of shape {tuple(vector.shape)}"
            raise ValueError(f"its {what} is {got}, expected {weight.dtype} of shape ({size},) for the weight")


def _sn_ext_parametrization(module: nn.Module, name: str, index: int, norm, backend: str | None) -> SpectralNorm:
    _check_exact(norm, _TorchSpectralNorm)
    if index:  # its input is another parametrization's output, which only a forward would tell
        raise ValueError(
            f"it comes after {index} other parametrization(s) of the tensor: only a first one converts (register "
            f"the spectral norm before the others)"
        )
    weight = module.parametrizations[name].original
    vectors = None
    if weight.ndim > 1:
        vectors = getattr(norm, "_u", None), getattr(norm, "_v", None)
        _check_vectors(weight, *vectors, norm.dim)
    new = SpectralNorm(weight, getattr(norm, "n_power_iterations", 1), norm.dim, norm.eps, backend, vectors=vectors)
    return new.train(norm.training)


def _sn_ext_hook(module: nn.Module, fn, backend: str | None) -> LegacyHook:
    coeff = bounded_fc_coeff(module, fn)
    if coeff is None:
        _check_exact(fn, _TorchLegacySpectralNorm)
    weight = module._parameters.get(fn.name + "_orig")
    if weight is None:
        raise ValueError(f"it has no parameter '{fn.name}_orig'")
    u, v = module._buffers.get(fn.name + "_u"), module._buffers.get(fn.name + "_v")
    new = make_hook(weight, fn.name, fn.n_power_iterations, fn.dim, fn.eps, backend, coeff=coeff)
    _check_vectors(weight, u, v, new.dim)
    return new


def to_sn_ext(found: Registered, backend: str | None) -> Swap:
    """The swap of torch's spectral norm `found` for sn_ext's; raises one of ERRORS, saying why, if it cannot be."""
    module, name, key, old = found.module, found.tensor_name, found.key, found.norm
    if isinstance(old, nn.Module):
        new = _sn_ext_parametrization(module, name, key, old, backend)
    else:
        new = _sn_ext_hook(module, old, backend)
    return Swap(where(found), module, name, old, new, key)


def _torch_parametrization(norm: SpectralNorm) -> _TorchSpectralNorm:
    """torch's parametrization with `norm`'s settings and u, v tensors, built without torch's random draws and
    warm-up (which its __init__ runs): its attributes are set as that __init__ sets them."""
    new = _TorchSpectralNorm.__new__(_TorchSpectralNorm)
    nn.Module.__init__(new)
    new.dim, new.eps = norm.dim, norm.eps
    if hasattr(norm, "_u"):
        new.n_power_iterations = norm.n_power_iterations
        new.register_buffer("_u", norm._u)
        new.register_buffer("_v", norm._v)
    return new.train(norm.training)


def to_torch(found: Registered) -> Swap:
    """The swap of sn_ext's spectral norm `found` for torch's; raises ValueError for a form torch has no equivalent
    of (coeff, sigma-reparam, sigma_grad=False)."""
    old = found.norm
    if not old.plain:
        raise ValueError(f"its {describe_form(old)} has no torch equivalent")
    if isinstance(old, nn.Module):
        new = _torch_parametrization(old)
    else:
        new = _TorchLegacySpectralNorm(old.name, old.n_power_iterations, old.dim, old.eps)
    return Swap(where(found), found.module, found.tensor_name, old, new, found.key)


def describe_form(norm) -> str:
    """What an sn_ext spectral norm computes beyond W / sigma, for messages: "coeff=0.9", "sigma-reparam", ..."""
    parts = ["sigma-reparam"] if "gain" in getattr(norm, "_parameters", {}) else []
    if norm.coeff is not None:
        parts.append(f"coeff={norm.coeff}")
    if not norm.sigma_grad:
        parts.append("sigma_grad=False")
    return ", ".join(parts) or "plain spectral norm"


def install(swap: Swap) -> None:
    """Puts swap.new in swap.old's place, with its own state-dict hooks instead of the old one's."""
    if isinstance(swap.new, (SpectralNorm, LegacyHook)):
        _install_sn_ext(swap)
    else:
        _install_torch(swap)


def _install_sn_ext(swap: Swap) -> None:
    module, name, new = swap.module, swap.name, swap.new
    if swap.is_legacy:
        module._forward_pre_hooks[swap.key] = new  # the same place among the module's hooks
        _replace_state_dict_hook(module, swap.old, _TorchStateDictHook, _StateDictVersion(new))
        _remove_torch_load_hook(module, swap.old)
    else:
        module.parametrizations[name][swap.key] = new
        _parametrize.install(module, name)  # module.<name> as fast as sn_ext.spectral_norm's
    if swap.is_legacy or swap.key == 0:  # a checkpoint of either torch layout loads, as with sn_ext's own
        _state_dict.remove_layout_hooks(module, name)
        logged_sigma = swap.is_legacy and new.coeff is not None  # DUE's layout
        _state_dict.accept_both_layouts(module, name, legacy=swap.is_legacy, dim=new.dim, logged_sigma=logged_sigma)


def _install_torch(swap: Swap) -> None:
    module, new = swap.module, swap.new
    _state_dict.remove_layout_hooks(module, swap.name)
    if swap.is_legacy:
        module._forward_pre_hooks[swap.key] = new
        _replace_state_dict_hook(module, swap.old, _StateDictVersion, _TorchStateDictHook(new))
        module._register_load_state_dict_pre_hook(_TorchLoadHook(new))
    else:
        module.parametrizations[swap.name][swap.key] = new


def _replace_state_dict_hook(module: nn.Module, fn, hook_type: type, new) -> None:
    """Puts `new` in the place of the `hook_type` state-dict hook of legacy hook `fn` (or last, if it has none)."""
    for key, hook in module._state_dict_hooks.items():
        if isinstance(hook, hook_type) and hook.fn is fn:
            module._state_dict_hooks[key] = new
            return
    module._register_state_dict_hook(new)


def _remove_torch_load_hook(module: nn.Module, fn) -> None:
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        function = getattr(hook, "hook", hook)  # torch keeps it wrapped in a _WrappedHook
        if isinstance(function, _TorchLoadHook) and function.fn is fn:
            del module._load_state_dict_pre_hooks[key]
