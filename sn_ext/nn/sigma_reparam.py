"""sn_ext.sigma_reparam: sigma-reparam (Zhai et al. 2023), W_hat = gamma W / sigma(W) with a learned scalar gamma, on
sn_ext's fused ops (docs/variants.md).

    layer = sn_ext.sigma_reparam(nn.Linear(768, 768))      # gamma starts at sigma(W): W_hat = W at the start
    model = sn_ext.sigma_reparam_model(model)               # every Linear and Conv1d/2d/3d of a model

The parametrization is sn_ext's spectral norm (nn/spectral_norm.py: the same power iteration, state and errors) with
gamma as its Parameter `gain`, multiplied in the forward's division pass, its gradient from the backward's pass. The
name is not `gamma`: Hugging Face transformers' from_pretrained renames every state-dict key that contains "gamma" to
"weight" (huggingface/transformers#29554), which would lose it.

gamma_init="sigma" starts gamma at W's largest singular value with u and v its singular vectors, so that the first
forward gives W_hat = W, as Apple's reference code does with an SVD. No SVD here: Golub-Kahan-Lanczos
bidiagonalization (top_singular_triplet), tens of products with W and W^T at registration, converges where power
iteration crawls (the top singular values of a randomly initialized layer lie close together: 160 power-iteration
rounds left sigma 4e-4 low on a 768 x 768 layer) and costs a fraction of an SVD on large layers (docs/variants.md).
"""

import math
import numbers
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import sharded
from .._matrix import to_matrix
from .spectral_norm import (
    SpectralNorm,
    checked_weight,
    default_dim,
    has_legacy_spectral_norm,
    has_parametrization_spectral_norm,
    register,
)

# top_singular_triplet stops when sigma changes by at most LANCZOS_TOL (relative) on two steps in a row, or after
# LANCZOS_MAX_STEPS steps.
LANCZOS_TOL = 1e-12
LANCZOS_MAX_STEPS = 300

DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SigmaReparam(SpectralNorm):
    """The parametrization W -> gain * W / sigma(W) (`gain`: the paper's gamma, a Parameter of this module). As
    SpectralNorm otherwise: torch's power iteration and state, u and v updated in train mode; with
    `eval_iteration=True` eval mode runs the rounds too, on copies (the buffers stay), as Apple's reference code."""

    def __init__(
        self,
        weight: Tensor,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
        backend: str | None = None,
        *,
        gamma_init: str | float = "sigma",
        sigma_grad: bool = True,
        eval_iteration: bool = False,
    ) -> None:
        check_sigma_reparam_arguments(weight, gamma_init, eval_iteration)
        super().__init__(weight, n_power_iterations, dim, eps, backend, sigma_grad=sigma_grad)
        self.eval_iteration = eval_iteration
        with torch.no_grad():
            start = self._start_at_top_singular_pair(weight) if gamma_init == "sigma" else float(gamma_init)
        device = weight.to_local().device if sharded.is_dtensor(weight) else weight.device
        self.gain = nn.Parameter(torch.tensor(start, dtype=weight.dtype, device=device))

    def _start_at_top_singular_pair(self, weight: Tensor) -> float:
        """W's largest singular value, with u and v set to its singular vectors (a 1-D weight: its norm)."""
        if sharded.is_dtensor(weight):  # once, at registration: the whole weight on every rank
            weight = weight.full_tensor()
        if weight.ndim == 1:
            return float(torch.linalg.vector_norm(weight.double()))
        sigma, u, v = top_singular_triplet(to_matrix(weight, self.dim).double(), self._v.double())
        if sigma > 0:  # a zero weight keeps the random vectors (and W_hat is NaN, as W / sigma is)
            self._u.copy_(u)
            self._v.copy_(v)
        return sigma

    def extra_repr(self) -> str:
        return super().extra_repr() + (", eval_iteration=True" if self.eval_iteration else "")


