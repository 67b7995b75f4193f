"""sn_ext.renormalize_buffers_: makes every spectral norm's u and v unit vectors again after they were averaged.

Averaging a model for evaluation (torch.optim.swa_utils.AveragedModel with use_buffers=True, an EMA of the state
dict, a checkpoint soup) averages the power-iteration vectors u and v too. An average of unit vectors that point in
slightly different directions is shorter than 1, so sigma = u^T W v comes out too small and W / sigma too large, in
every layer at once: a deep discriminator's eval output blows up. Call this on the averaged model before evaluating
it (after each update_parameters, or once before eval); training models need no call.

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    ...
    ema.update_parameters(model)
    sn_ext.renormalize_buffers_(ema)                          # u, v unit again
    sn_ext.renormalize_buffers_(ema, n_power_iterations=15)   # ... and aligned with the averaged weights
"""

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm

from .. import _matrix, ops
from .conv_parametrization import ConvSpectralNorm
from .spectral_norm import SpectralNorm


def _spectral_norms(layer: nn.Module):
    """(u, v, eps, rounds) for each spectral norm registered directly on `layer`, of any kind: rounds(n) runs n
    power-iteration rounds on u and v in place, with the norm's own order and operator."""
    if parametrize.is_parametrized(layer):
        for plist in layer.parametrizations.values():
            weight = plist.original
            for p in plist:
                if isinstance(p, (SpectralNorm, _TorchSpectralNorm)) and hasattr(p, "_u"):
                    yield (
                        p._u,
                        p._v,
                        p.eps,
                        lambda n, w=weight, p=p: ops.power_iteration_(w, p._u, p._v, p.dim, n, p.eps),
                    )
                    break
                if isinstance(p, ConvSpectralNorm) and p.built:
                    yield p._u, p._v, p.eps, lambda n, w=weight, p=p: p.power_iteration_(w, n)
                    break
                weight = p(weight)  # the input of a spectral norm stacked after other parametrizations
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, _TorchLegacySpectralNorm):  # torch's, sn_ext's (a subclass) or another subclass
            orig, u, v = (getattr(layer, hook.name + suffix) for suffix in ("_orig", "_u", "_v"))
            yield (
                u,
                v,
                hook.eps,
                lambda n, w=orig, u=u, v=v, h=hook: ops.power_iteration_(w, u, v, h.dim, n, h.eps, True),
            )


def _unit_(vector: Tensor, eps: float) -> None:
    """vector <- vector / max(|vector|, eps), summed in float32 (float64 for float64); kept if zero or not finite."""
    x = vector.to(_matrix.accumulate_dtype(vector.dtype))
    norm = torch.linalg.vector_norm(x)
    vector.copy_(torch.where(torch.isfinite(norm) & (norm > 0), x / norm.clamp_min(eps), x))


@torch.no_grad()
def renormalize_buffers_(module: nn.Module, n_power_iterations: int = 0) -> nn.Module:
    """Rescales u and v of every spectral norm in `module` to unit length, in place, then runs `n_power_iterations`
    rounds of power iteration on the current weights (0: none, only the rescaling).

    Works on sn_ext's spectral norms (conv_spectral_norm's too: its rounds run through the convolution) and on
    torch's, parametrization and legacy versions. The rescaling alone makes
    sigma = u^T W v an estimate of the weight's largest singular value again (from below, as for any unit u, v);
    a few power-iteration rounds also turn u and v towards the averaged weight's singular vectors (use them where
    the buffers were not averaged at all, e.g. AveragedModel(use_buffers=False) keeps the copies made when it was
    built). A vector that is exactly zero or not finite is left as it is. Returns `module`.
    """
    if n_power_iterations < 0:
        raise ValueError(f"renormalize_buffers_: n_power_iterations must be >= 0, got {n_power_iterations}")
    for layer in module.modules():
        for u, v, eps, rounds in list(_spectral_norms(layer)):
            _unit_(u, eps)
            _unit_(v, eps)
            if n_power_iterations:
                rounds(n_power_iterations)
    return module
