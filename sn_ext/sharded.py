"""Spectral norm of a DTensor weight (tensor parallel): the power iteration runs on each rank's shard of W, and only
vectors and scalars cross ranks, never W.

W's matrix view (rows: weight.shape[dim]; columns: the other dimensions flattened, as sn_ext/_matrix.py) is cut
between the ranks of one mesh dimension: between rows when the weight is sharded on `dim` (Shard(dim)), between
columns when it is sharded on another dimension. u and v stay whole on every rank (plain tensors, the same on every
rank, as one process holds them: the state dict keeps torch's keys and shapes); each rank reads the part of the cut
vector that matches its shard. One u-first round, rows cut (rank r holds W_r, the rows of u_r):

    y_r = W_r v            y = all_gather(y_r)          u = y / max(|y|, eps)
    z   = all_reduce(W_r^T u_r)                         v = z / max(|z|, eps)

and with the columns cut (rank r holds W_r, the columns of v_r): y = all_reduce(W_r v_r), u = N(y), z =
all_gather(W_r^T u), v = N(z). Either way a round sends rows + cols numbers in two collectives, every rank ends it with
the same whole u and v, and sigma = |z|^2 / max(|z|, eps) is computed on every rank from the same numbers. The
forward's W_sn = W / sigma is local (a DTensor sharded as W), and its backward, (G - <G, W_sn> u v^T) / sigma, needs
one all-reduced scalar, <G, W_sn>. A step (one round) sends rows + cols + 1 numbers; eval sends one (sigma = u^T W v,
each rank's share all-reduced).

sn_ext's fused ops do not fit the rounds: each fuses a reduction over the whole matrix with its use (|W v| with
u = W v / |W v|; <G, W_sn> with the correction that subtracts it), and here that reduction crosses ranks between the
two. The local pieces are therefore plain torch matrix-vector products on the shard, sharing the reference's round
(sn_ext/reference.py power_rounds: the same normalization, rounding and degenerate-round rule, so the numbers are
one process's to rounding). The fused power_iteration_ serves eval's local u_r^T W_r v_r, and a weight that every
rank holds whole (every placement Replicate) runs the module's own kernels.

The power iteration (power_iteration, power_iteration_) is apart from the division by sigma (spectral_normalize), so
that the other functions of sigma (bounded spectral norm, sigma-reparam: _ScaleBySigma) reuse it on sharded weights.

Why not sharding strategies for sn_ext's ops (torch.distributed.tensor.experimental.register_sharding, in torch
2.6-2.14): a strategy declares the placements an op runs on and the op then runs on local tensors, with any
collective before or after it; a round needs two collectives inside it, so a strategy for the fused ops could only
have DTensor replicate W (gather it) first. The parametrization's forward dispatches here after one type check instead.
"""

import dataclasses
import sys

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference
from ._matrix import accumulate_dtype, rank_one, to_matrix

# torch 2.14 renamed all_gather_into_tensor (still there, with a FutureWarning) to all_gather_single.
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_dtensor(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor; without importing torch.distributed.tensor (0.4 s) when nothing has: no DTensor
    can exist then."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


@dataclasses.dataclass(frozen=True)
class Split:
    """Where a DTensor weight's matrix view is cut between the ranks of `group`, and which vector that cuts: u (the
    rows are cut: the weight is sharded on `dim`) or v (the columns are cut). The cut vector is seen as a tensor of
    `shape` ((rows,) for u; the other dimensions' sizes for v), cut along `axis` into `sizes` (torch.chunk's, as
    DTensor's Shard), this rank holding part `index`."""

    group: "dist.ProcessGroup | None"  # None: every rank holds the whole weight, nothing crosses ranks
    rows: bool
    shape: tuple[int, ...]
    axis: int
    sizes: tuple[int, ...]
    index: int

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.index])

    def local_part(self, vector: Tensor) -> Tensor:
        """This rank's part of the cut vector (whole on every rank), in the order of its shard's matrix view."""
        part = vector.view(self.shape).narrow(self.axis, self.offset, self.sizes[self.index])
        return part.flatten()

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum over the ranks of each rank's `tensor` (partial products over its columns or rows)."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, part: Tensor) -> Tensor:
        """The whole cut vector from each rank's part (what local_part gives), the same on every rank. Parts of unequal
        size (torch.chunk's last ones) travel padded to the largest."""
        world, chunk = len(self.sizes), max(self.sizes)
        if self.axis == 0 and all(size == chunk for size in self.sizes):  # the common case: no padding, no copy
            out = part.new_empty(world * part.numel())
            _all_gather_into_tensor(out, part.contiguous(), group=self.group)
            return out
        padded_shape = list(self.shape)
        padded_shape[self.axis] = chunk
        padded = part.new_zeros(padded_shape)
        mine = list(padded_shape)
        mine[self.axis] = self.sizes[self.index]
        padded.narrow(self.axis, 0, mine[self.axis]).copy_(part.view(mine))
        out = part.new_empty(world * padded.numel())  # gloo takes flat tensors only
        _all_gather_into_tensor(out, padded.flatten(), group=self.group)
        out = out.view(world, *padded_shape)
        parts = [out[r].narrow(self.axis, 0, size) for r, size in enumerate(self.sizes)]
        return torch.cat(parts, dim=self.axis).flatten()


