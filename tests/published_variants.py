"""Published implementations of the spectral-norm variants, written here from their papers' and repositories'
definitions (../shared/reference/sn_variants.md), so that the tests need none of the packages: the oracles of
tests/test_variants.py.

- SpectralNormFC / spectral_norm_fc: DUE's (y0ast/DUE due/layers/spectral_norm_fc.py; i-ResNet's, DDU's and
  lightning-uq-box's are the same class): torch's legacy hook with compute_weight giving W / max(1, sigma / coeff),
  the gradient through sigma, and the log buffer `<name>_sigma`.
- SNGPSpectralNorm: edward2's SpectralNormalization (JAX; SNGP): v-first rounds, W / stop_gradient(max(sigma / c, 1)).
- AppleSNLinear: Apple's sigma-reparam (apple/ml-sigma-reparam vision/layers.py SNLinear): gamma (its Parameter
  `sigma`) and u from an SVD, one round per forward also in eval (not written), gamma W / sigma.
- AmagoSigmaReparam: AMAGO's SigmaReparam (amago/nets/transformer.py): gamma = 1, u-first rounds in train mode only.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm as TorchLegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook


class SpectralNormFC(TorchLegacySpectralNorm):
    """DUE's bounded spectral norm (the class name is theirs: sn_ext.convert_spectral_norm recognises it)."""

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
        weight = getattr(module, self.name + "_orig")
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        weight_mat = self.reshape_weight_to_matrix(weight)
        if do_power_iteration:
            with torch.no_grad():
                for _ in range(self.n_power_iterations):
                    v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=self.eps, out=v)
                    u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps, out=u)
                if self.n_power_iterations > 0:
                    u = u.clone(memory_format=torch.contiguous_format)
                    v = v.clone(memory_format=torch.contiguous_format)
        sigma = torch.dot(u, torch.mv(weight_mat, v))
        factor = torch.max(torch.ones(1).to(weight.device), sigma / self.coeff)  # soft: only above coeff
        weight = weight / factor
        getattr(module, self.name + "_sigma").copy_(sigma.detach())  # for logging
        return weight

    def __call__(self, module: nn.Module, inputs) -> None:
        setattr(module, self.name, self.compute_weight(module, do_power_iteration=module.training))

    @staticmethod
    def apply(module, coeff, name, n_power_iterations, dim, eps):
        fn = SpectralNormFC(name, n_power_iterations, dim, eps)
        fn.coeff = coeff
        weight = module._parameters[name]
        with torch.no_grad():
            h, w = fn.reshape_weight_to_matrix(weight).size()
            u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
            v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
        delattr(module, fn.name)
        module.register_parameter(fn.name + "_orig", weight)
        setattr(module, fn.name, weight.data)
        module.register_buffer(fn.name + "_u", u)
        module.register_buffer(fn.name + "_v", v)
        module.register_buffer(fn.name + "_sigma", torch.ones(1).to(weight.device))
        module.register_forward_pre_hook(fn)
        module._register_state_dict_hook(SpectralNormStateDictHook(fn))
        module._register_load_state_dict_pre_hook(SpectralNormLoadStateDictPreHook(fn))
        return fn


def spectral_norm_fc(module, coeff, n_power_iterations=1, name="weight", eps=1e-12, dim=None):
    """DUE's function (DDU's argument order too)."""
    if dim is None:
        conv_transpose = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, conv_transpose) else 0
    SpectralNormFC.apply(module, coeff, name, n_power_iterations, dim, eps)
    return module


class SNGPSpectralNorm(nn.Module):
    """edward2's SpectralNormalization around a layer with a (out, in) matrix `weight`, in torch: kernel w = W^T,
    v = N(u w^T), u = N(v w) (one round per training call), sigma = v w u^T, W / stop_gradient(max(sigma / c, 1));
    u, v start from given vectors (edward2 draws unnormalized normal(0.05) ones)."""

    def __init__(self, layer: nn.Linear, norm_multiplier: float, u: torch.Tensor, v: torch.Tensor, iteration: int = 1):
        super().__init__()
        self.layer, self.norm_multiplier, self.iteration = layer, norm_multiplier, iteration
        self.register_buffer("u", u.clone())
        self.register_buffer("v", v.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight.T  # (in, out), the kernel's layout
        u, v = self.u, self.v
        if self.training:
            with torch.no_grad():
                for _ in range(self.iteration):
                    v = F.normalize(u @ w.T, dim=0)
                    u = F.normalize(v @ w, dim=0)
                self.u.copy_(u)
                self.v.copy_(v)
        sigma = (v @ w @ u).detach()
        ratio = sigma / self.norm_multiplier
        weight = self.layer.weight / torch.clamp_min(ratio, 1.0)
        return F.linear(x, weight, self.layer.bias)


class AppleSpectralNormedWeight(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        with torch.no_grad():
            _, s, vh = torch.linalg.svd(self.weight, full_matrices=False)
        self.register_buffer("u", vh[0])
        self.register_buffer("spectral_norm", s[0] * torch.ones(1))

    def get_sigma(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            v = F.normalize(weight.mv(u), dim=0)
            u = F.normalize(weight.T.mv(v), dim=0)
            if self.training:
                self.u.data.copy_(u)
        return torch.einsum("c,cd,d->", v, weight, u)

    def forward(self) -> torch.Tensor:
        sigma = self.get_sigma(u=self.u, weight=self.weight)
        if self.training:
            self.spectral_norm.data.copy_(sigma)
        return self.weight / sigma


class AppleSNLinear(nn.Linear):
    """Apple's SNLinear (its stats_only=False path)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_multiplier: float = 1.0):
        super().__init__(in_features, out_features, bias=bias)
        nn.init.trunc_normal_(self.weight, std=0.02 * init_multiplier)
        self.spectral_normed_weight = AppleSpectralNormedWeight(self.weight)
        sn_init = self.spectral_normed_weight.spectral_norm
        self.sigma = nn.Parameter(torch.zeros_like(sn_init).copy_(sn_init), requires_grad=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.spectral_normed_weight() * self.sigma, self.bias)


class AmagoSigmaReparam(nn.Module):
    """AMAGO's SigmaReparam: u = N(W v), v = N(W^T u) in train mode (the buffers written), sigma = u^T W v with u, v
    detached, gamma / sigma * W; gamma starts at 1. u, v start from given vectors (AMAGO's come from SVDs)."""

    def __init__(self, linear: nn.Linear, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.W, self.b = linear.weight, linear.bias
        self.register_buffer("u", u.clone())
        self.register_buffer("v", v.clone())
        self.gamma = nn.Parameter(torch.ones(1, dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                u = F.normalize(self.W @ self.v, dim=0)
                v = F.normalize(self.W.T @ u, dim=0)
                self.u.data, self.v.data = u, v
        sigma = torch.einsum("d,dc,c->", self.u, self.W, self.v)
        return F.linear(x, self.gamma / sigma * self.W, self.b)
