"""Grouped mode: spectral norm on many layers of a model, with every layer's W / sigma computed by one op per
forward of the model (one launch on a GPU) and all their gradients by one op in the backward.

    D = sn_ext.grouped_spectral_norm(Discriminator())   # every Linear, Conv*, ConvTranspose* and Embedding weight

How it works, and why this way:
- Each chosen layer gets sn_ext's ordinary parametrization (sn_ext.spectral_norm; a layer that already has one is
  adopted as it is). So the state dict and its keys are torch's, torch checkpoints load, ``layer.weight`` read
  outside a forward of the model works, and remove_parametrizations works, exactly as in the per-layer mode.
- A forward pre-hook on the model runs ``sn_ext::spectral_normalize_grouped_`` for all the layers (one call per
  weight dtype and device, and per train/eval setting), which updates every u and v in place, and hands each
  layer's parametrization its W / sigma. The layer's first read of its weight in that forward takes it instead of
  computing its own; a forward hook drops what was not taken (a layer the forward skipped).
- So the numbers equal the per-layer path's: in train mode one power iteration per layer per forward, none in
  eval mode; a model called twice before one backward iterates twice, and each backward uses its own vectors; a
  layer read twice in one forward (shared weights) iterates again for the second read, as torch does. One
  difference: a grouped layer that a forward does not reach still iterates (the group computes every layer).

Under torch.compile the layers compute their own W / sigma inside the compiled graph (same numbers): the compiler
fuses those ops itself, and the grouped op, which mutates lists of buffers, cannot be traced yet.

Kernels: the grouped op runs the compiled kernels (one launch on a GPU; on the CPU the per-layer kernels in turn)
and, on a device without them, the pure-PyTorch reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import ops
from .spectral_norm import SpectralNorm, has_spectral_norm, spectral_norm

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


class SpectralNormGroup:
    """The layers of one model whose W / sigma are computed together; kept as ``model._sn_ext_group``."""

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Module, str]]):
        self.layers = layers
        self.parametrizations = [layer.parametrizations[name] for layer, name in layers]
        self.norms: list[SpectralNorm] = [p[0] for p in self.parametrizations]
        self._handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    def _before_forward(self, model, args) -> None:
        # Under torch.compile the layers compute their own W / sigma in the graph, which the compiler fuses (and
        # CUDA graphs launch at once): the grouped op mutates lists of buffers, which torch.compile cannot
        # functionalize yet (torch/_higher_order_ops/auto_functionalize.py: no list returns for mutating ops).
        if not torch.compiler.is_compiling():
            self.compute()

    def _after_forward(self, model, args, output) -> None:
        for norm in self.norms:
            norm._grouped_result = None

    def compute(self) -> None:
        """Runs the grouped op for every layer and hands each parametrization its W / sigma."""
        calls: dict[tuple, list[int]] = {}
        weights = [p.original for p in self.parametrizations]
        for i, (norm, weight) in enumerate(zip(self.norms, weights)):
            n = norm.n_power_iterations if norm.training else 0
            calls.setdefault((weight.device, weight.dtype, n, norm.eps), []).append(i)
        for (_, _, n, eps), members in calls.items():
            weights_sn, sigmas, _, _ = ops.spectral_normalize_grouped_(
                [weights[i] for i in members],
                [self.norms[i]._u for i in members],
                [self.norms[i]._v for i in members],
                [self.norms[i].dim for i in members],
                n,
                eps,
            )
            sigmas = sigmas.data  # kept for sn_ext.sigmas with each layer's index (see SpectralNorm._sigma)
            for index, (i, weight_sn) in enumerate(zip(members, weights_sn)):
                norm = self.norms[i]
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
) -> nn.Module:
    """Puts spectral normalization on `name` of every submodule of `model` that is an instance of `types` (or of
    each module of `layers`, if given), and computes them all together in each forward of `model`. Returns
    `model`. The per-layer arguments (n_power_iterations, eps; dim as torch chooses it) are those of
    sn_ext.spectral_norm; layers that already have sn_ext's spectral norm keep theirs. Undo with
    ungroup_spectral_norm(model), which keeps the per-layer spectral norms."""
    if hasattr(model, "_sn_ext_group"):
        raise RuntimeError("grouped_spectral_norm: this model is already grouped (ungroup_spectral_norm undoes it)")
    chosen = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, types)]
    for layer in chosen:  # every layer checked before any changes
        weight = (
            getattr(layer, name, None)
            if not parametrize.is_parametrized(layer, name)
            else layer.parametrizations[name].original
        )
        if parametrize.is_parametrized(layer, name) and len(layer.parametrizations[name]) > 1:
            raise RuntimeError(
                f"grouped_spectral_norm: '{name}' of {type(layer).__name__} has "
                f"{len(layer.parametrizations[name])} stacked parametrizations; a grouped layer has "
                f"exactly one, sn_ext's spectral norm (remove the others first)"
            )
        if weight is not None and weight.is_complex():
            raise TypeError(
                f"grouped_spectral_norm: '{name}' of {type(layer).__name__} is {weight.dtype}: complex "
                f"weights run on the reference backend only, per layer (sn_ext.spectral_norm)"
            )
        if not _has_sn_ext_norm(layer, name) and has_spectral_norm(layer, name):
            raise RuntimeError(
                f"grouped_spectral_norm: '{name}' of {type(layer).__name__} has torch's spectral "
                f"norm, which cannot be grouped: remove it first"
            )
    members = []
    for layer in chosen:
        if not _has_sn_ext_norm(layer, name):
            weight = getattr(layer, name, None)
            if weight is None or weight.dim() < 2:  # a bias-like vector: nothing to group (torch normalizes it)
                continue
            spectral_norm(layer, name, n_power_iterations, eps)
        members.append((layer, name))
    if not members:
        raise ValueError(
            f"grouped_spectral_norm: no layer of {type(model).__name__} to normalize: none is a "
            f"{', '.join(t.__name__ for t in types)} with a '{name}' of 2 or more dimensions"
        )
    model._sn_ext_group = SpectralNormGroup(model, members)
    return model


def ungroup_spectral_norm(model: nn.Module) -> nn.Module:
    """Undoes grouped_spectral_norm: each layer keeps its spectral norm, computed per layer again."""
    group = getattr(model, "_sn_ext_group", None)
    if group is None:
        raise ValueError("ungroup_spectral_norm: this model is not grouped")
    group.remove(model)
    return model


def _has_sn_ext_norm(layer: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(layer, name) and any(
        isinstance(p, SpectralNorm) for p in layer.parametrizations[name]
    )
