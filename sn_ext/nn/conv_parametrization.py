"""ConvSpectralNorm, the parametrization sn_ext.conv_spectral_norm registers (nn/conv_spectral_norm.py): W / sigma, or
W / max(1, sigma / coeff), sigma the convolution operator's norm (Gouk et al. 2021), not the reshaped kernel's: the
largest singular value of the layer as a linear map on inputs of one shape.

Power iteration with the layer's own convolution and its exact adjoint (nn/conv_operator.py) on an output-shaped
u and an input-shaped v: u = N(A v), then v = N(A^T u) (torch's parametrization's order), one round per read of
`conv.weight` in train mode and none in eval, 15 rounds at creation; sigma = <u, A v> with the gradient flowing
through it (the convolution's weight gradient of (v, u)). State: the buffers `_u` (shape (out channels, *output
spatial)) and `_v` (the input shape). The layer's forward pre-hook checks each input's size (an operator norm holds
for one input size only) and its load_state_dict pre-hook creates u and v from a checkpoint's shapes.
"""

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._autocast import autocast_off
from .._checks import check_coeff, check_weight_dtype
from .._matrix import accumulate_dtype
from ..reference import _normalized, _usable
from .conv_operator import ConvLayer, ConvOperator

WARM_UP = 15  # rounds at creation, as torch's parametrization


