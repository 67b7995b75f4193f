"""Generators and discriminators: small MLPs for 2-D data, and the SN-GAN paper's standard CNN and ResNet for
32x32 (CIFAR-10) and 48x48 (STL-10) images (Miyato et al. 2018, Tables 3-5; other sizes divisible by 8 use the
32x32 layout with a bottom of size/8, e.g. 2x2 for 16x16 digits).

Spectral norm goes on the discriminator only, after construction and initialisation, with
`apply_spectral_norm(D, "none" | "torch" | "sn_ext" | "sn_ext_grouped" | "torch_converted")`, which covers every
Conv/ConvTranspose/Linear/Embedding.
Every D takes `out_dim`: 1 for the hinge, non-saturating and Wasserstein losses, k for the triplet loss's
embedding. `width` scales every channel count (1.0 = the paper's; the tests use tiny widths).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SN_KINDS = ("none", "torch", "sn_ext", "sn_ext_grouped", "torch_converted")
ARCHS = ("mlp", "cnn", "resnet")
_SN_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)


def apply_spectral_norm(module: nn.Module, kind: str, n_power_iterations: int = 1) -> nn.Module:
    """Put spectral norm on the `weight` of every Conv*/ConvTranspose*/Linear/Embedding inside `module` (in place;
    returns it). kind: "none" (leave it), "torch" (torch.nn.utils.parametrizations.spectral_norm), "sn_ext"
    (sn_ext.spectral_norm, the same parametrization with fused kernels) or "sn_ext_grouped"
    (sn_ext.grouped_spectral_norm(module): the same per-layer parametrizations, all computed by one op per forward
    of `module`) or "torch_converted" (torch's, then swapped for sn_ext's by sn_ext.convert_spectral_norm: how a
    model whose code calls torch gets sn_ext). All use torch's default `dim` (1 for ConvTranspose, else 0) and the
    same state_dict keys, so checkpoints load across them."""
    if kind not in SN_KINDS:
        raise ValueError(f"unknown spectral norm {kind!r}: choose one of {', '.join(SN_KINDS)}")
    if kind == "none":
        return module
    if kind == "torch_converted":
        from sn_ext import convert_spectral_norm

        return convert_spectral_norm(apply_spectral_norm(module, "torch", n_power_iterations))
    if kind == "sn_ext_grouped":
        from sn_ext import grouped_spectral_norm

        return grouped_spectral_norm(module, _SN_TYPES, n_power_iterations=n_power_iterations)
    if kind == "torch":
        from torch.nn.utils.parametrizations import spectral_norm
    else:
        from sn_ext import spectral_norm
    targets = [m for m in module.modules() if isinstance(m, _SN_TYPES)]
    for m in targets:
        spectral_norm(m, n_power_iterations=n_power_iterations)
    return module


def _c(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


# ---------------------------------------------------------------------------------------------------------------
# MLP (2-D mixtures; also usable on flattened images)


class MLPGenerator(nn.Module):
    """z -> [Linear, BN?, ReLU] x depth -> Linear -> data; tanh for images. No BN by default (toy 2-D setups)."""

    def __init__(
        self, z_dim: int, data_shape: tuple[int, ...], hidden: int = 128, depth: int = 3, tanh: bool = False
    ) -> None:
        super().__init__()
        self.z_dim, self.data_shape, self.tanh = z_dim, tuple(data_shape), tanh
        layers, d = [], z_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, math.prod(self.data_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(z).view(z.shape[0], *self.data_shape)
        return torch.tanh(x) if self.tanh else x


class MLPDiscriminator(nn.Module):
    """data -> [Linear, LeakyReLU(0.1)] x depth -> Linear(out_dim), times `out_scale`.

    `out_scale` (a constant, not learned) sets the Lipschitz bound of an SN discriminator: SN makes the MLP at most
    1-Lipschitz, so on the ring (modes 0.77 apart) its outputs stay near +-0.05, the hinge never saturates and G
    gets no push into the sigma = 0.01 modes; at 10x the hinge's margin of 1 is reachable (see docs/gan_results.md)."""

    def __init__(
        self, data_shape: tuple[int, ...], hidden: int = 128, depth: int = 3, out_dim: int = 1, out_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.out_scale = out_scale
        layers, d = [], math.prod(data_shape)
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.LeakyReLU(0.1)]
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x.flatten(1))
        return out * self.out_scale if self.out_scale != 1.0 else out


