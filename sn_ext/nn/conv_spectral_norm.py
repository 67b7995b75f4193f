"""sn_ext.conv_spectral_norm: spectral normalization by the convolution operator's norm (Gouk et al. 2021), not the
reshaped kernel's (docs/variants.md).

    conv = sn_ext.conv_spectral_norm(nn.Conv2d(3, 64, 3, stride=2, padding=1), input_shape=(3, 32, 32))
    conv = sn_ext.conv_spectral_norm(nn.Conv2d(64, 64, 3, padding=1), coeff=0.9)  # shape from the first input

A torch.nn.utils.parametrize parametrization (ConvSpectralNorm, nn/conv_parametrization.py), as sn_ext.spectral_norm:
state_dict keys ``parametrizations.weight.original``, ``parametrizations.weight.0._u``, ``._v``,
remove_parametrizations, parametrize.cached(), copy.deepcopy.
"""

import warnings

from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _parametrize
from .conv_parametrization import ConvSpectralNorm, install_hooks
from .spectral_norm import STACKING_WARNING, has_legacy_spectral_norm, has_parametrization_spectral_norm


def conv_spectral_norm(
    conv: nn.Module, input_shape=None, coeff: float | None = None, n_power_iterations: int = 1, eps: float = 1e-12
) -> nn.Module:
    """Normalizes `conv.weight` by the convolution operator's norm: W / sigma, or W / max(1, sigma / coeff) with
    `coeff` (bounded: the layer is left as it is while sigma <= coeff), sigma the largest singular value of the
    layer (less its bias) as a linear map on inputs of shape `input_shape` = (channels, *spatial).

    `conv`: Conv1d/2d/3d or ConvTranspose1d/2d/3d, any stride, padding (and padding mode), dilation, groups and
    output padding. `input_shape` None: taken from the layer's first input, which creates u and v then (until
    then they are not in the state dict; loading a state dict that holds them creates them from its shapes).
    A later input of another size raises, naming the layer and what to do. `n_power_iterations` rounds per read
    of the weight in train mode (none in eval), 15 at creation; `eps` as torch's spectral_norm. Returns `conv`.
    """
    if has_legacy_spectral_norm(conv, "weight"):
        raise RuntimeError(
            f"conv_spectral_norm: 'weight' of {type(conv).__name__} already has a legacy spectral norm "
            f"(torch.nn.utils.spectral_norm or sn_ext.legacy): remove it first"
        )
    if has_parametrization_spectral_norm(conv, "weight"):
        warnings.warn(STACKING_WARNING.format(name="weight", module=type(conv).__name__), UserWarning, stacklevel=2)
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"conv_spectral_norm: {type(conv).__name__} has no weight")
    norm = ConvSpectralNorm(conv, weight, input_shape, coeff, n_power_iterations, eps)
    # Built: torch's check runs it once (one more round in train mode, as torch's spectral_norm: 15 + n). Unbuilt:
    # nothing to run yet; the first forward builds it (15 rounds), then its read of the weight runs n.
    parametrize.register_parametrization(conv, "weight", norm, unsafe=not norm.built)
    install_hooks(conv)
    _parametrize.install(conv, "weight")
    return conv
