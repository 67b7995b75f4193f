"""sn_ext.spectral_norm: a drop-in for torch.nn.utils.parametrizations.spectral_norm on sn_ext's fused ops.

Same arguments, defaults, errors, random draws, warm-up (15 iterations at registration, then n more when
register_parametrization checks the parametrization in train mode), u-then-v order, one update per access of
`module.weight` in train mode and none in eval, and the same state_dict keys. It is a real
torch.nn.utils.parametrize parametrization, so remove_parametrizations, parametrize.cached() and is_parametrized
work as with torch's.

Beyond torch: loading a checkpoint of torch's legacy spectral norm works; registering twice on the same tensor
stacks a second spectral norm as torch does, with a warning; a step whose weight is non-finite or zero leaves u and
v as they were (the output shows NaN/Inf). `coeff` bounds the norm instead (W / max(1, sigma / coeff)), and
`sigma_grad=False` stops the gradient through sigma (docs/variants.md); sigma-reparam (nn/sigma_reparam.py) is this
parametrization with a learned gain.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm

from .. import _state_dict, backends, sharded
from .._checks import check_coeff, check_weight_dtype
from . import _kernels, _parametrize
from .conv_parametrization import ConvSpectralNorm

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# The types a weight has outside tensor parallel: the forward's one type check before the plain path.
_PLAIN_TENSORS = (Tensor, nn.Parameter)  # a tuple: dynamo (torch 2.6) cannot trace `in` on a frozenset of types


class SpectralNorm(nn.Module):
    """The parametrization W -> W / sigma(W), or W / max(1, sigma / coeff) with `coeff`; the same state and attributes
    as torch's _SpectralNorm. `sigma_grad=False` stops the gradient through sigma (W / stop_gradient(...))."""

    # W / sigma computed with the other layers of a grouped model (nn/grouped.py), for this layer's next read.
    _grouped_result: Tensor | None = None
    # The sigma of the last computation (sn_ext.sigmas reads it): a plain attribute, not a buffer (the state dict
    # keeps torch's keys), detached with .data (no dispatched op, no launch, no sync). A grouped computation
    # keeps its vector of sigmas and this layer's index in it (indexing would be an op).
    _sigma: Tensor | None = None
    _sigma_index: int = 0
    # Whether eval mode runs the rounds too, on copies of u and v (sigma-reparam's eval_iteration; nn/sigma_reparam.py).
    eval_iteration: bool = False

    def __init__(
        self,
        weight: Tensor,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
        backend: str | None = None,
        *,
        vectors: tuple[Tensor, Tensor] | None = None,
        coeff: float | None = None,
        sigma_grad: bool = True,
    ) -> None:
        """`vectors`: an existing (u, v) to keep as the buffers (the same tensors; sn_ext.convert_spectral_norm),
        with no random draws and no warm-up."""
        super().__init__()
        check_arguments(weight, n_power_iterations, dim, eps)
        check_scaling_arguments(weight, coeff, sigma_grad)
        self.backend = backends.requested_backend(backend)  # the name asked for ("auto", ...): see sn_ext.backends
        ndim = weight.ndim
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.coeff = None if coeff is None else float(coeff)
        self.sigma_grad = sigma_grad
        if ndim > 1:
            if sharded.is_dtensor(weight):  # tensor parallel: what it cannot take fails before any draw
                sharded.check_weight(weight, self.dim)
            self.n_power_iterations = n_power_iterations
            if vectors is not None:
                self.register_buffer("_u", vectors[0])
                self.register_buffer("_v", vectors[1])
                self._kernels = backends.initial_kernels(self.backend, weight)
                return
            h = weight.shape[self.dim]
            w = weight.numel() // h
            # torch's random draws, in torch's order, so that equal seeds give equal buffers; plain tensors, whole,
            # for a DTensor weight too (sn_ext/sharded.py), so that every rank holds one process's draws.
            u = torch.empty(h, dtype=weight.dtype, device=weight.device).normal_(0, 1)
            v = torch.empty(w, dtype=weight.dtype, device=weight.device).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            self._kernels = _kernels.prepare(self.backend, weight, self._u, self._v, self.dim, 15, self.eps)

    # The forward runs on every access of module.weight: its Python is a large part of a small layer's time, so it
    # reads the buffers from `_buffers` (nn.Module.__getattr__ costs ~0.9 us each) and sets the plain attributes
    # with object.__setattr__ (nn.Module.__setattr__ ~1.9 us: it looks for a parameter, module or buffer of that
    # name, and these never are one). Both trace under torch.compile as the slow forms do.
    def forward(self, weight: Tensor) -> Tensor:
        grouped = self._grouped_result
        if grouped is not None:
            object.__setattr__(self, "_grouped_result", None)
            return grouped
        if weight.ndim == 1:
            return self._normalize_vector(weight)
        n = self.n_power_iterations if self.training else 0
        kernels = self._kernels
        if kernels.device != weight.device or kernels.dtype != weight.dtype:  # moved or cast
            kernels = _kernels.kernels_for(self, weight)
        buffers = self._buffers
        u, v = buffers["_u"], buffers["_v"]
        coeff, gain, sigma_grad = self.coeff, self._parameters.get("gain"), self.sigma_grad
        if not self.training and self.eval_iteration:  # rounds from the buffers, which stay as they are
            n, u, v = self.n_power_iterations, u.clone(), v.clone()
        if type(weight) not in _PLAIN_TENSORS and sharded.is_dtensor(weight):  # tensor parallel: sn_ext/sharded.py
            weight_sn, sigma = sharded.spectral_normalize(
                weight, u, v, self.dim, n, self.eps, kernels, coeff, gain, sigma_grad
            )
            object.__setattr__(self, "_sigma", sigma)
            return weight_sn
        # u and v are updated in place, in the op (one launch on a GPU); autograd saved the vectors used, not the
        # buffers, so calling the module twice before one backward works.
        if coeff is None and gain is None and sigma_grad:  # the plain form: the op's short call
            weight_sn, sigma, _, _ = kernels.forward(weight, u, v, self.dim, n, self.eps)
        else:
            weight_sn, sigma, _, _ = kernels.forward(
                weight, u, v, self.dim, n, self.eps, False, coeff, gain, sigma_grad
            )
        object.__setattr__(self, "_sigma", sigma.data)
        return weight_sn

    def _normalize_vector(self, weight: Tensor) -> Tensor:
        """A 1-D weight (no u, v): divided by its norm, as torch's F.normalize, or by its scaled form's divisor."""
        coeff, gain = self.coeff, self._parameters.get("gain")
        if coeff is None and gain is None and self.sigma_grad:
            return F.normalize(weight, dim=0, eps=self.eps)
        norm = torch.linalg.vector_norm(weight)
        if not self.sigma_grad:
            norm = norm.detach()
        divisor = norm.clamp_min(self.eps if coeff is None else coeff)
        numerator = 1.0 if coeff is None else coeff
        return weight * ((numerator if gain is None else gain * numerator) / divisor)

    def right_inverse(self, value: Tensor) -> Tensor:
        # W cannot be recovered from W / sigma; like torch, assigning module.weight sets W itself.
        return value

    def extra_repr(self) -> str:
        n = getattr(self, "n_power_iterations", None)
        text = f"dim={self.dim}, eps={self.eps}" + (f", n_power_iterations={n}" if n is not None else "")
        if self.coeff is not None:
            text += f", coeff={self.coeff}"
        return text + ("" if self.sigma_grad else ", sigma_grad=False")

    @property
    def plain(self) -> bool:
        """Whether it is torch's spectral norm (W / sigma, with the gradient through sigma): no coeff, no gain."""
        return self.coeff is None and "gain" not in self._parameters and self.sigma_grad


