"""Checkpoints: save a run's whole training state, and load it back for a bit-exact resume.

A checkpoint holds the config, the step, G, D, both optimisers, the state of every rank's torch.Generator (the
source of every random draw of the loop: data batches, z, WGAN-GP's interpolation weights), torch's global RNG
state, the evaluations so far and the elapsed time. So a run resumed from step N continues exactly as if it had not
stopped (bit for bit on CPU; on GPU up to the kernels' own non-determinism).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
from torch import nn

from .config import RUNTIME_KEYS, Config


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _find_checkpoint(path: str) -> str:
    p = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise FileNotFoundError(f"--resume: no checkpoint at {p}")
    return p


def _merge_resume(cfg: Config, saved: dict, explicit: set[str]) -> Config:
    saved = {"d_scale": 1.0, **saved}  # checkpoints from before --d-scale were trained without it
    base = Config(**{k: v for k, v in saved.items() if k in Config.__dataclass_fields__})
    for k in explicit:
        new, old = getattr(cfg, k), getattr(base, k)
        if k in RUNTIME_KEYS:
            setattr(base, k, new)
        elif new != old:
            raise ValueError(
                f"--resume: --{k.replace('_', '-')} {new} differs from the checkpoint's {old}; "
                f"only {', '.join(sorted(RUNTIME_KEYS))} may change on resume"
            )
    if "out" not in explicit:
        base.out = os.path.dirname(os.path.abspath(cfg.resume)) if not os.path.isdir(cfg.resume) else cfg.resume
    base.resume = cfg.resume
    base.stop_after = cfg.stop_after if "stop_after" in explicit else None
    return base


def load_resume(cfg: Config, explicit: set[str] | None) -> tuple[Config, dict | None]:
    """With cfg.resume: the checkpoint, and the checkpoint's config with the runtime fields set in `explicit`
    (the fields set on the command line; None: those that differ from the defaults, as when called from Python).
    Without: (cfg, None)."""
    if not cfg.resume:
        return cfg, None
    ckpt = torch.load(_find_checkpoint(cfg.resume), map_location="cpu", weights_only=False)
    if explicit is None:  # called from Python: the fields that differ from the defaults
        explicit = {k for k in Config.__dataclass_fields__ if getattr(cfg, k) != getattr(Config(), k)}
    return _merge_resume(cfg, ckpt["config"], explicit), ckpt


def restore(
    ckpt: dict,
    G: nn.Module,
    D: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    gen: torch.Generator,
    *,
    rank: int,
    world: int,
    seed: int,
    log: Callable[..., None],
) -> tuple[int, list, float]:
    """Load the checkpoint's state into the models, optimisers, this rank's generator and torch's RNG; returns
    (step, evaluations so far, seconds trained so far)."""
    G.load_state_dict(ckpt["G"])
    D.load_state_dict(ckpt["D"])
    opt_g.load_state_dict(ckpt["opt_g"])
    opt_d.load_state_dict(ckpt["opt_d"])
    states = ckpt["gen_states"]
    if len(states) == world:
        gen.set_state(states[rank])
    else:
        log(f"resume: checkpoint from {len(states)} ranks, now {world}: data/z streams are reseeded")
        gen.manual_seed(seed * 1_000_003 + rank + 7919 * ckpt["step"])
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["step"], ckpt.get("evals", []), ckpt.get("elapsed", 0.0)


def save(
    out: str,
    cfg: Config,
    step: int,
    G: nn.Module,
    D: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    gen_states: list,
    evals: list,
    elapsed: float,
) -> None:
    """OUT/checkpoint.pt, written atomically (a run stopped mid-write keeps its previous checkpoint). G and D: the
    plain modules (not DDP-wrapped); gen_states: every rank's generator state, in rank order."""
    _atomic_save(
        {
            "config": dataclasses.asdict(cfg),
            "step": step,
            "G": G.state_dict(),
            "D": D.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "gen_states": gen_states,
            "torch_rng": torch.get_rng_state(),
            "evals": evals,
            "elapsed": elapsed,
        },
        os.path.join(out, "checkpoint.pt"),
    )