def split_of(weight, dim: int) -> Split:
    """How `weight` (a DTensor) is cut for spectral norm over `dim`. Takes a weight sharded (Shard) on one mesh
    dimension and replicated on the others; raises NotImplementedError, naming the placements, for anything else."""
    from torch.distributed.tensor import Replicate, Shard

    dim %= weight.ndim
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    sharded = [i for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if not sharded:
        return Split(None, True, (weight.shape[dim],), 0, (weight.shape[dim],), 0)
    placement = placements[sharded[0]]
    if len(sharded) > 1 or type(placement) is not Shard:  # _StridedShard is a Shard subclass: not taken either
        raise NotImplementedError(
            f"spectral_norm: a DTensor weight must be sharded (Shard) on one mesh dimension and replicated on the "
            f"others, got placements {placements}"
        )
    mesh_dim = sharded[0]
    world, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    cut = placement.dim % weight.ndim
    size = weight.shape[cut]
    chunk = -(-size // world)  # torch.chunk's, as DTensor's Shard: full chunks, then the rest, then empty parts
    sizes = tuple(max(0, min(chunk, size - r * chunk)) for r in range(world))
    group = mesh.get_group(mesh_dim)
    local_size = weight.to_local().shape[cut]
    if local_size != sizes[index]:  # the u, v parts read below must be the shard's
        raise RuntimeError(
            f"spectral_norm: rank {index} of the mesh dimension holds {local_size} of the weight's {size} entries on "
            f"dimension {cut}; torch.chunk's split, which DTensor's Shard follows, gives it {sizes[index]}"
        )
    if cut == dim:
        return Split(group, True, (size,), 0, sizes, index)
    others = [d for d in range(weight.ndim) if d != dim]
    return Split(group, False, tuple(weight.shape[d] for d in others), others.index(cut), sizes, index)


def _products(matrix: Tensor, split: Split):
    """W x and W^H x for the whole vectors x, from this rank's shard `matrix` (its matrix view, in the accumulation
    dtype) and one collective each: the product whose result is the cut vector is local per part and gathered; the
    other is a sum over the cut, partial per rank and all-reduced."""
    if split.rows:  # u cut: W_r v is u's part r; W_r^H u_r is a partial sum of W^H u

        def matvec(x):
            return split.all_gather(matrix @ x)

        def rmatvec(x):
            return split.all_reduce(matrix.mH @ split.local_part(x))

    else:  # v cut: W_r v_r is a partial sum of W v; W_r^H u is v's part r

        def matvec(x):
            return split.all_reduce(matrix @ split.local_part(x))

        def rmatvec(x):
            return split.all_gather(matrix.mH @ x)

    return matvec, rmatvec


def check_weight(weight, dim: int) -> None:
    """What a spectral norm checks on a DTensor weight at registration, before it draws u and v: a real dtype, not a
    parameter that fully_shard has sharded, and placements it takes (split_of)."""
    if weight.is_complex():  # the fused ops take real weights; one process runs complex ones on the reference
        raise TypeError(f"spectral_norm of a DTensor weight: complex weights are not supported, got {weight.dtype}")
    check_not_fully_sharded(weight)  # first: FSDP2's 2-D shards would fail split_of with a less useful message
    split_of(weight, dim)


def _check_vectors(weight, u: Tensor, v: Tensor, dim: int) -> None:
    rows = weight.shape[dim]
    for name, vector, size in (("u", u, rows), ("v", v, weight.numel() // rows)):
        if is_dtensor(vector) or vector.shape != (size,):
            raise ValueError(
                f"spectral_norm of a DTensor weight: {name} must be a whole (plain) vector of size {size}, got "
                f"{type(vector).__name__} of shape {list(vector.shape)}"
            )


def power_iteration(
    weight, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """n rounds on a DTensor weight: (sigma, u_new, v_new), whole and the same on every rank, u and v untouched; a
    degenerate round (a non-finite or zero vector on any rank: the collectives carry it to every rank) returns u and
    v. n == 0: sigma = u^T W v, u and v as they are."""
    dim %= weight.ndim
    _check_vectors(weight, u, v, dim)
    return _power_iteration(weight.to_local(), split_of(weight, dim), u, v, dim, n_power_iterations, eps, v_first)


@torch.no_grad()
def _power_iteration(
    local: Tensor, split: Split, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """power_iteration on this rank's shard `local`, cut as `split`."""
    u_new, v_new = u.clone(), v.clone()
    if split.group is None:  # every rank holds W: one process's computation, on its copy
        sigma = ops.power_iteration_(local, u_new, v_new, dim, n_power_iterations, eps, v_first)
        return sigma, u_new, v_new
    if n_power_iterations == 0:
        # The fused power_iteration_ with n = 0 computes this rank's share u_r^T W_r v_r (reading W_r once); the
        # shares add up to sigma. It writes nothing (its vectors are copies all the same). An empty shard (torch.chunk
        # leaves the last ranks none when a dimension is smaller than the mesh) has a share of 0.
        u_part, v_part = (split.local_part(u_new), v_new) if split.rows else (u_new, split.local_part(v_new))
        if local.numel():
            sigma = ops.power_iteration_(local, u_part.contiguous(), v_part.contiguous(), dim, 0, eps)
        else:
            sigma = local.new_zeros((), dtype=accumulate_dtype(local.dtype))
        return split.all_reduce(sigma), u_new, v_new
    matrix = to_matrix(local, dim).to(accumulate_dtype(local.dtype))
    return reference.power_rounds(*_products(matrix, split), u, v, n_power_iterations, eps, v_first)


def power_iteration_(
    weight, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> Tensor:
    """power_iteration with u and v updated in place (as sn_ext::power_iteration_); returns sigma."""
    sigma, u_new, v_new = power_iteration(weight, u, v, dim, n_power_iterations, eps, v_first)
    with torch.no_grad():
        u.copy_(u_new)
        v.copy_(v_new)
    return sigma


class _DivideBySigma(torch.autograd.Function):
    """W_r / sigma on this rank's shard; the backward (G_r - <G, W_sn> u v^T restricted to the shard) / sigma, with
    <G, W_sn> the sum of every rank's share: the one number the backward sends. Plain torch ops: the fused backward
    (sn_ext::spectral_normalize_backward) would take <G, W_sn> over this shard only."""

    @staticmethod
    def forward(ctx, local: Tensor, sigma: Tensor, u_part: Tensor, v_part: Tensor, dim: int, split: Split):
        local_sn = (local.to(sigma.dtype) / sigma).to(local.dtype)
        ctx.save_for_backward(local_sn, sigma, u_part, v_part)
        ctx.dim, ctx.split = dim, split
        return local_sn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        local_sn, sigma, u_part, v_part = ctx.saved_tensors
        acc = sigma.dtype
        g = grad.to(acc)
        lam = ctx.split.all_reduce(torch.sum(local_sn.to(acc).conj() * g))
        # lam scales u (a vector), not u v^T: one weight-sized temporary less.
        grad_local = (g - rank_one(lam * u_part.to(acc), v_part.to(acc), grad, ctx.dim)).div_(sigma.conj())
        return grad_local.to(grad.dtype), None, None, None, None, None


class _ScaleBySigma(torch.autograd.Function):
    """A scaled form's W_r g / max(sigma, f) on this rank's shard (sn_ext/reference.py's formula); the backward
    s (G_r - k mu u v^T restricted to the shard) with mu = <G, W> / max(sigma, f), <G, W> the sum of every rank's share
    (the one number the backward sends), and gamma's gradient mu c."""

    @staticmethod
    def forward(ctx, local, sigma, u_part, v_part, gamma, dim: int, split: Split, coeff, sigma_grad: bool):
        acc = sigma.dtype
        divisor = reference.scaled_divisor(sigma, coeff)
        scale = reference.scaled_numerator(coeff, gamma, acc) / divisor
        ctx.save_for_backward(local, sigma, u_part, v_part, gamma)
        ctx.dim, ctx.split, ctx.coeff, ctx.sigma_grad = dim, split, coeff, sigma_grad
        return (local.to(acc) * scale).to(local.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        local, sigma, u_part, v_part, gamma = ctx.saved_tensors
        coeff, acc = ctx.coeff, sigma.dtype
        g = grad.to(acc)
        divisor = reference.scaled_divisor(sigma, coeff)
        mu = ctx.split.all_reduce(torch.sum(local.to(acc) * g)) / divisor
        scale = reference.scaled_numerator(coeff, gamma, acc) / divisor
        counts = reference.sigma_counts(sigma, coeff, ctx.sigma_grad)
        correction = torch.where(torch.as_tensor(counts, device=mu.device), mu, torch.zeros_like(mu))
        grad_local = (g - rank_one(correction * u_part.to(acc), v_part.to(acc), grad, ctx.dim)) * scale
        grad_gamma = None
        if gamma is not None:
            grad_gamma = (mu * (1.0 if coeff is None else coeff)).to(gamma.dtype).reshape(gamma.shape)
        return grad_local.to(grad.dtype), None, None, None, grad_gamma, None, None, None, None


def spectral_normalize(
    weight,
    u: Tensor,
    v: Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    kernels,
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """The forward of sn_ext.spectral_norm on a DTensor weight: (W_sn, sigma), W_sn a DTensor placed as `weight`
    and differentiable in it (and in gamma), sigma a plain scalar (the same on every rank); u and v updated in place
    after n rounds. `kernels`: the module's (sn_ext.backends.Kernels), which run a weight that every rank holds
    whole. coeff, gamma, sigma_grad: the scaled forms (sn_ext/ops.py); gamma a plain tensor on each rank."""
    from torch.distributed.tensor import DTensor

    dim %= weight.ndim
    split = split_of(weight, dim)
    local = weight.to_local()
    scaled = reference.is_scaled(coeff, gamma) or not sigma_grad
    if split.group is None:
        scaling = (False, coeff, gamma, sigma_grad) if scaled else ()
        local_sn, sigma, _, _ = kernels.forward(local, u, v, dim, n_power_iterations, eps, *scaling)
    else:
        _check_vectors(weight, u, v, dim)
        sigma, u_new, v_new = _power_iteration(local, split, u, v, dim, n_power_iterations, eps, False)
        if n_power_iterations:
            with torch.no_grad():
                u.copy_(u_new)
                v.copy_(v_new)
        # The backward reads the vectors this call used (u_new, v_new: fresh tensors), not the buffers, so a module
        # called twice before one backward works, as with the fused ops.
        u_part, v_part = (split.local_part(u_new), v_new) if split.rows else (u_new, split.local_part(v_new))
        if scaled:
            local_sn = _ScaleBySigma.apply(local, sigma, u_part, v_part, gamma, dim, split, coeff, sigma_grad)
        else:
            local_sn = _DivideBySigma.apply(local, sigma, u_part, v_part, dim, split)
    weight_sn = DTensor.from_local(
        local_sn, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride()
    )
    return weight_sn, sigma


def check_not_fully_sharded(weight) -> None:
    """Raises if `weight` is a parameter that FSDP2's fully_shard has sharded: fully_shard swaps the parameter on its
    module around each forward, which a parametrization (the weight moved to parametrizations.<name>.original) breaks.
    torch marks no such parameter, so this looks for it among the FSDP states (private: a torch whose layout differs
    answers nothing here, and registration goes on)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return
    for state_ref in list(_module_state_mapping.values()):
        state = state_ref()
        if not isinstance(state, FSDPState):
            continue
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            if group is not None and any(p.sharded_param is weight for p in group.fsdp_params):
                raise RuntimeError(
                    "spectral_norm: the weight is a parameter that fully_shard (FSDP2) has sharded: apply "
                    "sn_ext.spectral_norm before fully_shard (after parallelize_module for tensor parallel), as "
                    "fully_shard cannot follow a parameter that a parametrization moves"
                )
