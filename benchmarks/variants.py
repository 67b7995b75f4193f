"""Section "variants": one layer's bounded spectral norm and sigma-reparam (docs/variants.md), each against its
hand-written PyTorch equivalent and against plain spectral norm, per shape, dtype and mode (as the layer section:
benchmarks/layer.py, whose weights, modes and side-by-side timing it uses).

Providers, "<variant>: <implementation>":
- plain: torch (torch.nn.utils.parametrizations.spectral_norm), sn_ext <backend> (sn_ext.spectral_norm);
- bounded (coeff 0.5): torch (torch's parametrization with its last line W / sigma written W / max(1, sigma / c), as
  i-ResNet, DUE and Residual Flows write it), sn_ext <backend> (sn_ext.spectral_norm(..., coeff=0.5));
- sigma-reparam: torch (the same with gamma / sigma * W, gamma a Parameter, as AMAGO writes it), sn_ext <backend>
  (sn_ext.sigma_reparam(..., gamma_init=1.0)).
The sn_ext backends are the compiled ones that can take the weight here (cpu, cuda, triton); all the providers of a
shape, dtype and mode are timed side by side, their calls interleaved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm

import sn_ext
from sn_ext import backends

from .layer import WeightHolder, make_steps, time_side_by_side, weights_and_grads
from .records import timing_columns

SHAPES = ["64x3x3x3", "256x256x3x3", "512x512x3x3", "1024x1024", "4096x4096"]
QUICK_SHAPES = SHAPES[:2]
MODES = ("train", "eval")
QUICK_MODES = ("train",)
COEFF = 0.5
VARIANTS = ("plain", "bounded", "sigma-reparam")
SN_EXT_BACKENDS = ("cpu", "cuda", "triton")
PROVIDERS = [f"{v}: {impl}" for v in VARIANTS for impl in ("torch", *(f"sn_ext {b}" for b in SN_EXT_BACKENDS))]
COLUMNS = timing_columns(["shape", "params", "dtype", "mode", "provider"])


class _TorchVariant(TorchSpectralNorm):
    """torch's parametrization, with its last line, W / sigma, the variant's (`scaled`)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        weight_mat = self._reshape_weight_to_matrix(weight)
        if self.training:
            self._power_method(weight_mat, self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return self.scaled(weight, torch.vdot(u, torch.mv(weight_mat, v)))


class TorchBounded(_TorchVariant):
    def __init__(self, weight: torch.Tensor, coeff: float):
        super().__init__(weight)
        self.coeff = coeff

    def scaled(self, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return weight / torch.clamp(sigma / self.coeff, min=1.0)


class TorchSigmaReparam(_TorchVariant):
    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.gamma = nn.Parameter(torch.ones((), dtype=weight.dtype, device=weight.device))

    def scaled(self, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.gamma / sigma * weight


def skip_reason(provider: str, device: torch.device, dtype: torch.dtype) -> str:
    implementation = provider.split(": ")[1]
    if implementation.startswith("sn_ext "):
        return "; ".join(backends.get(implementation.split()[1]).not_supported_reasons(device, dtype))
    return ""


def make_layer(provider: str, weight: torch.Tensor) -> nn.Module:
    variant, implementation = provider.split(": ")
    holder = WeightHolder(weight)
    if implementation == "torch":
        if variant == "plain":
            return nn.utils.parametrizations.spectral_norm(holder)
        made = TorchBounded(weight, COEFF) if variant == "bounded" else TorchSigmaReparam(weight)
        parametrize.register_parametrization(holder, "weight", made)
        return holder
    backend = implementation.split()[1]
    if variant == "sigma-reparam":
        return sn_ext.sigma_reparam(holder, backend=backend, gamma_init=1.0)
    return sn_ext.spectral_norm(holder, backend=backend, coeff=COEFF if variant == "bounded" else None)


def run(
    shapes: list[str],
    dtypes: list[torch.dtype],
    device: torch.device,
    *,
    quick: bool,
    write: Callable[[dict], None],
    modes: tuple[str, ...] = MODES,
) -> None:
    budget = 0.05 if quick else 0.5
    for dtype in dtypes:
        dtype_name = str(dtype).removeprefix("torch.")
        for shape_text in shapes:
            params, weights, grads = weights_and_grads(shape_text, dtype, device, quick)
            base = {"shape": shape_text, "params": params, "dtype": dtype_name}
            runnable = {}
            for provider in PROVIDERS:
                reason = skip_reason(provider, device, dtype)
                if reason:
                    for mode in modes:
                        write({**base, "provider": provider, "mode": mode, "status": "skipped", "note": reason})
                    continue
                runnable[provider] = [make_layer(provider, w.clone()) for w in weights]
            for mode in modes:
                steps = {p: functools.partial(make_steps, modules, grads, mode) for p, modules in runnable.items()}
                time_side_by_side(steps, {**base, "mode": mode}, device, budget, write, "variants")
