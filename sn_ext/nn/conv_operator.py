"""A convolution layer's linear part (no bias) as a map on inputs of one shape, with its exact adjoint: what
sn_ext.conv_spectral_norm's power iteration and sn_ext.spectral_report's operator norms run on.

The map is the layer's own forward: Conv1d/2d/3d (any stride, padding, "same"/"valid", padding mode, dilation,
groups) and ConvTranspose1d/2d/3d (any stride, padding, output padding, dilation, groups). The adjoint is exact
for all of them, written with torch's convolutions and the shapes, so it is as fast as the forward:

- a Conv's adjoint is conv_transpose with the output_padding that gives back the input's size: from the shapes,
  for every stride (DUE's ``1 - W % 2`` holds for stride 2 with a 3x3 kernel and padding 1 only); the padding's
  part is cropping for zero padding and, for reflect, replicate and circular padding, the padding map's own
  adjoint (each padded position adds its value back to the input position it copies);
- a ConvTranspose's adjoint is conv with the same settings, cropped to the input's size (an output_padding of at
  least the stride, possible with a larger dilation, makes the conv's output longer).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A convolution layer's settings, copied (nothing here holds the layer): enough to build its operator for any
    input shape."""

    description: str  # "Conv2d(3, 64, kernel_size=(3, 3), stride=(2, 2))", for messages
    transposed: bool
    in_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # numbers, or "same" / "valid" (Conv only)
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str  # "zeros", "reflect", "replicate" or "circular" (ConvTranspose: "zeros")
    pads: tuple[tuple[int, int], ...]  # Conv: (before, after) padding of each spatial dim, as its forward pads
    output_padding: tuple[int, ...]  # ConvTranspose: the layer's own

    @classmethod
    def of(cls, conv: nn.Module) -> ConvLayer:
        spatial_dims = len(conv.kernel_size)
        reversed_pads = conv._reversed_padding_repeated_twice  # (before, after) of the last dim first
        return cls(
            description=f"{parametrize.type_before_parametrizations(conv).__name__}({conv.extra_repr()})",
            transposed=bool(conv.transposed),
            in_channels=conv.in_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            pads=tuple((reversed_pads[2 * i], reversed_pads[2 * i + 1]) for i in reversed(range(spatial_dims))),
            output_padding=tuple(conv.output_padding),
        )

    def output_padding_for(self, input_shape, output_shape) -> tuple[int, ...] | None:
        """The output padding with which a transposed layer maps inputs of `input_shape` (channels, *spatial) to
        outputs of `output_shape` (None for a Conv): what an ``output_size=`` argument made it use."""
        if not self.transposed:
            return None
        return tuple(
            o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
            for o, i, s, p, d, k in zip(
                output_shape[1:], input_shape[1:], self.stride, self.padding, self.dilation, self.kernel_size
            )
        )

    def operator(self, weight_shape, input_shape, output_padding=None) -> ConvOperator:
        """The layer's operator (its weight of `weight_shape`) on inputs of `input_shape` = (channels, *spatial).
        `output_padding`: a transposed layer's, if not its own. Raises ValueError naming input_shape if the layer
        cannot take such inputs."""
        spatial_dims = len(self.kernel_size)
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != spatial_dims + 1 or min(input_shape) <= 0:
            sizes = ", ".join("size" for _ in range(spatial_dims))
            raise ValueError(
                f"input_shape must be (channels, {sizes}) with positive sizes for {self.description}, got {input_shape}"
            )
        if input_shape[0] != self.in_channels:
            raise ValueError(
                f"input_shape {input_shape} has {input_shape[0]} channels; {self.description} takes {self.in_channels}"
            )
        if not self.transposed or output_padding is None:
            output_padding = self.output_padding if self.transposed else ()
        # The output shape from the forward itself, on meta tensors (no memory, no compute): torch's own errors.
        shaped = ConvOperator(self, input_shape, tuple(output_padding), (), (), ())
        try:
            out = shaped.forward(
                torch.empty((1, *input_shape), device="meta"), torch.empty(weight_shape, device="meta")
            )
        except RuntimeError as error:
            raise ValueError(f"input_shape {input_shape} does not fit {self.description}: {error}") from None
        output_shape = tuple(out.shape[1:])
        if min(output_shape[1:]) < 1:  # torch 2.6's meta kernels return an empty output instead of raising
            raise ValueError(
                f"input_shape {input_shape} does not fit {self.description}: its output would be {output_shape}"
            )
        padding, adjoint_output_padding = _adjoint_paddings(self, weight_shape, input_shape, output_shape)
        return dataclasses.replace(
            shaped, output_shape=output_shape, adjoint_padding=padding, adjoint_output_padding=adjoint_output_padding
        )


