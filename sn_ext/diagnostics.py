"""Diagnostics of a model's spectral norms: the sigma each one uses, how far that one-step estimate is from the
weight's exact largest singular value, and each layer's operator norm as a map on its inputs.

    sn_ext.sigmas(D)                            # {"conv1.weight": tensor(1.02), ...}: free for sn_ext's norms
    print(sn_ext.spectral_report(D, x))         # a table: sigma, exact sigma, gap, operator norm; Lipschitz bound

Both work on sn_ext's spectral norms (parametrization and legacy hook, per layer or grouped) and on torch's
(``torch.nn.utils.parametrizations.spectral_norm`` and ``torch.nn.utils.spectral_norm``):

- sn_ext's keep the sigma of their last computation (a plain attribute set in the forward: no extra op, launch or
  host synchronisation; not in the state dict), so ``sigmas`` reads it. torch's keep none: ``sigmas`` computes
  ``u^T W v`` from their u and v buffers, which is the sigma torch's last forward used when W has not changed
  since. So does an sn_ext spectral norm that has not computed one yet (a legacy hook before its first forward).
- The weight's matrix view is torch's (``W.permute(dim, ...).flatten(1)``: sn_ext._matrix.to_matrix); a 1-D
  weight's "sigma" is its norm, as the F.normalize that both libraries apply to it.
- A spectral norm stacked on another parametrization of the same tensor (not the first in its list) is left out.

The reshaped kernel's sigma is not a convolution's operator norm: the convolution, as a linear map on inputs of a
given shape, can stretch them by up to sqrt(kernel size) times more (Tsuzuku et al. 2018, Sedghi et al. 2019), or
less, with strides. ``spectral_report`` measures it by power iteration through the convolution and its transpose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import Tensor, nn

from ._matrix import to_matrix
from .nn.conv_operator import ConvLayer, ConvOperator
from .nn.conv_parametrization import ConvSpectralNorm, operator_sigma
from .nn.registered import spectral_norms

# The operator-norm power iteration stops when its relative residual is below TOL, or after MAX_ITERS rounds
# (operator_norm); report.rows say how many rounds ran and whether it converged.
TOL = 1e-3
MAX_ITERS = 1000

_MISSING = object()
_MATRIX_LAYERS = (nn.Linear, nn.Embedding)  # operator norm = ||W_sn||_2 (an Embedding: on one-hot inputs)


@dataclasses.dataclass
class _Norm:
    """One spectral norm of a model: where it is and what it normalizes."""

    name: str  # "<module path>.<tensor name>"
    module: nn.Module
    tensor_name: str
    norm: object  # the parametrization (sn_ext's or torch's) or the legacy hook (sn_ext's or torch's)
    weight: Tensor  # the unnormalized weight
    u: Tensor | None
    v: Tensor | None
    dim: int  # the matrix view's (a ConvSpectralNorm has none: 0)


def _norms(model: nn.Module) -> list[_Norm]:
    found = []
    for entry in spectral_norms(model):
        module, tensor_name, norm = entry.module, entry.tensor_name, entry.norm
        name = f"{entry.qualname}.{tensor_name}" if entry.qualname else tensor_name
        if entry.is_hook:
            weight, u, v = (getattr(module, tensor_name + suffix) for suffix in ("_orig", "_u", "_v"))
        elif entry.key == 0:  # the first parametrization of its tensor (a later one's input needs a forward)
            weight = module.parametrizations[tensor_name].original
            u, v = getattr(norm, "_u", None), getattr(norm, "_v", None)
        else:
            continue
        found.append(_Norm(name, module, tensor_name, norm, weight, u, v, getattr(norm, "dim", 0)))
    return found


def _kept_sigma(norm: object) -> Tensor | None:
    """The sigma an sn_ext spectral norm kept from its last computation (None: none kept)."""
    sigma = getattr(norm, "_sigma", None)
    if sigma is not None and sigma.dim() == 1:  # a grouped computation's vector: this layer's entry
        sigma = sigma[norm._sigma_index]
    return sigma


@torch.no_grad()
def _sigma(entry: _Norm) -> Tensor | None:
    """The sigma in use; None for a conv_spectral_norm that has not seen an input yet (no operator, no u, v)."""
    kept = _kept_sigma(entry.norm)
    if kept is not None:
        return kept
    weight = entry.weight.detach()
    if isinstance(entry.norm, ConvSpectralNorm):
        return None if entry.u is None else operator_sigma(entry.norm.operator, weight, entry.u, entry.v)
    if entry.u is None or weight.dim() == 1:
        return torch.linalg.vector_norm(weight)
    return torch.vdot(entry.u, torch.mv(to_matrix(weight, entry.dim), entry.v))  # as torch computes it


def sigmas(model: nn.Module) -> dict[str, Tensor]:
    """``{"<module path>.<tensor name>": sigma}`` (0-d tensors, no grad) for every spectral norm in `model`:
    sn_ext's (the sigma of its last computation, kept at no cost) and torch's (``u^T W v`` from its buffers, as
    its forward computes it; also sn_ext's before their first computation). A conv_spectral_norm's sigma is its
    estimate of the convolution operator's norm (``<u, conv(v)>``); one that has not seen an input yet (no
    input_shape, no forward) has none and is left out."""
    found = {entry.name: _sigma(entry) for entry in _norms(model)}
    return {name: sigma for name, sigma in found.items() if sigma is not None}


@dataclasses.dataclass
class SpectralReport:
    """What ``spectral_report`` found: ``rows`` (one dict per spectral-normalized weight), ``lipschitz_bound``
    and the power iteration's settings. ``str(report)`` is a table."""

    rows: list[dict]
    lipschitz_bound: float | None
    tol: float = TOL
    max_iters: int = MAX_ITERS

    def __str__(self) -> str:
        header = ("name", "sigma", "sigma_exact", "rel_gap", "operator_norm")
        cells = [header] + [(r["name"], *(_fmt(r[k]) for k in header[1:])) for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = [
            "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in cells
        ]
        for row, line in zip(self.rows, range(1, len(lines))):
            if row.get("converged") is False:
                lines[line] += f"  (not converged in {self.max_iters} rounds)"
        bound = "n/a (a layer has no operator norm)" if self.lipschitz_bound is None else _fmt(self.lipschitz_bound)
        lines.append(f"Lipschitz bound (product of the operator norms): {bound}")
        return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3e}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5) else f"{x:.4f}"


