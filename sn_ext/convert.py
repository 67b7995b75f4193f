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
state-dict hooks that belong to it (sn_ext/nn/swap.py swaps one). Every spectral norm of the model is checked first:
if any cannot be converted (or, with grouped=True, grouped), a ValueError names each such layer, says what to do
instead, and nothing has changed.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm

from .nn import swap
from .nn.conv_parametrization import ConvSpectralNorm
from .nn.grouped import SpectralNormGroup, ungroup_spectral_norm
from .nn.legacy_hook import SpectralNorm as _LegacyHook
from .nn.registered import is_sn_ext, spectral_norms
from .nn.spectral_norm import SpectralNorm


def _report(failures: list[str], what: str, header: str) -> None:
    if failures:
        raise ValueError(f"{what}: {len(failures)} spectral norm(s) {header}:\n  " + "\n  ".join(failures))


def _check_groupable(model: nn.Module, swaps: list[swap.Swap]) -> list[swap.Swap]:
    """The swaps grouped=True groups (every legacy one, and the parametrizations of weights with 2 or more
    dimensions); raises if any cannot be grouped."""
    if hasattr(model, "_sn_ext_group"):
        raise ValueError(
            "convert_spectral_norm(grouped=True): the model is already grouped, nothing was changed "
            "(sn_ext.ungroup_spectral_norm(model) first, or grouped=False)"
        )
    failures, members = [], []
    for found in swaps:
        if found.is_legacy:  # the grouped op runs each layer's own order (v-first for these)
            members.append(found)
            continue
        plist = found.module.parametrizations[found.name]
        if len(plist) > 1:
            failures.append(f"{found.where}: {len(plist)} stacked parametrizations (a grouped tensor has one)")
        elif plist.original.is_complex():
            failures.append(
                f"{found.where}: {plist.original.dtype} (complex weights run on the reference backend, per layer)"
            )
        elif plist.original.ndim > 1:  # a 1-D weight is F.normalize'd, per layer
            members.append(found)
    _report(
        failures,
        "convert_spectral_norm(grouped=True)",
        "can be converted but not grouped, so nothing was changed (grouped=False converts every one, per layer)",
    )
    return members


def convert_spectral_norm(model: nn.Module, grouped: bool = False, *, backend: str | None = None) -> nn.Module:
    """Replaces, in place, every spectral norm of torch's in `model` by sn_ext's same version with the same
    settings: torch.nn.utils.parametrizations.spectral_norm by sn_ext.spectral_norm, the legacy
    torch.nn.utils.spectral_norm by sn_ext.legacy.spectral_norm, any name, dim, eps and n_power_iterations.
    Keeps the Parameter objects, u and v (the same tensors) and the state_dict; eval outputs are torch's, and so
    are the next train steps (to rounding: sn_ext sums in float64 on the CPU).

    grouped=True then computes the converted layers together (sn_ext.grouped_spectral_norm: one op per forward of
    `model`), legacy and parametrization alike, each with its own power-iteration order; a tensor with stacked
    parametrizations or a complex weight cannot be grouped. `backend` as sn_ext.spectral_norm's.

    The bounded spectral norm of DUE, i-ResNet, DDU and lightning-uq-box (their spectral_norm_fc: a subclass of torch's
    legacy hook named SpectralNormFC) converts too, to sn_ext.legacy.spectral_norm with its coeff, in its layout
    (`<name>_sigma` kept).

    Raises ValueError naming every spectral norm that cannot be converted (any other subclass of torch's, one stacked
    after another parametrization, a dtype sn_ext does not compute in, a complex legacy weight, u or v of the wrong
    shape, ...) or grouped, before changing anything. Warns if `model` has no spectral norm of torch's. Returns
    `model`.
    """
    swaps, failures = [], []
    for found in spectral_norms(model, (_TorchSpectralNorm,), (_TorchLegacySpectralNorm,)):
        if is_sn_ext(found.norm):  # sn_ext's legacy hook is an instance of torch's class
            continue
        try:
            swaps.append(swap.to_sn_ext(found, backend))
        except swap.ERRORS as error:
            failures.append(f"{swap.where(found)}: {error}")
    _report(
        failures,
        "convert_spectral_norm",
        "cannot be converted, so nothing was changed (remove them first, or convert the submodules without them: "
        "convert_spectral_norm(model.<submodule>))",
    )
    members = _check_groupable(model, swaps) if grouped else []
    if not swaps:
        hint = ", nor grouped (sn_ext.grouped_spectral_norm(model) groups sn_ext's own)" if grouped else ""
        warnings.warn(
            f"convert_spectral_norm: {type(model).__name__} has no spectral norm of torch's: nothing was converted"
            + hint,
            UserWarning,
            stacklevel=2,
        )
    for found in swaps:
        swap.install(found)
    if members:  # as grouped_spectral_norm(model, layers=...) does, for any tensor names
        model._sn_ext_group = SpectralNormGroup(model, [(found.module, found.name) for found in members])
    return model


def restore_torch_spectral_norm(model: nn.Module) -> nn.Module:
    """The inverse of convert_spectral_norm: replaces, in place, every spectral norm of sn_ext's in `model` by
    torch's same version with the same settings, keeping the Parameter objects, u, v and the state_dict, so that
    the model runs (and pickles) without sn_ext. Grouped models are ungrouped first. Returns `model`.

    Raises ValueError naming each layer with a spectral norm torch has no equivalent of (sn_ext.conv_spectral_norm,
    a coeff, sigma-reparam, sigma_grad=False) before changing anything (remove_parametrizations(layer, "weight") bakes
    its normalized weight into a plain weight)."""
    failures = [
        f"{swap.where(found)}: sn_ext.conv_spectral_norm has no torch equivalent"
        for found in spectral_norms(model, (ConvSpectralNorm,), ())
    ]
    failures += [
        f"{swap.where(found)}: its {swap.describe_form(found.norm)} has no torch equivalent"
        for found in spectral_norms(model, (SpectralNorm,), (_LegacyHook,))
        if not found.norm.plain
    ]
    _report(
        failures,
        "restore_torch_spectral_norm",
        "cannot be swapped, so nothing was changed (torch.nn.utils.parametrize.remove_parametrizations(layer, "
        "'weight') bakes a normalized weight in)",
    )
    swaps = [swap.to_torch(found) for found in spectral_norms(model, (SpectralNorm,), (_LegacyHook,))]
    for module in model.modules():
        if hasattr(module, "_sn_ext_group"):
            ungroup_spectral_norm(module)
    for found in swaps:
        swap.install(found)
    return model
