"""Inputs the per-op benchmark files share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_vectors(weight: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unit u (rows of the dim-0 matrix view) and v (its columns), on the weight's device and dtype, as
    a spectral norm's buffers are."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = weight.shape[0], weight[0].numel()
    u, v = (F.normalize(torch.randn(n, generator=gen, dtype=torch.float64), dim=0) for n in (rows, cols))
    return u.to(weight.device, weight.dtype), v.to(weight.device, weight.dtype)