def spectral_report(
    model: nn.Module, example_input=None, *, tol: float = TOL, max_iters: int = MAX_ITERS, seed: int = 0
) -> SpectralReport:
    """A report on every spectral norm in `model` (sn_ext's and torch's). Each row of ``report.rows`` is a dict:

    - ``name``: ``"<module path>.<tensor name>"``, as in ``sigmas(model)``;
    - ``sigma``: the estimate in use (``sigmas(model)``), ``sigma_exact``: the largest singular value of the
      weight's matrix view (``torch.linalg.matrix_norm(..., ord=2)``), ``rel_gap``: ``(sigma_exact - sigma) /
      sigma_exact`` (> 0: the estimate is low, so ``W / sigma`` has norm ``1 + ...`` above 1);
    - ``operator_norm``: the operator norm of the normalized layer (``W / sigma``, no bias; ``W / max(1, sigma /
      coeff)`` bounded, ``gamma W / sigma`` for sigma-reparam) as a linear map: for a Linear (and an Embedding, on
      one-hot inputs) ``||W / sigma||_2 = sigma_exact / sigma``; for a convolution
      (1-3 d, transposed too, any stride, padding, dilation, groups) as the map on inputs of the shape it got in one
      forward of `example_input` (one sample of it), by power iteration through the convolution and its transpose
      from a seeded random start, stopped when its relative residual is below `tol` (see ``operator_norm``) or
      after `max_iters` rounds (``iterations``, ``converged`` say which); None without `example_input`, for a layer
      the forward did not reach, and for other layer types.

    A convolution with ``sn_ext.conv_spectral_norm`` estimates the operator norm itself, on the input shape it was
    built for: its ``sigma`` is that estimate, ``sigma_exact`` the operator norm of W on that shape by the power
    iteration above (`tol`, `max_iters`; no `example_input` needed), and ``operator_norm`` the normalized layer's,
    ``sigma_exact / sigma`` (``/ max(1, sigma / coeff)`` with a coeff). One that has not seen an input yet has no
    sigma (None; its ``sigma_exact`` is measured on the shape the forward of `example_input` gave it).

    ``report.lipschitz_bound`` is the product of the operator norms (None if one is missing): an upper bound on the
    Lipschitz constant (2-norm) of a sequential network of these layers with 1-Lipschitz activations (ReLU,
    LeakyReLU, tanh; not of one with normalization layers, residual sums counted once, or attention).

    `example_input`: a tensor (or a tuple of positional arguments) for one forward of `model`, run in eval mode
    without gradients to record each convolution's input shape. The report changes nothing: the model's weights,
    buffers (u, v), kept sigmas, train/eval modes and the global random state are as before.
    """
    entries = _norms(model)
    sigma = {entry.name: _sigma(entry) for entry in entries}
    shapes = _input_shapes(model, entries, example_input) if example_input is not None else {}
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for entry in entries:
        s = None if sigma[entry.name] is None else _float(sigma[entry.name])
        if isinstance(entry.norm, ConvSpectralNorm):
            rows.append(_conv_spectral_norm_row(entry, s, shapes, tol, max_iters, generator))
            continue
        with torch.no_grad():
            weight = entry.weight.detach()
            exact = _float(torch.linalg.matrix_norm(_exact_dtype(to_matrix(weight, entry.dim)), ord=2))
        row = {
            "name": entry.name,
            "sigma": s,
            "sigma_exact": exact,
            "rel_gap": (exact - s) / exact if exact else float("nan"),
            "operator_norm": None,
        }
        module = entry.module
        if entry.tensor_name == "weight" and weight.dim() >= 2:
            if isinstance(module, _MATRIX_LAYERS):
                divisor = _divisor(entry.norm, s)
                row["operator_norm"] = exact / divisor if divisor else float("inf")
            elif isinstance(module, nn.modules.conv._ConvNd) and id(module) in shapes:
                in_shape, out_shape = shapes[id(module)]
                layer = ConvLayer.of(module)
                output_padding = layer.output_padding_for(in_shape[1:], out_shape[1:])  # output_size= may set it
                operator = layer.operator(weight.shape, in_shape[1:], output_padding)
                norm, iterations, converged = _norm_of(
                    operator, _at_least_float32(weight) / _divisor(entry.norm, s), tol, max_iters, generator
                )
                row.update(operator_norm=norm, iterations=iterations, converged=converged)
        rows.append(row)
    norms = [r["operator_norm"] for r in rows]
    bound = math.prod(norms) if rows and all(n is not None for n in norms) else None
    return SpectralReport(rows, bound, tol, max_iters)