def check_scaling_arguments(weight: Tensor, coeff, sigma_grad) -> None:
    """coeff None or a positive finite number; sigma_grad a bool; neither for a complex weight."""
    check_coeff("spectral_norm", coeff)
    if not isinstance(sigma_grad, bool):
        raise TypeError(f"spectral_norm: sigma_grad must be a bool, got sigma_grad={sigma_grad!r}")
    if weight.is_complex() and (coeff is not None or not sigma_grad):
        raise TypeError(f"spectral_norm: coeff and sigma_grad take real weights, got {weight.dtype}")


def check_arguments(weight: Tensor, n_power_iterations: int, dim: int, eps: float, complex_ok: bool = True) -> None:
    """torch's errors (IndexError for dim, ValueError for n_power_iterations), plus the ones torch lacks. Complex
    weights as torch's parametrization takes them (`complex_ok`; the legacy version's power iteration has no
    conjugates, so sn_ext.legacy refuses them)."""
    ndim = weight.ndim
    if ndim == 0 or weight.numel() == 0:
        raise ValueError(
            f"spectral_norm: the weight must be a non-empty tensor with at least 1 dimension, "
            f"got shape {tuple(weight.shape)}"
        )
    hint = "" if complex_ok or not weight.is_complex() else " (complex weights: sn_ext.spectral_norm)"
    check_weight_dtype("spectral_norm: the weight", weight.dtype, complex_ok, hint)
    if dim >= ndim or dim < -ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})")
    if n_power_iterations <= 0:
        raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}")
    if not eps >= 0:  # NaN too
        raise ValueError(f"spectral_norm: eps must be >= 0, got eps={eps}")


