"""sn_ext.convert_spectral_norm and sn_ext.restore_torch_spectral_norm: swap the spectral norms of a built model, in
place, between torch's implementation and sn_ext's. That is this module's one job (sn_ext.patch_torch swaps the
functions that build them instead).

    D = sn_ext.convert_spectral_norm(build_discriminator())   # torch's spectral norms -> sn_ext's
    D = sn_ext.convert_spectral_norm(D, grouped=True)         # ... then one op per forward for all of them
    sn_ext.restore_torch_spectral_norm(D)                     # and back, e.g. to export the model

Each spectral norm keeps its version (parametrization or legacy forward pre-hook), tensor name, dim, eps and
n_power_iterations, its Parameter object (an optimizer that holds it keeps working), its u and v tensors (no random
draw, no warm-up) and so its state_dict: keys, values and metadata. Only the object that computes W / sigma is
replaced (in `parametrizations.<name>`, or at the same place among the module's forward pre-hooks), with the
state-dict hooks that belong to it. Every spectral norm of the model is checked first: if any cannot be swapped,
a ValueError names each such layer and nothing has changed.
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook as _TorchLoadHook
from torch.nn.utils.spectral_norm import SpectralNormStateDictHook as _TorchStateDictHook

from . import _state_dict, legacy
from ._matrix import to_matrix
from .nn import _parametrize
from .nn.grouped import SpectralNormGroup, ungroup_spectral_norm
from .nn.legacy_hook import SpectralNorm as _LegacyHook
from .nn.legacy_hook import _StateDictVersion
from .nn.registered import Registered, spectral_norms
from .nn.spectral_norm import SpectralNorm


@dataclasses.dataclass
class _Swap:
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


def _where(found: Registered) -> str:
    """The layer and tensor, for error messages."""
    kind = parametrize.type_before_parametrizations(found.module).__name__  # Linear, not torch's ParametrizedLinear
    layer = f"'{found.qualname}' ({kind}), tensor" if found.qualname else f"the model's ({kind}) tensor"
    return f"{layer} '{found.tensor_name}'"


def _check_exact(norm: object, torch_type: type) -> None:
    if type(norm) is not torch_type:  # a subclass may compute something else: converting would change the model
        raise ValueError(f"it is a {type(norm).__qualname__}, a subclass of torch's {torch_type.__qualname__}")


def _check_vectors(weight, u, v, dim: int) -> None:
    rows, cols = to_matrix(weight, dim).shape
    for what, vector, size in (("u", u, rows), ("v", v, cols)):
        if vector is None or vector.shape != (size,) or vector.dtype != weight.dtype:
            got = "missing" if vector is None else f"{vector.dtype} of shape {tuple(vector.shape)}"
            raise ValueError(f"its {what} is {got}, expected {weight.dtype} of shape ({size},) for the weight")


def _sn_ext_parametrization(module: nn.Module, name: str, index: int, norm, backend: str | None) -> SpectralNorm:
    _check_exact(norm, _TorchSpectralNorm)
    if index:  # its input is another parametrization's output, which only a forward would tell
        raise ValueError(f"it comes after {index} other parametrization(s) of the tensor; only a first one converts")
    weight = module.parametrizations[name].original
    vectors = None
    if weight.ndim > 1:
        vectors = getattr(norm, "_u", None), getattr(norm, "_v", None)
        _check_vectors(weight, *vectors, norm.dim)
    new = SpectralNorm(weight, getattr(norm, "n_power_iterations", 1), norm.dim, norm.eps, backend, vectors=vectors)
    return new.train(norm.training)


def _sn_ext_hook(module: nn.Module, fn, backend: str | None) -> _LegacyHook:
    _check_exact(fn, _TorchLegacySpectralNorm)
    weight = module._parameters.get(fn.name + "_orig")
    if weight is None:
        raise ValueError(f"it has no parameter '{fn.name}_orig'")
    u, v = module._buffers.get(fn.name + "_u"), module._buffers.get(fn.name + "_v")
    new = legacy.make_hook(weight, fn.name, fn.n_power_iterations, fn.dim, fn.eps, backend)
    _check_vectors(weight, u, v, new.dim)
    return new


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


def _report(failures: list[str], what: str) -> None:
    if failures:
        raise ValueError(
            f"{what}: {len(failures)} spectral norm(s) cannot be swapped (nothing was changed):\n  "
            + "\n  ".join(failures)
        )


def _check_groupable(model: nn.Module, swaps: list[_Swap]) -> list[_Swap]:
    """The swaps grouped=True groups (those of weights with 2 or more dimensions); raises if any cannot be."""
    failures = []
    if hasattr(model, "_sn_ext_group"):
        failures.append("the model is already grouped (sn_ext.ungroup_spectral_norm undoes it)")
    members = []
    for swap in swaps:
        if swap.is_legacy:  # the grouped op runs u-first rounds; the legacy version's are v-first
            failures.append(f"{swap.where}: a legacy spectral norm cannot be grouped (grouped=False converts it)")
            continue
        plist = swap.module.parametrizations[swap.name]
        if len(plist) > 1:
            failures.append(f"{swap.where}: {len(plist)} stacked parametrizations; a grouped layer has one")
        elif plist.original.is_complex():
            failures.append(f"{swap.where}: complex weights run per layer only (grouped=False)")
        elif plist.original.ndim > 1:
            members.append(swap)
    _report(failures, "convert_spectral_norm(grouped=True)")
    return members


def convert_spectral_norm(model: nn.Module, grouped: bool = False, *, backend: str | None = None) -> nn.Module:
    """Replaces, in place, every spectral norm of torch's in `model` by sn_ext's same version with the same
    settings: torch.nn.utils.parametrizations.spectral_norm by sn_ext.spectral_norm, the legacy
    torch.nn.utils.spectral_norm by sn_ext.legacy.spectral_norm, any name, dim, eps and n_power_iterations.
    Keeps the Parameter objects, u and v (the same tensors) and the state_dict; eval outputs are torch's, and so
    are the next train steps (to rounding: sn_ext sums in float64 on the CPU).

    grouped=True then computes the converted layers together (sn_ext.grouped_spectral_norm: one op per forward of
    `model`); it takes parametrizations only (the legacy version iterates v first, the grouped op u first), one
    per tensor, of real weights. `backend` as sn_ext.spectral_norm's.

    Raises ValueError naming every spectral norm that cannot be converted (a subclass of torch's, one stacked after
    another parametrization, a dtype sn_ext does not compute in, a complex legacy weight, u or v of the wrong
    shape, ...) before changing anything. Warns if `model` has no spectral norm of torch's. Returns `model`.
    """
    swaps, failures = [], []
    for found in spectral_norms(model, (_TorchSpectralNorm,), (_TorchLegacySpectralNorm,)):
        where, module, name, key, old = _where(found), found.module, found.tensor_name, found.key, found.norm
        try:
            if isinstance(old, nn.Module):
                new = _sn_ext_parametrization(module, name, key, old, backend)
            else:
                new = _sn_ext_hook(module, old, backend)
        except (ValueError, TypeError, IndexError, RuntimeError) as error:
            failures.append(f"{where}: {error}")
            continue
        swaps.append(_Swap(where, module, name, old, new, key))
    _report(failures, "convert_spectral_norm")
    members = _check_groupable(model, swaps) if grouped else []
    if not swaps:
        warnings.warn(
            f"convert_spectral_norm: {type(model).__name__} has no spectral norm of torch's", UserWarning, stacklevel=2
        )
    for swap in swaps:
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
            _state_dict.accept_both_layouts(module, name, legacy=swap.is_legacy, dim=new.dim)
    if members:  # as grouped_spectral_norm(model, layers=...) does, for any tensor names
        model._sn_ext_group = SpectralNormGroup(model, [(swap.module, swap.name) for swap in members])
    return model


def restore_torch_spectral_norm(model: nn.Module) -> nn.Module:
    """The inverse of convert_spectral_norm: replaces, in place, every spectral norm of sn_ext's in `model` by
    torch's same version with the same settings, keeping the Parameter objects, u, v and the state_dict, so that
    the model runs (and pickles) without sn_ext. Grouped models are ungrouped first. Returns `model`."""
    swaps = []
    for found in spectral_norms(model, (SpectralNorm,), (_LegacyHook,)):
        where, module, name, key, old = _where(found), found.module, found.tensor_name, found.key, found.norm
        if isinstance(old, nn.Module):
            new = _torch_parametrization(old)
        else:
            new = _TorchLegacySpectralNorm(old.name, old.n_power_iterations, old.dim, old.eps)
        swaps.append(_Swap(where, module, name, old, new, key))
    for module in model.modules():
        if hasattr(module, "_sn_ext_group"):
            ungroup_spectral_norm(module)
    for swap in swaps:
        module, new = swap.module, swap.new
        _state_dict.remove_layout_hooks(module, swap.name)
        if swap.is_legacy:
            module._forward_pre_hooks[swap.key] = new
            _replace_state_dict_hook(module, swap.old, _StateDictVersion, _TorchStateDictHook(new))
            module._register_load_state_dict_pre_hook(_TorchLoadHook(new))
        else:
            module.parametrizations[swap.name][swap.key] = new
    return model


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
