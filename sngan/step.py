"""The GAN training step: one D update and one G update, shared by sngan.train's loop and the benchmark
(benchmarks/gan_step.py), so that the benchmark times the step that trains.

The callers draw the batches (real data, z) themselves, in their own order: the training loop from its
checkpointed generator (a change of order would break a bit-exact resume), the benchmark from rotated real batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .losses import GANLoss


def d_step(
    G: nn.Module,
    D: nn.Module,
    loss: GANLoss,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """One D update: G makes the fake batch from z without autograd; D's loss on real and fake (`gen`: the
    generator of the loss's own draws, e.g. WGAN-GP's interpolation weights), backward, optimiser step. Returns
    (D's loss, the loss's statistics)."""
    with torch.no_grad():
        fake = G(z)
    d_loss, stats = loss.d_loss(D, real, fake, gen)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return d_loss, stats


def g_step(
    G: nn.Module,
    D: nn.Module,
    loss: GANLoss,
    opt_g: torch.optim.Optimizer,
    z: torch.Tensor,
    real: torch.Tensor | None = None,
    frozen: Iterable[nn.Parameter] = (),
) -> torch.Tensor:
    """One G update: G makes a batch from z, D scores it (with `real` for the losses that need it), backward through
    D into G, optimiser step. Returns G's loss.

    `frozen` (D's parameters in training) get no gradient for the step, and so no DDP hook fires for them; D still
    updates its SN buffers in train mode, as torch's spectral norm does on every training-mode forward."""
    frozen = list(frozen)
    for p in frozen:
        p.requires_grad_(False)
    try:
        g_loss, _ = loss.g_loss(D, G(z), real)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return g_loss