def _conv_spectral_norm_row(entry: _Norm, s: float | None, shapes: dict, tol, max_iters, generator) -> dict:
    """A conv_spectral_norm's row: its sigma estimates the operator norm that sigma_exact measures."""
    norm = entry.norm
    row = {"name": entry.name, "sigma": s, "sigma_exact": None, "rel_gap": None, "operator_norm": None}
    weight = entry.weight.detach()
    operator = norm.operator
    if operator is None and id(entry.module) in shapes:  # not built: the shape the report's forward gave it
        in_shape, out_shape = shapes[id(entry.module)]
        output_padding = norm.layer.output_padding_for(in_shape[1:], out_shape[1:])
        operator = norm.layer.operator(weight.shape, in_shape[1:], output_padding)
    if operator is None:
        return row
    exact, iterations, converged = _norm_of(operator, _at_least_float32(weight), tol, max_iters, generator)
    row.update(sigma_exact=exact, iterations=iterations, converged=converged)
    if s is not None:
        row.update(rel_gap=(exact - s) / exact if exact else float("nan"), operator_norm=exact / _divisor(norm, s))
    return row


def _divisor(norm: object, sigma: float) -> float:
    """What a spectral norm divides W by, given its sigma: sigma; max(sigma, coeff) / coeff with a coeff (bounded:
    sn_ext's, conv_spectral_norm's, DUE's and i-ResNet's hooks); that over gamma for sigma-reparam."""
    coeff = getattr(norm, "coeff", None)
    divisor = sigma if coeff is None else max(sigma, coeff) / coeff
    gain = norm._parameters.get("gain") if isinstance(norm, nn.Module) else None
    return divisor if gain is None else divisor / float(gain.detach())


def _float(t: Tensor) -> float:
    return float(t.real if t.is_complex() else t)  # a complex weight's sigma = u^H W v is real up to rounding