class ConvSpectralNorm(nn.Module):
    """The parametrization W -> W / sigma (or W / max(1, sigma / coeff)), sigma the convolution operator's norm.

    `operator` (a ConvOperator) and the buffers `_u`, `_v` exist once the input shape is known: at creation with
    `input_shape`, else at the layer's first forward, or when a state dict that holds them is loaded."""

    # The sigma of the last computation (sn_ext.sigmas reads it), as SpectralNorm._sigma: not in the state dict.
    _sigma: Tensor | None = None
    operator: ConvOperator | None = None

    def __init__(
        self,
        conv: nn.Module,
        weight: Tensor,
        input_shape=None,
        coeff: float | None = None,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        check_arguments(conv, weight, coeff, n_power_iterations, eps)
        self.coeff = None if coeff is None else float(coeff)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        # The layer's settings, copied: the layer itself as an attribute would become a submodule of this one.
        self.layer = ConvLayer.of(conv)
        if input_shape is not None:
            self.build(weight, input_shape, None)

    @property
    def built(self) -> bool:
        return self.operator is not None

    def build(self, weight: Tensor, input_shape, output_padding=None) -> None:
        """Builds the operator for inputs of `input_shape` (channels, *spatial) and `weight` (this
        parametrization's input) and creates u (output-shaped) and v (input-shaped) as torch's parametrization
        does its vectors: normal draws, u first, normalized, then the warm-up rounds."""
        operator = self.layer.operator(weight.shape, input_shape, output_padding)
        with torch.no_grad():
            u, _ = _unit(weight.new_empty(operator.output_shape).normal_(0, 1), self.eps)
            v, _ = _unit(weight.new_empty(operator.input_shape).normal_(0, 1), self.eps)
            u, v = power_iteration(operator, weight, u, v, WARM_UP, self.eps)
        self._set(operator, u, v)

    @torch.no_grad()
    def power_iteration_(self, weight: Tensor, n_power_iterations: int) -> tuple[Tensor, Tensor]:
        """`n_power_iterations` rounds on the buffers u, v in place (see power_iteration); returns the new values
        as new tensors."""
        buffers = self._buffers
        u, v = power_iteration(self.operator, weight, buffers["_u"], buffers["_v"], n_power_iterations, self.eps)
        buffers["_u"].copy_(u)
        buffers["_v"].copy_(v)
        return u, v

    def _set(self, operator: ConvOperator, u: Tensor, v: Tensor) -> None:
        self.operator = operator
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)

    def _unbuild(self) -> None:
        """Back to the state before the first input (sn_ext.spectral_report's forward builds and undoes)."""
        self.operator = None
        self._sigma = None
        del self._u, self._v

    def forward(self, weight: Tensor) -> Tensor:
        operator = self.operator
        if operator is None:
            raise RuntimeError(
                f"conv_spectral_norm: the weight of {self.layer.description} is normalized by its operator norm on "
                f"inputs of one size, which it has not seen yet: call the layer once, or pass input_shape= to "
                f"conv_spectral_norm (or load a state dict that holds u and v)"
            )
        buffers = self._buffers
        u, v = buffers["_u"], buffers["_v"]
        with autocast_off(weight.device.type):  # as sn_ext's ops: in the weight's dtype
            if self.training:
                # New tensors: a later forward's in-place update cannot change what autograd saved.
                u, v = self.power_iteration_(weight, self.n_power_iterations)
            elif torch.is_grad_enabled():
                u, v = u.clone(), v.clone()
            sigma = operator_sigma(operator, weight, u, v)
        object.__setattr__(self, "_sigma", sigma.data)  # as SpectralNorm's: no op, no launch, no sync
        if self.coeff is None:
            return weight / sigma
        return weight / torch.clamp(sigma / self.coeff, min=1.0)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value  # as torch's spectral norm: assigning conv.weight sets W itself

    def _before_conv_forward(self, conv: nn.Module, args, kwargs) -> None:
        """Before each forward of the layer (_check_inputs): builds the operator on the first input, then checks
        every input's size."""
        x = args[0] if args else kwargs["input"]
        spatial_dims = len(conv.kernel_size)
        input_shape = tuple(x.shape[-(spatial_dims + 1) :])
        output_padding = None
        output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
        if self.layer.transposed and output_size is not None:
            output_padding = tuple(
                conv._output_padding(
                    x, output_size, conv.stride, conv.padding, conv.kernel_size, spatial_dims, conv.dilation
                )
            )
        operator = self.operator
        if operator is None:
            self.build(_input_weight(self, conv), input_shape, output_padding)
            return
        wanted = operator.output_padding if output_padding is None else output_padding
        if input_shape != operator.input_shape or (self.layer.transposed and wanted != operator.output_padding):
            got = f"an input of shape {input_shape}"
            if self.layer.transposed and wanted != operator.output_padding:
                got += f" with output padding {wanted} (built with {operator.output_padding})"
            raise RuntimeError(
                f"conv_spectral_norm: {self.layer.description} normalizes by its operator norm on inputs of shape "
                f"{operator.input_shape} (channels, *spatial) and got {got}: the norm depends on the input size. "
                f"Call it on inputs of the size it was built for, or rebuild it for the new one: "
                f"torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight', leave_parametrized=False), "
                f"then sn_ext.conv_spectral_norm(layer, input_shape={input_shape}, ...)"
            )

    def _before_load(self, conv: nn.Module, state_dict, prefix: str) -> None:
        """Before the layer loads a state dict (_build_from_checkpoints), `prefix` being this parametrization's: if
        not built, takes the input shape (and a transposed layer's output padding) from the checkpoint's u and v,
        which then load as usual."""
        if self.built:
            return
        u_key, v_key = prefix + "_u", prefix + "_v"
        if u_key not in state_dict or v_key not in state_dict:
            return  # torch reports the missing keys
        u_shape, v_shape = tuple(state_dict[u_key].shape), tuple(state_dict[v_key].shape)
        weight = _input_weight(self, conv)
        try:
            operator = self.layer.operator(weight.shape, v_shape, self.layer.output_padding_for(v_shape, u_shape))
        except ValueError as error:
            raise ValueError(f"conv_spectral_norm: {v_key} does not fit: {error}") from None
        if operator.output_shape != u_shape:
            raise ValueError(
                f"conv_spectral_norm: {u_key} has shape {u_shape}, but {self.layer.description} maps inputs of "
                f"shape {v_shape} ({v_key}) to outputs of shape {operator.output_shape}"
            )
        self._set(operator, weight.new_empty(u_shape), weight.new_empty(v_shape))

    def extra_repr(self) -> str:
        shape = None if self.operator is None else self.operator.input_shape
        return f"input_shape={shape}, coeff={self.coeff}, n_power_iterations={self.n_power_iterations}, eps={self.eps}"