def has_parametrization_spectral_norm(module: nn.Module, name: str) -> bool:
    """Whether module.<name> has a spectral-norm parametrization (sn_ext's, of either kind, or torch's)."""
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, (SpectralNorm, _TorchSpectralNorm, ConvSpectralNorm)) for p in module.parametrizations[name]
    )


def has_legacy_spectral_norm(module: nn.Module, name: str) -> bool:
    """Whether module.<name> has a legacy spectral-norm hook: torch's, sn_ext's (a subclass) or any other subclass."""
    return any(
        isinstance(hook, _TorchLegacySpectralNorm) and hook.name == name for hook in module._forward_pre_hooks.values()
    )


def has_spectral_norm(module: nn.Module, name: str) -> bool:
    """Whether module.<name> already has a spectral norm: sn_ext's or torch's, parametrization or legacy hook."""
    return has_parametrization_spectral_norm(module, name) or has_legacy_spectral_norm(module, name)


STACKING_WARNING = (
    "spectral_norm: '{name}' of {module} already has a spectral norm; a second one is stacked on it "
    "(it normalizes the first one's output, as torch's does), which is almost certainly unintended"
)


def default_dim(module: nn.Module) -> int:
    """torch's default: 1 for transposed convolutions (their output channels are dim 1), else 0."""
    return 1 if isinstance(module, _CONV_TRANSPOSE) else 0


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    backend: str | None = None,
    coeff: float | None = None,
    sigma_grad: bool = True,
) -> nn.Module:
    """Applies spectral normalization to `module.<name>`; the arguments of torch's parametrizations.spectral_norm.

    Returns the module. Its state dict holds ``parametrizations.<name>.original`` and
    ``parametrizations.<name>.0._u`` / ``._v``, exactly as torch's; a state dict of torch's legacy
    ``torch.nn.utils.spectral_norm`` (``<name>_orig``, ``<name>_u``, ``<name>_v``) loads too.

    `backend` picks the kernels: "auto" (the fastest that can take the weight where it runs), "cpu", "cuda",
    "triton" or "reference"; None means $SN_EXT_BACKEND, else "auto" (see sn_ext.backends).

    `coeff=c` bounds the norm instead: W / max(1, sigma / c), W itself while sigma <= c (bounded spectral norm:
    i-ResNet, Residual Flows, DUE, DDU, SNGP). `sigma_grad=False` stops the gradient through sigma: W /
    stop_gradient(sigma), or W / stop_gradient(max(1, sigma / c)) (edward2's SNGP). docs/variants.md.
    """
    weight = checked_weight(module, name, "spectral_norm")
    if dim is None:
        dim = default_dim(module)
    stacked = parametrize.is_parametrized(module, name)
    sn = SpectralNorm(weight, n_power_iterations, dim, eps, backend, coeff=coeff, sigma_grad=sigma_grad)
    register(module, name, weight, sn, stacked)
    return module


def checked_weight(module: nn.Module, name: str, what: str) -> Tensor:
    """module.<name>, read once, after the checks of registering a parametrization on it (`what`: the function, for
    messages): a legacy spectral norm there raises, a parametrized spectral norm warns (a second is stacked), and it
    must be an initialized tensor. Checked before reading it: a parametrized weight runs a round in train mode."""
    if has_legacy_spectral_norm(module, name):  # torch fails here too, less clearly (no parameter named so)
        raise RuntimeError(
            f"{what}: '{name}' of {type(module).__name__} already has a legacy spectral norm "
            f"(torch.nn.utils.spectral_norm or sn_ext.legacy): remove it first"
        )
    if has_parametrization_spectral_norm(module, name):
        warnings.warn(STACKING_WARNING.format(name=name, module=type(module).__name__), UserWarning, stacklevel=3)
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{what}: '{name}' of {type(module).__name__} is an uninitialized (lazy) parameter: "
            f"run a dummy forward before applying spectral normalization"
        )
    return weight


def register(module: nn.Module, name: str, weight: Tensor, sn: SpectralNorm, stacked: bool) -> None:
    """Registers the parametrization `sn`, made for `weight` (module.<name>, read once before: reading a parametrized
    weight in train mode runs a round), as torch's register_parametrization does, with sn_ext's faster property and,
    for a first spectral norm, the hook that loads either torch layout."""
    with _kernels.registering(sn, weight):
        parametrize.register_parametrization(module, name, sn)
    _parametrize.install(module, name)
    if not stacked:  # a legacy checkpoint's keys map to the first parametrization's
        _state_dict.accept_both_layouts(module, name, legacy=False, dim=sn.dim)