def _exact_dtype(t: Tensor) -> Tensor:
    """The exact sigma's dtype: float64 on the CPU; on a GPU at least float32."""
    if t.device.type == "cpu":
        return t.to(torch.complex128 if t.is_complex() else torch.float64)
    return _at_least_float32(t)


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else t.float()


def operator_norm(
    forward,
    adjoint,
    shape,
    dtype=torch.float64,
    device="cpu",
    tol: float = TOL,
    max_iters: int = MAX_ITERS,
    generator=None,
) -> tuple[float, int, bool]:
    """The operator norm (2-norm) of the linear map A = `forward` on tensors of `shape`, `adjoint` its transpose,
    by power iteration on A^T A on `dtype` tensors from a random start drawn from `generator` (a CPU
    torch.Generator; the global random state is not used). The estimate s = ||A x|| (x a unit vector; s is a lower
    bound) stops when the relative residual ||A^T A x - s^2 x|| / s^2 is below `tol`, or after `max_iters` rounds.
    Returns (s, rounds, converged). With the default tol = 1e-3, s was within 2e-3 (relative, usually far less) of
    the largest singular value on the small convolutions of tests/test_diagnostics.py and on a 32x32
    discriminator's; it converges slowly where other singular values nearly equal the largest."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    x = x / torch.linalg.vector_norm(x)
    with torch.no_grad():
        for iteration in range(1, max_iters + 1):
            y = forward(x)
            z = adjoint(y)
            estimate = float(torch.linalg.vector_norm(y))
            if estimate == 0.0 or not math.isfinite(estimate):
                return estimate, iteration, True
            square = estimate * estimate
            if float(torch.linalg.vector_norm(z - square * x)) <= tol * square:
                return estimate, iteration, True
            x = z / torch.linalg.vector_norm(z)
    return estimate, max_iters, False


def _norm_of(operator: ConvOperator, weight: Tensor, tol, max_iters, generator) -> tuple[float, int, bool]:
    """operator_norm of a convolution's operator with `weight`, on one sample of its input shape."""
    return operator_norm(
        lambda x: operator.forward(x, weight),
        lambda y: operator.adjoint(y, weight),
        (1, *operator.input_shape),
        weight.dtype,
        weight.device,
        tol,
        max_iters,
        generator,
    )


def _input_shapes(model: nn.Module, entries: list[_Norm], example_input) -> dict[int, tuple]:
    """{id(conv): (input shape, output shape)} of one sample, from one eval-mode, no-grad forward of the model,
    which leaves the model as it was (modes, buffers, kept sigmas, legacy weights, random state)."""
    shapes: dict[int, tuple] = {}

    def record(module, args, output):
        if id(module) not in shapes and args and isinstance(args[0], Tensor):
            x = args[0]
            batched = x.dim() == len(module.kernel_size) + 2
            one = (1, *x.shape[1:]) if batched else (1, *x.shape)
            out = (1, *output.shape[1:]) if batched else (1, *output.shape)
            shapes[id(module)] = (one, out)

    convs = {id(e.module): e.module for e in entries if isinstance(e.module, nn.modules.conv._ConvNd)}
    handles = [module.register_forward_hook(record) for module in convs.values()]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with _unchanged(model, entries, args), torch.no_grad():
            model.eval()
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@contextlib.contextmanager
def _unchanged(model: nn.Module, entries: list[_Norm], args):
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    kept = [(e.norm, {a: e.norm.__dict__.get(a, _MISSING) for a in ("_sigma", "_sigma_index")}) for e in entries]
    legacy = [(e.module, e.tensor_name, e.module.__dict__.get(e.tensor_name)) for e in entries]
    devices = sorted({t.device.index or 0 for t in args if isinstance(t, Tensor) and t.device.type == "cuda"})
    unbuilt = [e.norm for e in entries if isinstance(e.norm, ConvSpectralNorm) and not e.norm.built]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for norm, attrs in kept:
            for attr, value in attrs.items():
                if value is _MISSING:
                    norm.__dict__.pop(attr, None)
                else:
                    norm.__dict__[attr] = value
        for module, tensor_name, weight in legacy:
            if weight is not None:
                module.__dict__[tensor_name] = weight
        for norm in unbuilt:  # the forward built them (the input shape, u, v): not seen an input yet again
            norm._unbuild()
