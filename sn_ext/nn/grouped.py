"""Grouped mode: spectral norm on many layers of a model, with every layer's W / sigma computed by one op per
forward of the model (one launch on a GPU, for both power-iteration orders) and all their gradients by one op in the
backward.

    D = sn_ext.grouped_spectral_norm(Discriminator())   # every Linear, Conv*, ConvTranspose* and Embedding weight

How it works, and why this way:
- Each chosen layer keeps or gets sn_ext's ordinary per-layer spectral norm: a layer without one gets the
  parametrization (sn_ext.spectral_norm); one with sn_ext's (parametrization or legacy hook) is adopted as it is; one
  with torch's (either version) is converted to sn_ext's same version first (nn/swap.py). So the state dict and its
  keys are torch's, torch checkpoints load, ``layer.weight`` read outside a forward of the model works, and
  remove_parametrizations and torch.nn.utils.remove_spectral_norm work, exactly as in the per-layer mode.
- A forward pre-hook on the model runs ``sn_ext::spectral_normalize_grouped_`` for all the layers (one call per
  weight dtype and device, and per train/eval setting; each layer with its own power-iteration order: u-first for
  the parametrization, v-first for the legacy hook), which updates every u and v in place, and hands each layer's
  spectral norm its W / sigma. The parametrization's first run in that forward (the layer's first read of its
  weight), or the legacy hook's call before the layer's forward, takes it instead of computing its own; a forward
  hook drops what was not taken (a layer the forward skipped).
- So the numbers equal the per-layer path's: in train mode one power iteration per layer per forward, none in
  eval mode; a model called twice before one backward iterates twice, and each backward uses its own vectors; a
  layer read twice in one forward (shared weights) iterates again for the second read, as torch does. One
  difference: a grouped layer that a forward does not reach still iterates (the group computes every layer). A
  legacy layer whose spectral norm is removed (torch.nn.utils.remove_spectral_norm) leaves the group.

Under torch.compile the layers compute their own W / sigma inside the compiled graph (same numbers): the compiler
fuses those ops itself, and the grouped op, which mutates lists of buffers, cannot be traced yet.

Kernels: the grouped op runs the compiled kernels (on a GPU one launch for layers of both versions, each with its own
power-iteration order; SN_EXT_CUDA_ROUND=split takes one per order; on the CPU the per-layer kernels in turn) and, on
a device without them, the pure-PyTorch reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm

from .. import ops
from . import swap
from .conv_parametrization import has_conv_spectral_norm
from .legacy_hook import SpectralNorm as LegacyHook
from .registered import Registered, is_sn_ext, registered_on
from .spectral_norm import SpectralNorm, spectral_norm

DEFAULT_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)


@dataclasses.dataclass
class _Member:
    """One grouped tensor, `layer.<name>`, and sn_ext's spectral norm of it: a parametrization (`plist` its
    ParametrizationList) or a legacy hook (`plist` None)."""

    layer: nn.Module
    name: str
    norm: SpectralNorm | LegacyHook
    plist: parametrize.ParametrizationList | None

    @property
    def v_first(self) -> bool:
        return self.plist is None  # the legacy version's order

    def registered(self) -> bool:
        """False once its legacy hook is gone (torch.nn.utils.remove_spectral_norm)."""
        return self.plist is not None or any(hook is self.norm for hook in self.layer._forward_pre_hooks.values())

    def operands(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """(weight, u, v, n) as they are now (module.to() replaces buffers): n power-iteration rounds, by the mode.
        Rounds in eval mode (sigma-reparam's eval_iteration) run on copies of u and v, which stay."""
        norm = self.norm
        if self.plist is None:  # a legacy hook's tensors are its layer's, and so is the mode, as torch's hook reads
            layer, name = self.layer, self.name
            buffers = layer._buffers
            n = norm.n_power_iterations if layer.training else 0
            return layer._parameters[name + "_orig"], buffers[name + "_u"], buffers[name + "_v"], n
        u, v = norm._u, norm._v
        if norm.training:
            return self.plist.original, u, v, norm.n_power_iterations
        if norm.eval_iteration:
            return self.plist.original, u.clone(), v.clone(), norm.n_power_iterations
        return self.plist.original, u, v, 0

    @property
    def gain(self) -> Tensor | None:
        """sigma-reparam's gamma, or None."""
        return None if self.plist is None else self.norm._parameters.get("gain")


def _member(layer: nn.Module, name: str) -> _Member:
    if parametrize.is_parametrized(layer, name):
        plist = layer.parametrizations[name]
        return _Member(layer, name, plist[0], plist)
    return _Member(layer, name, _legacy_hook(layer, name), None)


class SpectralNormGroup:
    """The layers of one model whose W / sigma are computed together; kept as ``model._sn_ext_group``."""

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Module, str]]):
        self.members = [_member(layer, name) for layer, name in layers]
        self._handles = [
            # First among the model's pre-hooks, so that a legacy hook on the model itself takes the result.
            model.register_forward_pre_hook(self._before_forward, prepend=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    @property
    def layers(self) -> list[tuple[nn.Module, str]]:
        return [(member.layer, member.name) for member in self.members]

    @property
    def norms(self) -> list[SpectralNorm | LegacyHook]:
        return [member.norm for member in self.members]

    def _before_forward(self, model, args) -> None:
        # Under torch.compile the layers compute their own W / sigma in the graph, which the compiler fuses (and
        # CUDA graphs launch at once): the grouped op mutates lists of buffers, which torch.compile cannot
        # functionalize yet (torch/_higher_order_ops/auto_functionalize.py: no list returns for mutating ops).
        if not torch.compiler.is_compiling():
            self.compute()

    def _after_forward(self, model, args, output) -> None:
        for member in self.members:
            member.norm._grouped_result = None

    def compute(self) -> None:
        """Runs the grouped op for every layer and hands each spectral norm its W / sigma."""
        if not all(member.registered() for member in self.members):  # a legacy hook was removed: per layer now
            self.members = [member for member in self.members if member.registered()]
        operands = [member.operands() for member in self.members]
        calls: dict[tuple, list[int]] = {}
        for i, (member, (weight, _, _, n)) in enumerate(zip(self.members, operands)):
            norm = member.norm
            # One call takes layers with coeffs or without, gains or without (the op's lists are all or none).
            form = (norm.coeff is not None, member.gain is not None)
            calls.setdefault((weight.device, weight.dtype, n, norm.eps, form), []).append(i)
        for (_, _, n, eps, (with_coeffs, with_gains)), indices in calls.items():
            members = [self.members[i] for i in indices]
            norms = [member.norm for member in members]
            sigma_grad = [norm.sigma_grad for norm in norms]
            weights_sn, sigmas, _, _ = ops.spectral_normalize_grouped_(
                [operands[i][0] for i in indices],
                [operands[i][1] for i in indices],
                [operands[i][2] for i in indices],
                [norm.dim for norm in norms],
                n,
                eps,
                [member.v_first for member in members],
                [norm.coeff for norm in norms] if with_coeffs else None,
                [member.gain for member in members] if with_gains else None,
                None if all(sigma_grad) else sigma_grad,
            )
            sigmas = sigmas.data  # kept for sn_ext.sigmas with each layer's index (see SpectralNorm._sigma)
            for index, (member, weight_sn) in enumerate(zip(members, weights_sn)):
                norm = member.norm
                norm._grouped_result = weight_sn
                norm._sigma, norm._sigma_index = sigmas, index

    def remove(self, model: nn.Module) -> None:
        """Back to the per-layer mode: the layers keep their spectral norms (and buffers), computed one by one."""
        for handle in self._handles:
            handle.remove()
        self._after_forward(model, (), None)
        del model._sn_ext_group


def grouped_spectral_norm(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    layers: Iterable[nn.Module] | None = None,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    coeff: float | None = None,
    sigma_grad: bool = True,
) -> nn.Module:
    """Puts spectral normalization on `name` of every submodule of `model` that is an instance of `types` (or of
    each module of `layers`, if given), and computes them all together in each forward of `model`. Returns
    `model`. The per-layer arguments (n_power_iterations, eps, coeff, sigma_grad; dim as torch chooses it) are those
    of sn_ext.spectral_norm. A layer that already has a spectral norm keeps it, with its version and settings:
    sn_ext's as it is (bounded and sigma-reparam too, each with its own coeff and gamma), torch's converted to
    sn_ext's first (as sn_ext.convert_spectral_norm does: same Parameter, u, v and state dict). Layers with
    sn_ext.conv_spectral_norm are left out: they keep it, computed per layer (its power iteration runs through the
    convolution, not the grouped op's matrices). Every layer is checked before anything changes. Undo with
    ungroup_spectral_norm(model), which keeps the per-layer spectral norms."""
    if hasattr(model, "_sn_ext_group"):
        raise RuntimeError(
            "grouped_spectral_norm: this model is already grouped (ungroup_spectral_norm(model) undoes it)"
        )
    chosen = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, types)]
    chosen = [layer for layer in chosen if not has_conv_spectral_norm(layer, name)]
    qualnames = {id(module): qualname for qualname, module in model.named_modules()}
    swaps = [found for layer in chosen for found in _planned_swaps(layer, name, qualnames.get(id(layer)))]
    for found in swaps:
        swap.install(found)
    members = []
    for layer in chosen:
        if _sn_ext_norm(layer, name) is None:
            weight = getattr(layer, name, None)
            if weight is None or weight.dim() < 2:  # a bias-like vector: nothing to group (torch normalizes it)
                continue
            spectral_norm(layer, name, n_power_iterations, eps, coeff=coeff, sigma_grad=sigma_grad)
        members.append((layer, name))
    if not members:
        raise ValueError(
            f"grouped_spectral_norm: no layer of {type(model).__name__} to normalize: none is a "
            f"{', '.join(t.__name__ for t in types)} with a '{name}' of 2 or more dimensions"
        )
    model._sn_ext_group = SpectralNormGroup(model, members)
    return model