def top_singular_triplet(
    matrix: Tensor, start: Tensor, tol: float = LANCZOS_TOL, max_steps: int = LANCZOS_MAX_STEPS
) -> tuple[float, Tensor, Tensor]:
    """(sigma, u, v): the largest singular value of `matrix` and its unit singular vectors (matrix v = sigma u), by
    Golub-Kahan-Lanczos bidiagonalization from `start` (v's direction) with full reorthogonalization. After k steps
    A V_k = U_k B_k and A^T U_k = V_{k+1} C_k, C_k the k x (k + 1) upper bidiagonal (B_k and beta_k e_k): the top
    singular triplet (sigma, p, q) of C_k gives u = U_k p, v = V_{k+1} q with A^T u = sigma v exactly, and sigma
    grows to A's largest singular value, fast (Chebyshev-like) even where the top values lie close together. Stops
    when sigma changed by at most `tol` (relative) on two steps in a row, or when the Krylov space is exhausted.
    Computed in the matrix's dtype (float64 here) on its device; the small eigenproblems on the CPU."""
    rows, cols = matrix.shape
    steps = min(max_steps, rows, cols)
    us, vs = matrix.new_zeros(steps, rows), matrix.new_zeros(steps + 1, cols)
    alphas, betas = [], []
    v = start / torch.linalg.vector_norm(start)
    sigma, settled = 0.0, 0
    for j in range(steps):
        vs[j] = v
        w = matrix @ v
        if j:
            w = w - betas[-1] * us[j - 1]
            w = w - us[:j].T @ (us[:j] @ w)
        alpha = float(torch.linalg.vector_norm(w))
        if alpha == 0.0 or not math.isfinite(alpha):
            break
        us[j] = w / alpha
        z = matrix.T @ us[j] - alpha * v
        z = z - vs[: j + 1].T @ (vs[: j + 1] @ z)
        beta = float(torch.linalg.vector_norm(z))
        alphas.append(alpha)
        betas.append(beta)
        if beta > 0.0:
            v = z / beta
            vs[j + 1] = v
        bidiagonal = torch.zeros(j + 1, j + 2, dtype=torch.float64)
        bidiagonal[range(j + 1), range(j + 1)] = torch.tensor(alphas, dtype=torch.float64)
        bidiagonal[range(j + 1), range(1, j + 2)] = torch.tensor(betas, dtype=torch.float64)
        # C C^T's top eigenpair (sigma^2, p), then q = C^T p / sigma: an SVD with vectors is 100x slower here.
        squares, ps = torch.linalg.eigh(bidiagonal @ bidiagonal.T)
        top = math.sqrt(max(float(squares[-1]), 0.0))
        settled = settled + 1 if top - sigma <= tol * top else 0
        sigma = top
        if settled >= 2 or beta == 0.0 or j == steps - 1:
            p = ps[:, -1]
            u = us[: j + 1].T @ p.to(matrix)
            v = vs[: j + 2].T @ (bidiagonal.T @ p).to(matrix)
            return sigma, u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)
    return 0.0, matrix.new_zeros(rows), matrix.new_zeros(cols)


def check_sigma_reparam_arguments(weight: Tensor, gamma_init, eval_iteration) -> None:
    if gamma_init != "sigma" and not (
        isinstance(gamma_init, numbers.Real) and not isinstance(gamma_init, bool) and math.isfinite(gamma_init)
    ):
        raise ValueError(f'sigma_reparam: gamma_init must be "sigma" or a finite number, got gamma_init={gamma_init!r}')
    if not isinstance(eval_iteration, bool):
        raise TypeError(f"sigma_reparam: eval_iteration must be a bool, got eval_iteration={eval_iteration!r}")
    if weight.is_complex():
        raise TypeError(f"sigma_reparam: the weight must be real, got {weight.dtype}")


def sigma_reparam(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    backend: str | None = None,
    *,
    gamma_init: str | float = "sigma",
    sigma_grad: bool = True,
    eval_iteration: bool = False,
) -> nn.Module:
    """sigma-reparam on `module.<name>`: W_hat = gamma W / sigma(W), gamma a learned scalar, sigma as
    sn_ext.spectral_norm estimates it (same arguments: torch's power iteration, 15 rounds at registration, n per
    read of the weight in train mode, none in eval). Returns the module.

    - `gamma_init`: "sigma" starts gamma at W's largest singular value and u, v at its singular vectors, so that
      W_hat = W at the start (Apple's reference code; no SVD: see the module docstring); a number starts it there
      (1.0: Apple's speech code, AMAGO, Crowson's SReparam).
    - `sigma_grad=False`: no gradient through sigma (Crowson's SReparam, broccoli).
    - `eval_iteration=True`: eval mode runs the rounds too, from the buffers, without writing them (Apple's).

    State: torch's spectral-norm keys (``parametrizations.<name>.original``, ``.0._u``, ``.0._v``) and
    ``parametrizations.<name>.0.gain`` (gamma; see the module docstring for the name).
    """
    weight = checked_weight(module, name, "sigma_reparam")
    if dim is None:
        dim = default_dim(module)
    stacked = parametrize.is_parametrized(module, name)
    norm = SigmaReparam(
        weight,
        n_power_iterations,
        dim,
        eps,
        backend,
        gamma_init=gamma_init,
        sigma_grad=sigma_grad,
        eval_iteration=eval_iteration,
    )
    register(module, name, weight, norm, stacked)
    return module


def sigma_reparam_model(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    layers: Iterable[nn.Module] | None = None,
    name: str = "weight",
    **options,
) -> nn.Module:
    """sigma_reparam on `name` of every submodule of `model` that is an instance of `types` (default: Linear and
    Conv1d/2d/3d, the layers Apple's convert_to_sn converts, plus Conv1d/3d), or of each module of `layers`, with
    the same `options` (n_power_iterations, eps, dim, backend, gamma_init, sigma_grad, eval_iteration). Every layer
    is checked first: one that cannot take it raises, naming it, before anything changes. Returns `model`."""
    chosen = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, types)]
    qualnames = {id(module): qualname for qualname, module in model.named_modules()}
    failures = []
    for layer in chosen:
        weight = getattr(layer, name, None)
        where = f"'{qualnames.get(id(layer), '?')}' ({parametrize.type_before_parametrizations(layer).__name__})"
        if has_legacy_spectral_norm(layer, name) or has_parametrization_spectral_norm(layer, name):
            failures.append(f"{where}: '{name}' already has a spectral norm")
        elif not isinstance(weight, Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
            failures.append(f"{where}: no initialized tensor '{name}'")
    if failures:
        raise ValueError(
            f"sigma_reparam_model: {len(failures)} layer(s) cannot take sigma-reparam, so nothing was changed (leave "
            f"them out with layers=[...]):\n  " + "\n  ".join(failures)
        )
    for layer in chosen:
        sigma_reparam(layer, name, **options)
    return model
