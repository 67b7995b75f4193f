"""Distributed data parallel: the process group from the torchrun environment, the generator states gathered for a
checkpoint, and the check that every rank ended with the same weights and spectral-norm buffers."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str) -> Dist:
    """One process, or the torchrun/launcher environment (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world <= 1:
        return Dist(0, 1, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, dev)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rank_consistency(G: nn.Module, D: nn.Module, d: Dist) -> dict:
    """Hashes of D's parameters, D's spectral-norm buffers (u, v) and G's parameters on every rank, compared."""
    sd = D.state_dict()
    parts = {
        "d_params": _digest({k: v for k, v in D.named_parameters()}),
        "sn_buffers": _digest({k: v for k, v in sd.items() if k.endswith("._u") or k.endswith("._v")}),
        "g_params": _digest({k: v for k, v in G.named_parameters()}),
    }
    gathered = [None] * d.world
    dist.all_gather_object(gathered, parts)
    return {
        "world_size": d.world,
        **{f"{k}_identical": all(g[k] == parts[k] for g in gathered) for k in parts},
        "n_sn_buffers": sum(1 for k in sd if k.endswith("._u") or k.endswith("._v")),
    }


def gather_gen_states(gen: torch.Generator, d: Dist) -> list[torch.Tensor]:
    """Every rank's generator state, in rank order (a collective: every rank must call it)."""
    if d.world == 1:
        return [gen.get_state()]
    states = [None] * d.world
    dist.all_gather_object(states, gen.get_state())
    return states