# ---------------------------------------------------------------------------------------------------------------
# Standard CNN (paper Table 3)


def _bottom(img_size: int) -> int:
    if img_size % 8:
        raise ValueError(f"the CNN and ResNet models need an image size divisible by 8, got {img_size}")
    return img_size // 8


class CNNGenerator(nn.Module):
    """z -> dense MxMx512 -> BN ReLU -> deconv4x4 s2 256 BN ReLU -> deconv 128 -> deconv 64 -> conv3x3 C, tanh
    (M = size/8: 4 for 32x32, 6 for 48x48)."""

    def __init__(self, z_dim: int = 128, img_size: int = 32, channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.z_dim, self.bottom = z_dim, _bottom(img_size)
        c = [_c(n, width) for n in (512, 256, 128, 64)]
        self.c0 = c[0]
        self.dense = nn.Linear(z_dim, self.bottom * self.bottom * c[0])
        layers: list[nn.Module] = [nn.BatchNorm2d(c[0]), nn.ReLU()]
        for cin, cout in zip(c[:-1], c[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.Conv2d(c[-1], channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.dense(z).view(z.shape[0], self.c0, self.bottom, self.bottom))


class CNNDiscriminator(nn.Module):
    """conv3x3 64, conv4x4 s2 64, conv3x3 128, conv4x4 s2 128, conv3x3 256, conv4x4 s2 256, conv3x3 512
    (LeakyReLU 0.1 after each) -> dense out_dim. As in the paper's table; the authors' code widens the stride-2
    convs (64,128,128,256,256,512,512)."""

    def __init__(self, img_size: int = 32, channels: int = 3, width: float = 1.0, out_dim: int = 1) -> None:
        super().__init__()
        bottom = _bottom(img_size)
        spec = [(64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2), (512, 3, 1)]
        layers, cin = [], channels
        for cout, k, s in spec:
            cout = _c(cout, width)
            layers += [nn.Conv2d(cin, cout, k, s, 1), nn.LeakyReLU(0.1)]
            cin = cout
        self.net = nn.Sequential(*layers)
        self.dense = nn.Linear(bottom * bottom * cin, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.net(x).flatten(1))


# ---------------------------------------------------------------------------------------------------------------
# ResNet (paper Tables 4-5; the authors' sngan_projection code for the block details)


class GBlock(nn.Module):
    """BN-ReLU-upsample-conv3x3-BN-ReLU-conv3x3, shortcut upsample-conv1x1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.b1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.b2, self.c2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.sc = nn.Conv2d(cin, cout, 1)
        for conv, gain in ((self.c1, math.sqrt(2)), (self.c2, math.sqrt(2)), (self.sc, 1.0)):
            nn.init.xavier_uniform_(conv.weight, gain)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.b1(x)), scale_factor=2)
        h = self.c2(F.relu(self.b2(self.c1(h))))
        return h + self.sc(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """ReLU-conv3x3-ReLU-conv3x3[-avgpool]; shortcut conv1x1[-avgpool] when the shape changes. `optimized`: the
    first block, conv3x3-ReLU-conv3x3-avgpool with shortcut avgpool-conv1x1 (no ReLU on the input image)."""

    def __init__(self, cin: int, cout: int, down: bool, optimized: bool = False) -> None:
        super().__init__()
        self.down, self.optimized = down, optimized
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.sc = nn.Conv2d(cin, cout, 1) if (cin != cout or down or optimized) else None
        for conv, gain in ((self.c1, math.sqrt(2)), (self.c2, math.sqrt(2)), (self.sc, 1.0)):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight, gain)
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x if self.optimized else F.relu(x))
        h = self.c2(F.relu(h))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.sc is None:
            return h + x
        if self.optimized:
            return h + self.sc(F.avg_pool2d(x, 2))
        s = self.sc(x)
        return h + (F.avg_pool2d(s, 2) if self.down else s)


class ResNetGenerator(nn.Module):
    """z -> dense MxMxc0 -> 3 x GBlock (up) -> BN ReLU conv3x3 C, tanh. 32x32: c = 256,256,256,256, M = 4;
    48x48 (STL-10): c = 512,256,128,64, M = 6."""

    def __init__(self, z_dim: int = 128, img_size: int = 32, channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.z_dim, self.bottom = z_dim, _bottom(img_size)
        c = [_c(n, width) for n in ((512, 256, 128, 64) if img_size == 48 else (256, 256, 256, 256))]
        self.c0 = c[0]
        self.dense = nn.Linear(z_dim, self.bottom * self.bottom * c[0])
        self.blocks = nn.Sequential(*[GBlock(a, b) for a, b in zip(c[:-1], c[1:])])
        self.bn = nn.BatchNorm2d(c[-1])
        self.out = nn.Conv2d(c[-1], channels, 3, 1, 1)
        nn.init.xavier_uniform_(self.dense.weight)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.dense(z).view(z.shape[0], self.c0, self.bottom, self.bottom))
        return torch.tanh(self.out(F.relu(self.bn(h))))


class ResNetDiscriminator(nn.Module):
    """32x32: optimized DBlock 128 (down), DBlock 128 (down), DBlock 128, DBlock 128. 48x48: optimized 64 (down),
    128 (down), 256 (down), 512 (down), 1024. Then ReLU, global sum pool, dense out_dim. No BN."""

    def __init__(self, img_size: int = 32, channels: int = 3, width: float = 1.0, out_dim: int = 1) -> None:
        super().__init__()
        _bottom(img_size)
        if img_size == 48:
            spec = [(64, True), (128, True), (256, True), (512, True), (1024, False)]
        else:
            spec = [(128, True), (128, True), (128, False), (128, False)]
        blocks, cin = [], channels
        for i, (cout, down) in enumerate(spec):
            cout = _c(cout, width)
            blocks.append(DBlock(cin, cout, down, optimized=(i == 0)))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.dense = nn.Linear(cin, out_dim)
        nn.init.xavier_uniform_(self.dense.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(F.relu(self.blocks(x)).sum(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------------------


def build_models(
    arch: str,
    data_shape: tuple[int, ...],
    *,
    z_dim: int,
    width: float = 1.0,
    out_dim: int = 1,
    sn: str = "none",
    n_power_iterations: int = 1,
    d_scale: float = 1.0,
) -> tuple[nn.Module, nn.Module]:
    """(G, D) for data of shape (d,) (points) or (C, H, W) (images in [-1, 1]); spectral norm `sn` on D only.
    `d_scale` multiplies the MLP discriminator's output (see MLPDiscriminator); the CNN/ResNet take only 1."""
    if arch != "mlp" and d_scale != 1.0:
        raise ValueError(f"--d-scale is implemented for the mlp discriminator only, not --arch {arch}")
    if arch == "mlp":
        image = len(data_shape) == 3
        hidden = _c(512 if image else 128, width)
        G = MLPGenerator(z_dim, data_shape, hidden=hidden, tanh=image)
        D = MLPDiscriminator(data_shape, hidden=hidden, out_dim=out_dim, out_scale=d_scale)
    elif arch in ("cnn", "resnet"):
        if len(data_shape) != 3:
            raise ValueError(f"--arch {arch} needs image data; use --arch mlp for 2-D points")
        c, h, w = data_shape
        if h != w:
            raise ValueError(f"square images only, got {h}x{w}")
        Gc, Dc = (CNNGenerator, CNNDiscriminator) if arch == "cnn" else (ResNetGenerator, ResNetDiscriminator)
        G = Gc(z_dim=z_dim, img_size=h, channels=c, width=width)
        D = Dc(img_size=h, channels=c, width=width, out_dim=out_dim)
    else:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    apply_spectral_norm(D, sn, n_power_iterations)
    return G, D