def _planned_swaps(layer: nn.Module, name: str, qualname: str | None) -> list[swap.Swap]:
    """Checks that `layer.<name>` can be grouped, raising (naming it) if not, and returns the swap of its spectral
    norm of torch's for sn_ext's, if it has one."""
    if qualname is None:
        kind = parametrize.type_before_parametrizations(layer).__name__
        where = f"a {kind} that is not a submodule of the model, tensor '{name}'"
    else:
        where = swap.where(Registered(qualname, layer, name, None, None))
    leave_out = "leave this layer out (layers=[...])"
    plist = layer.parametrizations[name] if parametrize.is_parametrized(layer, name) else None
    if plist is not None and (len(plist) > 1 or not isinstance(plist[0], (SpectralNorm, _TorchSpectralNorm))):
        kinds = ", ".join(type(p).__name__ for p in plist)
        raise RuntimeError(
            f"grouped_spectral_norm: {where} has {len(plist)} parametrization(s) ({kinds}); a grouped tensor has "
            f"exactly one, its spectral norm: remove the others first, or {leave_out}"
        )
    legacy = _legacy_hook(layer, name, _TorchLegacySpectralNorm)
    weight = plist.original if plist is not None else getattr(layer, name + "_orig" if legacy else name, None)
    if weight is not None and weight.is_complex():
        raise TypeError(
            f"grouped_spectral_norm: {where} is {weight.dtype}: complex weights run on the reference backend only, "
            f"per layer (sn_ext.spectral_norm): {leave_out}"
        )
    swaps = []
    for found in registered_on(layer, qualname or ""):
        if found.tensor_name == name and not is_sn_ext(found.norm):
            try:
                swaps.append(swap.to_sn_ext(found, None))
            except swap.ERRORS as error:
                raise type(error)(
                    f"grouped_spectral_norm: {where}: torch's spectral norm cannot be converted to sn_ext's: {error}; "
                    f"{leave_out}, or remove that spectral norm first"
                ) from error
    return swaps


def _legacy_hook(layer: nn.Module, name: str, kind: type = LegacyHook):
    """The legacy spectral-norm hook of `kind` on `layer.<name>`, or None."""
    return next((h for h in layer._forward_pre_hooks.values() if isinstance(h, kind) and h.name == name), None)


def _sn_ext_norm(layer: nn.Module, name: str) -> SpectralNorm | LegacyHook | None:
    """sn_ext's spectral norm of `layer.<name>` (its parametrization or legacy hook), or None."""
    if parametrize.is_parametrized(layer, name):
        return next((p for p in layer.parametrizations[name] if isinstance(p, SpectralNorm)), None)
    return _legacy_hook(layer, name)


def ungroup_spectral_norm(model: nn.Module) -> nn.Module:
    """Undoes grouped_spectral_norm: each layer keeps its spectral norm, computed per layer again."""
    group = getattr(model, "_sn_ext_group", None)
    if group is None:
        raise ValueError("ungroup_spectral_norm: this model is not grouped (grouped_spectral_norm(model) groups it)")
    group.remove(model)
    return model
