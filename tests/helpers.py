"""Shared test helpers: seeded twin modules (torch's spectral norm and sn_ext's, equal weights and buffers),
relative errors, the tolerance table, and the module cases the parity tests run over.

The installed torch is the oracle. Every comparison is normwise: ``max|ours - ref| / max|ref|``.
"""

import copy
import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as torch_param
from torch.nn.utils import spectral_norm as torch_legacy_sn

import sn_ext

# Largest allowed relative error against torch (or a float64 oracle), keyed by dtype: about 8 units in the last
# place for float32 (2^-23 = 1.2e-7), 4 for float16 (2^-11 = 4.9e-4) and bfloat16 (2^-8 = 3.9e-3).
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|, in float64; shapes must match, NaNs count as an infinite error."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    # complex tensors keep their imaginary part (.double() would drop it)
    a, b = (t.detach().to(torch.complex128 if t.is_complex() else torch.float64) for t in (ours, ref))
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    if diff != diff:  # NaN
        return float("inf")
    scale = max(b.abs().max().item(), 1e-300)
    return diff / scale


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def tol_for(dtype: torch.dtype) -> float:
    return TOL[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Module cases


class Scale(nn.Module):
    """A module whose only parameter is 1-D: y = x * scale."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _transposed_linear(in_features: int, out_features: int) -> nn.Linear:
    """A Linear whose weight Parameter is a transposed (non-contiguous) view."""
    lin = nn.Linear(in_features, out_features)
    lin.weight = nn.Parameter(torch.randn(in_features, out_features).t())
    assert not lin.weight.is_contiguous()
    return lin


def _float_input(*shape: int) -> Callable[[torch.dtype, torch.Generator], torch.Tensor]:
    return lambda dtype, gen: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _index_input(high: int, *shape: int) -> Callable[[torch.dtype, torch.Generator], torch.Tensor]:
    return lambda dtype, gen: torch.randint(0, high, shape, generator=gen)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    make_input: Callable[[torch.dtype, torch.Generator], torch.Tensor]
    kwargs: dict = dataclasses.field(default_factory=dict)  # spectral_norm keyword arguments
    name: str = "weight"
    legacy_ok: bool = True  # whether torch's legacy spectral_norm accepts these arguments

    def __repr__(self) -> str:
        return self.id


CASES = [
    Case("linear", lambda: nn.Linear(9, 6), _float_input(4, 9)),
    Case("conv1d", lambda: nn.Conv1d(3, 5, 3), _float_input(2, 3, 8)),
    Case("conv2d", lambda: nn.Conv2d(3, 4, 3), _float_input(2, 3, 6, 7)),
    Case("conv3d", lambda: nn.Conv3d(2, 3, 2), _float_input(1, 2, 4, 3, 5)),
    Case("conv_transpose1d", lambda: nn.ConvTranspose1d(4, 3, 3), _float_input(2, 4, 5)),
    Case("conv_transpose2d", lambda: nn.ConvTranspose2d(5, 3, 3), _float_input(2, 5, 4, 3)),
    Case("embedding", lambda: nn.Embedding(11, 6), _index_input(11, 3, 4)),
    Case("grouped_conv2d", lambda: nn.Conv2d(4, 6, 3, groups=2), _float_input(2, 4, 5, 5)),
    Case("bias_1d", lambda: nn.Linear(5, 7), _float_input(3, 5), name="bias"),
    Case("param_1d", lambda: Scale(9), _float_input(3, 9), name="scale"),
    Case("linear_1xN", lambda: nn.Linear(17, 1), _float_input(3, 17)),
    Case("linear_Nx1", lambda: nn.Linear(1, 13), _float_input(3, 1)),
    Case("linear_primes", lambda: nn.Linear(13, 7), _float_input(5, 13)),
    Case("conv2d_primes", lambda: nn.Conv2d(5, 11, 3), _float_input(1, 5, 7, 5)),
    Case("linear_transposed_weight", lambda: _transposed_linear(7, 5), _float_input(3, 7)),
    Case(
        "conv2d_channels_last",
        lambda: nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last),
        _float_input(2, 3, 5, 6),
    ),
    Case(
        "conv_transpose2d_channels_last",
        lambda: nn.ConvTranspose2d(3, 5, 2).to(memory_format=torch.channels_last),
        _float_input(2, 3, 4, 3),
    ),
    Case("linear_n3", lambda: nn.Linear(8, 5), _float_input(3, 8), {"n_power_iterations": 3}),
    Case("conv2d_n3_dim1", lambda: nn.Conv2d(3, 4, 3), _float_input(2, 3, 5, 5), {"n_power_iterations": 3, "dim": 1}),
    Case("conv2d_dim2", lambda: nn.Conv2d(3, 4, 3, padding=1), _float_input(1, 3, 4, 4), {"dim": 2}),
    # torch's legacy spectral_norm does not wrap a negative dim (its permute fails): parametrization only.
    Case("conv2d_dim_neg1", lambda: nn.Conv2d(3, 4, (2, 3)), _float_input(1, 3, 4, 5), {"dim": -1}, legacy_ok=False),
    Case("linear_dim_neg2", lambda: nn.Linear(6, 5), _float_input(2, 6), {"dim": -2}, legacy_ok=False),
    Case("conv_transpose1d_dim0", lambda: nn.ConvTranspose1d(4, 3, 3), _float_input(2, 4, 5), {"dim": 0}),
]

LEGACY_CASES = [c for c in CASES if c.legacy_ok]

DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------------------------------------------------------
# Twin construction


def _base_module(case: Case, dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return case.make().to(dtype)  # keeps each weight's strides (transposed, channels_last)


def sn_state(module: nn.Module, name: str = "weight", legacy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The (u, v) buffers of either spectral norm on module.<name>."""
    if legacy:
        return getattr(module, name + "_u"), getattr(module, name + "_v")
    sn = module.parametrizations[name][0]
    return sn._u, sn._v


def original(module: nn.Module, name: str = "weight", legacy: bool = False) -> torch.Tensor:
    """The unnormalized parameter."""
    return getattr(module, name + "_orig") if legacy else getattr(module.parametrizations, name).original


def has_vectors(module: nn.Module, name: str = "weight", legacy: bool = False) -> bool:
    if legacy:
        return hasattr(module, name + "_u")
    return hasattr(module.parametrizations[name][0], "_u")


def copy_vectors(dst: nn.Module, src: nn.Module, name: str = "weight", legacy: bool = False) -> None:
    """Makes dst's u, v buffers equal to src's, in place (so both start equal, as the design notes ask)."""
    if not has_vectors(src, name, legacy):
        return
    with torch.no_grad():
        for d, s in zip(sn_state(dst, name, legacy), sn_state(src, name, legacy)):
            d.copy_(s)


def make_pair(
    case: Case,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    legacy: bool = False,
    copy_buffers: bool = True,
    train: bool = True,
    **override,
) -> tuple[nn.Module, nn.Module]:
    """(torch module, sn_ext module): equal weights, spectral norm registered after the same seed.

    With copy_buffers, sn_ext's u, v are then set to torch's (they agree only to rounding after the warm-up
    iterations, since sn_ext accumulates differently); test_parity checks that agreement separately.
    """
    base = _base_module(case, dtype, seed)
    base.train(train)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    kwargs = {**case.kwargs, **override}
    if legacy:
        kwargs_t = dict(kwargs)
        if "dim" in kwargs_t and kwargs_t["dim"] < 0:  # torch's legacy version needs dim >= 0
            kwargs_t["dim"] += original_ndim(base, case.name)
        torch.manual_seed(seed + 1)
        torch_legacy_sn(theirs, case.name, **kwargs_t)
        torch.manual_seed(seed + 1)
        sn_ext.legacy.spectral_norm(ours, case.name, **kwargs)
    else:
        torch.manual_seed(seed + 1)
        torch_param.spectral_norm(theirs, case.name, **kwargs)
        torch.manual_seed(seed + 1)
        sn_ext.spectral_norm(ours, case.name, **kwargs)
    if copy_buffers:
        copy_vectors(ours, theirs, case.name, legacy)
    return theirs, ours


def original_ndim(module: nn.Module, name: str) -> int:
    return getattr(module, name).ndim


def make_input(case: Case, dtype: torch.dtype, seed: int = 100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return case.make_input(dtype, gen)


def perturb_(modules: list[nn.Module], name: str, legacy: bool, seed: int, scale: float = 0.05) -> None:
    """Adds the same random step to each module's unnormalized parameter (as an optimizer step would)."""
    ref = original(modules[0], name, legacy)
    gen = torch.Generator().manual_seed(seed)
    step = (torch.randn(ref.shape, generator=gen, dtype=torch.float64) * scale).to(ref.dtype)
    with torch.no_grad():
        for m in modules:
            original(m, name, legacy).add_(step)


def numpy_matrix(weight: torch.Tensor, dim: int):
    """torch's matrix view of a weight, rebuilt independently of sn_ext (numpy, float64)."""
    import numpy as np

    w = weight.detach().double().numpy()
    if w.ndim == 1:
        return w.reshape(-1, 1)
    w = np.moveaxis(w, dim % w.ndim, 0)
    return w.reshape(w.shape[0], -1)


def numpy_power_iteration(mat, u, v, n: int, eps: float = 1e-12, v_first: bool = False):
    """n rounds of power iteration in float64 numpy; returns (sigma = u^T W v, u, v)."""
    import numpy as np

    def normalize(x):
        return x / max(np.linalg.norm(x), eps)

    for _ in range(n):
        if v_first:
            v = normalize(mat.T @ u)
            u = normalize(mat @ v)
        else:
            u = normalize(mat @ v)
            v = normalize(mat.T @ u)
    return float(u @ mat @ v), u, v


def unit(n: int, dtype: torch.dtype = torch.float32, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """A random unit vector (never zero), normalized in float64 on `device`."""
    return F.normalize(randn(n, dtype=torch.float64, seed=seed, device=device), dim=0).to(dtype)


def randn(
    *shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Seeded float64 normal values (drawn on the CPU, the same on every device), then moved to device and dtype."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# Every spectral norm a checkpoint can come from or go to, by name; the legacy (forward pre-hook) ones.
APPLY = {
    "torch": torch_param.spectral_norm,
    "torch_legacy": torch_legacy_sn,
    "sn_ext": sn_ext.spectral_norm,
    "sn_ext_legacy": sn_ext.legacy.spectral_norm,
}
LEGACY = {"torch_legacy", "sn_ext_legacy"}


def small_backend_net(
    register: Callable[..., nn.Module], backend: str | None, device: str, dtype: torch.dtype
) -> nn.Module:
    """Conv2d, ConvTranspose2d (dim=1) and Linear, each with `register(layer, backend=backend)`, seeded."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)
    ).to(device=device, dtype=dtype)
    torch.manual_seed(1)
    for layer in net:
        if hasattr(layer, "weight"):
            register(layer, backend=backend)
    return net


def apply_to_layers(net: nn.Module, apply: Callable[[nn.Module], nn.Module], seed: int) -> nn.Module:
    """Applies a spectral_norm function to every layer of net with a >= 2-D weight, after seeding."""
    torch.manual_seed(seed)
    for layer in list(net.modules()):
        if isinstance(getattr(layer, "weight", None), nn.Parameter) and layer.weight.ndim >= 2:
            apply(layer)
    return net


def make_net_pair(
    make_net: Callable[[], nn.Module], dtype: torch.dtype = torch.float64, seed: int = 0, train: bool = True
) -> tuple[nn.Module, nn.Module]:
    """(torch net, sn_ext net): spectral norm on every layer with a >= 2-D weight, equal weights and buffers."""
    torch.manual_seed(seed)
    base = make_net().to(dtype).train(train)
    theirs = apply_to_layers(copy.deepcopy(base), torch_param.spectral_norm, seed + 1)
    ours = apply_to_layers(copy.deepcopy(base), sn_ext.spectral_norm, seed + 1)
    for lt, lo in zip(theirs.modules(), ours.modules()):
        if torch.nn.utils.parametrize.is_parametrized(lt, "weight"):
            copy_vectors(lo, lt)
    return theirs, ours


def linear_map_matrix(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple) -> torch.Tensor:
    """The dense matrix of the linear map `fn` on inputs of `in_shape` (batch of 1 first), built column by column
    from the basis inputs (all of them in one batch): column i = fn(e_i), flattened."""
    n = math.prod(in_shape[1:])
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape[1:])
    return fn(basis).reshape(n, -1).T