@dataclasses.dataclass(frozen=True)
class ConvOperator:
    """The linear part of a convolution layer on inputs of shape (N, *input_shape): ``forward(x, weight)`` is what
    the layer computes less its bias, ``adjoint(y, weight)`` its transpose (ConvLayer.operator builds it)."""

    layer: ConvLayer
    input_shape: tuple[int, ...]  # (channels, *spatial)
    output_padding: tuple[int, ...]  # ConvTranspose: the output padding its forward uses
    output_shape: tuple[int, ...]
    adjoint_padding: tuple[int, ...]  # Conv: the adjoint's conv_transpose padding and output_padding
    adjoint_output_padding: tuple[int, ...]

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's forward less its bias (torch's Conv._conv_forward; ConvTranspose.forward)."""
        layer = self.layer
        if layer.transposed:
            return _CONV_TRANSPOSE[len(layer.stride)](
                x, weight, None, layer.stride, layer.padding, self.output_padding, layer.groups, layer.dilation
            )
        padding = layer.padding
        if layer.padding_mode != "zeros":
            x = F.pad(x, [p for pair in reversed(layer.pads) for p in pair], mode=layer.padding_mode)
            padding = 0
        return _CONV[len(layer.stride)](x, weight, None, layer.stride, padding, layer.dilation, layer.groups)

    def adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        """The transpose of forward: <forward(x), y> = <x, adjoint(y)> for every x of the input shape."""
        layer = self.layer
        spatial_dims = len(layer.stride)
        if layer.transposed:
            x = _CONV[spatial_dims](y, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            x = _CONV_TRANSPOSE[spatial_dims](
                y,
                weight,
                None,
                layer.stride,
                self.adjoint_padding,
                self.adjoint_output_padding,
                layer.groups,
                layer.dilation,
            )
            if layer.padding_mode != "zeros":
                for i, (before, after) in enumerate(layer.pads):
                    x = _unpad(x, 2 + i, before, after, self.input_shape[1 + i], layer.padding_mode)
        for i, size in enumerate(self.input_shape[1:]):  # one longer at most; see _adjoint_paddings
            if x.shape[2 + i] != size:
                x = x.narrow(2 + i, 0, size)
        return x


def _adjoint_paddings(layer: ConvLayer, weight_shape, input_shape, output_shape) -> tuple[tuple, tuple]:
    """The padding and output_padding of a Conv's adjoint, a conv_transpose (a ConvTranspose's adjoint, a conv with
    the layer's settings, needs none: it is only cropped to the input's size when output_padding >= stride).

    Along a dim with input size n, padding (before, after) and N = n + before + after, the Conv reads the first
    F = (out - 1) * stride + dilation * (kernel - 1) + 1 positions of the padded input (the N - F < stride others
    never). conv_transpose with padding p and output_padding q returns positions [p, F - p + q) of those F, zeros
    past F. Zero padding: p = before and q = max(0, n + 2 * before - F) (< stride) cover [before, before + n),
    the input (cropped to n when after = before + 1, as "same" pads odd totals). Other modes: p = 0 and q = N - F
    give the whole padded input, which _unpad folds back onto the input. From the shapes, for every stride."""
    if layer.transposed:
        return (), ()
    sizes, kernel = input_shape[1:], weight_shape[2:]
    full = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(output_shape[1:], layer.stride, layer.dilation, kernel)]
    if layer.padding_mode == "zeros":
        padding = tuple(before for before, _ in layer.pads)
        output_padding = tuple(max(0, n + 2 * b - f) for n, (b, _), f in zip(sizes, layer.pads, full))
    else:
        padding = (0,) * len(sizes)
        output_padding = tuple(n + b + a - f for n, (b, a), f in zip(sizes, layer.pads, full))
    return padding, output_padding


def _unpad(z: Tensor, dim: int, before: int, after: int, n: int, mode: str) -> Tensor:
    """The adjoint of F.pad(mode) along `dim` (input size n): each padded position's value added to the input
    position it copies. reflect: position -j copies j, n - 1 + j copies n - 1 - j; replicate: every position
    before copies 0, after copies n - 1; circular: -j copies n - j, n - 1 + j copies j - 1."""
    x = z.narrow(dim, before, n).clone()
    head, tail = z.narrow(dim, 0, before), z.narrow(dim, before + n, after)
    if mode == "reflect":
        x.narrow(dim, 1, before).add_(head.flip(dim))
        x.narrow(dim, n - 1 - after, after).add_(tail.flip(dim))
    elif mode == "replicate":
        x.narrow(dim, 0, 1).add_(head.sum(dim, keepdim=True))
        x.narrow(dim, n - 1, 1).add_(tail.sum(dim, keepdim=True))
    elif mode == "circular":
        x.narrow(dim, n - before, before).add_(head)
        x.narrow(dim, 0, after).add_(tail)
    else:
        raise ValueError(f"padding_mode {mode!r} has no adjoint here")
    return x