def operator_sigma(operator: ConvOperator, weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """sigma = <u, A v> (u output-shaped, v input-shaped, A the convolution with `weight`), summed in float32
    (float64 for float64 weights); differentiable in `weight`: its gradient is the convolution's weight gradient
    of (v, u)."""
    dtype = accumulate_dtype(weight.dtype)
    return torch.vdot(u.reshape(-1).to(dtype), operator.forward(v.unsqueeze(0), weight).reshape(-1).to(dtype))


def _unit(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x / max(|x|, eps), |x|), summed in float32 (float64 for float64) and rounded to x's dtype, as sn_ext's
    matrix kernels."""
    unit, norm = _normalized(x.to(accumulate_dtype(x.dtype)), eps, x.dtype)
    return unit.to(x.dtype), norm


@torch.no_grad()
def _input_weight(norm: ConvSpectralNorm, conv: nn.Module) -> Tensor:
    """The tensor `norm` normalizes: conv's weight through the parametrizations before it (torch's
    ParametrizationList.forward up to `norm`)."""
    plist = conv.parametrizations.weight
    if plist.is_tensor:
        weight = plist.original
    else:
        weight = tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))
    for p in plist:
        if p is norm:
            return weight
        weight = p(*weight) if isinstance(weight, tuple) else p(weight)
    raise AssertionError("the parametrization is not registered on the layer")


def has_conv_spectral_norm(module: nn.Module, name: str = "weight") -> bool:
    """Whether module.<name> has sn_ext.conv_spectral_norm."""
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, ConvSpectralNorm) for p in module.parametrizations[name]
    )


def _norms_on(conv: nn.Module) -> list[tuple[int, ConvSpectralNorm]]:
    if not parametrize.is_parametrized(conv, "weight"):  # removed by remove_parametrizations
        return []
    return [(i, p) for i, p in enumerate(conv.parametrizations.weight) if isinstance(p, ConvSpectralNorm)]


def install_hooks(conv: nn.Module) -> None:
    """Registers the layer's hooks, once per layer whatever was removed since. They are plain functions that find
    its parametrizations when they run, so that a copy of the layer (copy.deepcopy, nn.DataParallel's replicas)
    checks its own, and a removed one leaves them nothing to do."""
    if _check_inputs not in conv._forward_pre_hooks.values():
        conv.register_forward_pre_hook(_check_inputs, with_kwargs=True)
        conv.register_load_state_dict_pre_hook(_build_from_checkpoints)


def _check_inputs(conv: nn.Module, args, kwargs) -> None:
    """The layer's forward pre-hook."""
    for _, norm in _norms_on(conv):
        norm._before_conv_forward(conv, args, kwargs)


def _build_from_checkpoints(conv: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """The layer's load_state_dict pre-hook."""
    for index, norm in _norms_on(conv):
        norm._before_load(conv, state_dict, f"{prefix}parametrizations.weight.{index}.")


def power_iteration(
    operator: ConvOperator, weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float
) -> tuple[Tensor, Tensor]:
    """`n_power_iterations` rounds u = N(A v), v = N(A^T u) from (u, v), A the convolution with `weight` (no grad
    needed), normalized in float32 (float64 for float64 weights) and rounded to the weight's dtype, as sn_ext's
    matrix kernels. Returns new tensors: the last round's, or copies of u and v where a round met a non-finite or
    zero vector (a NaN or zero weight leaves them as they were; no host synchronisation)."""
    ok = torch.ones((), dtype=torch.bool, device=weight.device)
    new_u, new_v = u, v
    for _ in range(n_power_iterations):
        new_u, first = _unit(operator.forward(new_v.unsqueeze(0), weight)[0], eps)
        new_v, last = _unit(operator.adjoint(new_u.unsqueeze(0), weight)[0], eps)
        ok = ok & _usable(first) & _usable(last)
    return torch.where(ok, new_u, u), torch.where(ok, new_v, v)


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def check_arguments(conv: nn.Module, weight, coeff, n_power_iterations: int, eps: float) -> None:
    if not isinstance(conv, _CONV_TYPES):
        raise TypeError(
            f"conv_spectral_norm: conv must be a Conv1d/2d/3d or ConvTranspose1d/2d/3d, got {type(conv).__name__} "
            f"(sn_ext.spectral_norm normalizes any weight by its reshaped matrix's norm)"
        )
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"conv_spectral_norm: the weight of {type(conv).__name__} is uninitialized (lazy): run a dummy forward "
            f"before applying spectral normalization"
        )
    check_weight_dtype("conv_spectral_norm: the weight", weight.dtype, complex_ok=False)
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations <= 0:
        raise ValueError(
            f"conv_spectral_norm: n_power_iterations must be a positive int, got n_power_iterations="
            f"{n_power_iterations!r}"
        )
    if not eps >= 0:  # NaN too
        raise ValueError(f"conv_spectral_norm: eps must be >= 0, got eps={eps}")
    check_coeff("conv_spectral_norm", coeff)
