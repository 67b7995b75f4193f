"""Train a GAN on top of sn_ext.

    python -m sngan.train                      # default: ring-8 mixture, MLP G/D, hinge, sn_ext; ~1-2 min on 1 core
    python -m sngan.train --data digits --arch cnn --loss hinge --sn sn_ext --steps 5000
    python -m sngan.train --data cifar10 --data-root ~/data --arch resnet --preset resnet --steps 50000
    python -m sngan.train --resume runs/NAME           # continue a run (bit-exactly on CPU)
    torchrun --nproc_per_node 2 -m sngan.train ...     # DDP: gloo on CPU, nccl on GPU

Writes to --out (default runs/DATA-ARCH-LOSS-SN-sSEED): config.json, samples/*.png, metrics.jsonl (losses
during training), metrics.json (final metrics, timing), checkpoint.pt, tensorboard/ (with --tensorboard).

Every random draw of the loop (data batches, z, WGAN-GP's interpolation weights) comes from one torch.Generator
per rank whose state is checkpointed with the models, the optimisers and the step; evaluation uses its own
generators. So a run resumed from step N continues exactly as if it had not stopped (bit for bit on CPU; on GPU up
to the kernels' own non-determinism).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .data import DATASETS, ImageData, load_data, to_uint8
from .losses import LOSSES, TRIPLET_G, make_loss
from .models import ARCHS, SN_KINDS, build_models

# Adam settings of the SN-GAN paper (Table 1), its ResNet recipe, and a tuned one for the 2-D toy problems.
PRESETS = {
    "A": dict(lr=1e-4, beta1=0.5, beta2=0.9, n_dis=5),
    "B": dict(lr=1e-4, beta1=0.5, beta2=0.999, n_dis=1),
    "C": dict(lr=2e-4, beta1=0.5, beta2=0.999, n_dis=1),
    "D": dict(lr=1e-3, beta1=0.5, beta2=0.9, n_dis=5),
    "E": dict(lr=1e-3, beta1=0.5, beta2=0.999, n_dis=5),
    "F": dict(lr=1e-3, beta1=0.9, beta2=0.999, n_dis=5),
    "resnet": dict(lr=2e-4, beta1=0.0, beta2=0.9, n_dis=5, lr_decay="linear", batch_size=64, g_batch_size=128),
    # toy: found by a sweep on ring8/grid25 (README, GAN results). d_scale 10 lets the hinge saturate under SN (the
    # 1-Lipschitz MLP's raw outputs are ~+-0.05); n_dis 2 buys 2.5x the G steps of n_dis 5 for the same time, and G
    # steps are what sharpens the modes (n_dis 1 collapsed on the ring); the linear decay to 0 sharpens them last.
    "toy": dict(lr=1e-3, beta1=0.5, beta2=0.9, n_dis=2, lr_decay="linear", batch_size=128, d_scale=10.0),
}


@dataclass
class Config:
    data: str = "ring8"
    data_root: str | None = None
    img_size: int | None = None  # default: 16 digits, 32 CIFAR-10 / folder, 48 STL-10
    arch: str | None = None  # default: mlp for 2-D data, cnn for images
    loss: str = "hinge"
    sn: str = "sn_ext"
    n_power_iterations: int = 1
    steps: int | None = None  # generator updates; default 8000 (2-D), 10000 (images)
    preset: str | None = None  # default: toy (mlp on 2-D), resnet (resnet), C (otherwise)
    lr: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    n_dis: int | None = None
    lr_decay: str | None = None  # none | linear (to 0 at the last step)
    batch_size: int | None = None  # D batch (real and fake each); default 64
    g_batch_size: int | None = None  # G batch; default = batch_size
    z_dim: int | None = None  # default 16 (2-D), 128 (images)
    width: float = 1.0  # scales every channel / hidden width
    d_scale: float | None = None  # constant factor on the MLP D's output; default 10 (toy preset), else 1
    embed_dim: int = 16  # triplet losses: D's embedding size
    alpha: float = 1.0  # triplet margin
    triplet_g: str = "seed"
    gp_lambda: float = 10.0
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: str | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this run
    ckpt_every: int | None = None  # default steps // 4 (and always at the end)
    sample_every: int | None = None  # default steps // 5
    eval_every: int | None = None  # default steps // 5 for 2-D; 0 (only at the end) for images
    eval_samples: int | None = None  # default 2500 (2-D), min(5000, real images)
    log_every: int = 50
    metrics_cache: str = os.path.join("runs", "cache")
    classifier_epochs: int | None = None
    inception_weights: str | None = None
    tensorboard: bool = False
    progress: bool = True
    threads: int | None = None  # torch intra-op threads; default 1 for the MLP on 2-D data, else torch's


# What a resumed run may change; everything else comes from the checkpoint.
RUNTIME_KEYS = {
    "steps",
    "device",
    "out",
    "resume",
    "stop_after",
    "ckpt_every",
    "sample_every",
    "eval_every",
    "eval_samples",
    "log_every",
    "metrics_cache",
    "classifier_epochs",
    "inception_weights",
    "tensorboard",
    "progress",
    "threads",
}


def resolve(cfg: Config, points: bool) -> Config:
    """Fill the defaults that depend on the data, the arch and the preset."""
    c = dataclasses.replace(cfg)
    c.arch = c.arch or ("mlp" if points else "cnn")
    c.preset = c.preset or ("toy" if (points and c.arch == "mlp") else "resnet" if c.arch == "resnet" else "C")
    if c.preset not in PRESETS:
        raise ValueError(f"unknown preset {c.preset!r}: choose one of {', '.join(PRESETS)}")
    p = dict(PRESETS[c.preset])
    for k in ("lr", "beta1", "beta2", "n_dis", "lr_decay", "batch_size", "g_batch_size"):
        if getattr(c, k) is None:
            setattr(c, k, p.get(k))
    c.lr_decay = c.lr_decay or "none"
    if c.d_scale is None:  # the preset's scale is for its MLP D; other archs only take 1
        c.d_scale = p.get("d_scale", 1.0) if c.arch == "mlp" else 1.0
    c.batch_size = c.batch_size or 64
    c.g_batch_size = c.g_batch_size or c.batch_size
    c.z_dim = c.z_dim or (16 if points else 128)
    c.steps = c.steps if c.steps is not None else (8000 if points else 10000)
    c.ckpt_every = c.ckpt_every if c.ckpt_every is not None else max(1, c.steps // 4)
    c.sample_every = c.sample_every if c.sample_every is not None else max(1, c.steps // 5)
    c.eval_every = c.eval_every if c.eval_every is not None else (max(1, c.steps // 5) if points else 0)
    if c.lr_decay not in ("none", "linear"):
        raise ValueError(f"unknown lr decay {c.lr_decay!r}: none or linear")
    if c.out is None:
        c.out = os.path.join("runs", f"{c.data}-{c.arch}-{c.loss}-{c.sn}-s{c.seed}")
    return c


# ---------------------------------------------------------------------------------------------------------------
# Distributed


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


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


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


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def save_samples(path: str, samples: torch.Tensor, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(data, ImageData):
        from torchvision.utils import save_image

        n = min(64, len(samples))
        save_image(
            samples[:n].float().cpu(), path, nrow=int(math.ceil(math.sqrt(n))), normalize=True, value_range=(-1, 1)
        )
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = samples.detach().float().cpu().numpy()
    modes = data.modes.numpy()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, label="G(z)")
    ax.scatter(modes[:, 0], modes[:, 1], s=30, marker="x", c="red", label="modes")
    lim = float(abs(modes).max()) * 1.5 + 0.5
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(os.path.splitext(os.path.basename(path))[0])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def generate(G: nn.Module, n: int, z_dim: int, seed: int, device: torch.device, batch: int = 500) -> torch.Tensor:
    """n samples from G in eval mode (BN running statistics), with z from their own generator (seeded), so
    evaluation never moves the training stream. Restores G's previous mode."""
    was = G.training
    G.eval()
    g = torch.Generator().manual_seed(seed)
    out = [G(torch.randn(min(batch, n - i), z_dim, generator=g).to(device)).cpu() for i in range(0, n, batch)]
    G.train(was)
    return torch.cat(out) if out else torch.empty(0)


class Evaluator:
    def __init__(self, cfg: Config, data, log) -> None:
        self.cfg, self.data = cfg, data
        self.points = not isinstance(data, ImageData)
        self.n = cfg.eval_samples or (2500 if self.points else min(5000, len(data.images)))
        self._image_metrics = None
        self.log = log

    def __call__(self, G: nn.Module, device: torch.device) -> dict:
        from .metrics import ImageMetrics, inception_metrics, mixture_metrics

        samples = generate(G, self.n, self.cfg.z_dim, self.cfg.seed + 10_000, device)
        if self.points:
            return mixture_metrics(samples, self.data)
        if self._image_metrics is None:
            self._image_metrics = ImageMetrics(
                self.data, self.cfg.metrics_cache, epochs=self.cfg.classifier_epochs, log=self.log
            )
        out = self._image_metrics(samples)
        if self.cfg.inception_weights:
            out["inception"] = inception_metrics(
                self.data.images[:10000], to_uint8(samples), self.cfg.inception_weights
            )
        return out


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
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


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, explicit: set[str] | None = None) -> dict:
    """Train as `cfg` says; returns the final metrics dict (also written to OUT/metrics.json on rank 0).
    `explicit`: the fields set on the command line (only used with cfg.resume)."""
    previous = torch.get_num_threads()
    try:
        return _train(cfg, explicit)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: Config, explicit: set[str] | None) -> dict:
    ckpt = None
    if cfg.resume:
        path = _find_checkpoint(cfg.resume)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if explicit is None:  # called from Python: the fields that differ from the defaults
            explicit = {k for k in Config.__dataclass_fields__ if getattr(cfg, k) != getattr(Config(), k)}
        cfg = _merge_resume(cfg, ckpt["config"], explicit)
    d = setup_dist(cfg.device)
    data = load_data(cfg.data, cfg.data_root, cfg.img_size)
    points = not isinstance(data, ImageData)
    cfg = resolve(cfg, points)
    threads = cfg.threads
    if threads is None and points and cfg.arch == "mlp":
        # The toy MLPs' ops are tiny: one thread is faster, and with 2 threads on a busy 2-core machine OpenMP's
        # waiting made a step ~15x slower here.
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    out = cfg.out
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if d.main else (lambda *a: None)
    if d.main:
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg))

    loss = make_loss(
        cfg.loss, alpha=cfg.alpha, embed_dim=cfg.embed_dim, triplet_g=cfg.triplet_g, gp_lambda=cfg.gp_lambda
    )
    torch.manual_seed(cfg.seed)  # the initial weights (and SN's initial u, v): identical on every rank
    G, D = build_models(
        cfg.arch,
        data.shape,
        z_dim=cfg.z_dim,
        width=cfg.width,
        out_dim=loss.out_dim,
        sn=cfg.sn,
        n_power_iterations=cfg.n_power_iterations,
        d_scale=cfg.d_scale,
    )
    G, D = G.to(d.device), D.to(d.device)
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + d.rank)
    step, history_evals, elapsed_before = 0, [], 0.0
    if ckpt is not None:
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        states = ckpt["gen_states"]
        if len(states) == d.world:
            gen.set_state(states[d.rank])
        else:
            log(f"resume: checkpoint from {len(states)} ranks, now {d.world}: data/z streams are reseeded")
            gen.manual_seed(cfg.seed * 1_000_003 + d.rank + 7919 * ckpt["step"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, history_evals, elapsed_before = ckpt["step"], ckpt.get("evals", []), ckpt.get("elapsed", 0.0)
        log(f"resumed from {cfg.resume} at step {step}")

    Gm, Dm = G, D  # the plain modules (checkpoints, the G step's pass through D, evaluation)
    if d.world > 1:
        ddp = nn.parallel.DistributedDataParallel
        ids = [d.device.index] if d.device.type == "cuda" else None
        G, D = ddp(G, device_ids=ids), ddp(D, device_ids=ids)

    writer = None
    if cfg.tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        writer = SummaryWriter(os.path.join(out, "tensorboard"))

    evaluator = Evaluator(cfg, data, log)
    B, GB = cfg.batch_size, cfg.g_batch_size
    d_params = list(Dm.parameters())

    def evaluate_now(at: int) -> dict:
        t = time.time()
        m = evaluator(Gm, d.device)
        m["step"], m["eval_seconds"] = at, round(time.time() - t, 3)
        history_evals.append(m)
        log(
            f"step {at}: "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in m.items()
                if k in ("modes_covered", "high_quality_pct", "fid", "kid", "precision", "recall")
            )
        )
        if writer is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and v is not None:
                    writer.add_scalar(f"eval/{k}", v, at)
        return m

    def checkpoint(at: int, elapsed: float) -> None:
        states = [gen.get_state()]
        if d.world > 1:
            states = [None] * d.world
            dist.all_gather_object(states, gen.get_state())
        if d.main:
            _atomic_save(
                {
                    "config": dataclasses.asdict(cfg),
                    "step": at,
                    "G": Gm.state_dict(),
                    "D": Dm.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "gen_states": states,
                    "torch_rng": torch.get_rng_state(),
                    "evals": history_evals,
                    "elapsed": elapsed,
                },
                os.path.join(out, "checkpoint.pt"),
            )

    progress = None
    if cfg.progress and d.main:
        from tqdm import tqdm

        progress = tqdm(
            total=cfg.steps,
            initial=step,
            desc=f"{cfg.data} {cfg.arch} {cfg.loss} sn={cfg.sn}",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    jsonl = open(os.path.join(out, "metrics.jsonl"), "a") if d.main else None
    t0 = time.time()
    start_step = step
    d_loss = g_loss = torch.zeros(())
    stats: dict = {}
    G.train()
    D.train()
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    while step < end:
        lr = cfg.lr * (1.0 - step / cfg.steps) if cfg.lr_decay == "linear" else cfg.lr
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        for _ in range(cfg.n_dis):
            real = data.sample(B, gen).to(d.device)
            z = torch.randn(B, cfg.z_dim, generator=gen).to(d.device)
            with torch.no_grad():
                fake = G(z)
            d_loss, stats = loss.d_loss(D, real, fake, gen)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        # G step: D's parameters frozen (no gradient, no DDP hook); D still updates its SN buffers in train mode,
        # as torch's spectral norm does on every training-mode forward.
        for p in d_params:
            p.requires_grad_(False)
        z = torch.randn(GB, cfg.z_dim, generator=gen).to(d.device)
        real_g = data.sample(GB, gen).to(d.device) if loss.needs_real_in_g else None
        g_loss, _ = loss.g_loss(Dm, G(z), real_g)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        for p in d_params:
            p.requires_grad_(True)
        step += 1

        if progress is not None:
            progress.update(1)
            if step % 10 == 0 or step == cfg.steps:
                progress.set_postfix(d=f"{d_loss.item():.3f}", g=f"{g_loss.item():.3f}", refresh=False)
        if d.main and (step % cfg.log_every == 0 or step == cfg.steps):
            rec = {
                "step": step,
                "d_loss": d_loss.item(),
                "g_loss": g_loss.item(),
                "lr": lr,
                **{k: float(v) for k, v in stats.items()},
                "steps_per_s": (step - start_step) / max(time.time() - t0, 1e-9),
            }
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
            if writer is not None:
                for k, v in rec.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
        if d.main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            save_samples(
                os.path.join(out, "samples", f"step_{step:06d}.png"),
                generate(Gm, 2500 if points else 64, cfg.z_dim, cfg.seed + 20_000, d.device),
                data,
            )
        if d.main and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            if not history_evals or history_evals[-1]["step"] != step:
                evaluate_now(step)
        if step % cfg.ckpt_every == 0 or step == end:
            checkpoint(step, elapsed_before + time.time() - t0)
    if progress is not None:
        progress.close()
    seconds = time.time() - t0

    result: dict = {}
    if d.world > 1:
        result["ddp"] = rank_consistency(Gm, Dm, d)
    if d.main:
        if not history_evals or history_evals[-1]["step"] != step:
            evaluate_now(step)
        final = dict(history_evals[-1])
        samples_png = os.path.join(out, "samples", "final.png")
        save_samples(samples_png, generate(Gm, 2500 if points else 64, cfg.z_dim, cfg.seed + 20_000, d.device), data)
        import sn_ext

        result.update(
            {
                "final": final,
                "evals": history_evals,
                "train": {
                    "steps": step,
                    "steps_this_run": step - start_step,
                    "seconds_this_run": round(seconds, 3),
                    "steps_per_s": (step - start_step) / max(seconds, 1e-9),
                    "seconds_total": round(elapsed_before + seconds, 3),
                    "d_loss": d_loss.item(),
                    "g_loss": g_loss.item(),
                    "world_size": d.world,
                    "device": str(d.device),
                },
                "config": dataclasses.asdict(cfg),
                "sn_ext": {
                    "version": sn_ext.__version__,
                    "compiled": sn_ext.ops.library_status.loaded,
                    "disabled_by_env": os.environ.get("SN_EXT_DISABLE_EXT", "") == "1",
                },
                "samples": samples_png,
            }
        )
        _write_json(os.path.join(out, "metrics.json"), result)
        log(
            f"wrote {out}/metrics.json, {samples_png}, {out}/checkpoint.pt ({step - start_step} steps in "
            f"{seconds:.1f}s, {(step - start_step) / max(seconds, 1e-9):.1f} steps/s)"
        )
    if jsonl is not None:
        jsonl.close()
    if writer is not None:
        writer.close()
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sngan.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    a = p.add_argument
    S = argparse.SUPPRESS  # unset options stay out of the namespace: we know which were given (for --resume)
    a("--data", choices=DATASETS, default=S, help="training data (default ring8)")
    a("--data-root", default=S, help="folder holding cifar10 / stl10 / image-folder data (never downloaded)")
    a("--img-size", type=int, default=S, help="image side (default 16 digits, 32 cifar10/folder, 48 stl10)")
    a("--arch", choices=ARCHS, default=S, help="G/D architecture (default mlp for 2-D, cnn for images)")
    a("--loss", choices=LOSSES, default=S, help="default hinge")
    a(
        "--sn",
        choices=SN_KINDS,
        default=S,
        help="spectral norm on D: none, torch, sn_ext or sn_ext_grouped (default sn_ext)",
    )
    a("--n-power-iterations", type=int, default=S)
    a("--steps", type=int, default=S, help="generator updates (default 8000 for 2-D, 10000 for images)")
    a(
        "--preset",
        choices=list(PRESETS),
        default=S,
        help="Adam settings: A-F (paper Table 1), resnet (2e-4, (0, 0.9), n_dis 5, linear decay, batch 64/128), "
        "toy (the 2-D default: lr 1e-3 (0.5, 0.9), n_dis 2, linear decay, batch 128, --d-scale 10). "
        "Default toy (2-D), resnet, else C",
    )
    a("--lr", type=float, default=S)
    a("--beta1", type=float, default=S)
    a("--beta2", type=float, default=S)
    a("--n-dis", type=int, default=S, help="D updates per G update")
    a("--lr-decay", choices=("none", "linear"), default=S)
    a("--batch-size", type=int, default=S, help="D batch (default 64; 128 for the toy preset)")
    a("--g-batch-size", type=int, default=S)
    a("--z-dim", type=int, default=S)
    a("--width", type=float, default=S, help="scale all channel counts (default 1.0 = the paper's)")
    a(
        "--d-scale",
        type=float,
        default=S,
        help="constant factor on the MLP discriminator's output (default 10 with the toy preset, else 1)",
    )
    a("--embed-dim", type=int, default=S, help="triplet losses: D's embedding size k (default 16)")
    a("--alpha", type=float, default=S, help="triplet margin (default 1.0)")
    a(
        "--triplet-g",
        choices=TRIPLET_G,
        default=S,
        help="triplet G loss: seed = ||D(G(z))||^2 (default), seed_max = -||D(G(z))||^2, anchor = ||D(x)-D(G(z))||^2,"
        " mean = ||mean D(x) - mean D(G(z))||^2",
    )
    a("--gp-lambda", type=float, default=S)
    a("--seed", type=int, default=S)
    a("--device", default=S, help="auto (default), cpu, cuda, cuda:1 ...")
    a("--out", default=S, help="output folder (default runs/DATA-ARCH-LOSS-SN-sSEED)")
    a("--resume", default=S, help="checkpoint file or run folder to continue from")
    a("--stop-after", type=int, default=S, help="stop after this many steps of this run (checkpointed; --resume)")
    a("--ckpt-every", type=int, default=S)
    a("--sample-every", type=int, default=S)
    a("--eval-every", type=int, default=S, help="0: only at the end")
    a("--eval-samples", type=int, default=S)
    a("--log-every", type=int, default=S)
    a("--metrics-cache", default=S, help="where the metrics classifiers are cached (default runs/cache)")
    a("--classifier-epochs", type=int, default=S)
    a("--inception-weights", default=S, help="local Inception weights for Inception FID/IS (needs torch-fidelity)")
    a("--tensorboard", action="store_true", default=S, help="also log to OUT/tensorboard (needs tensorboard)")
    a("--no-progress", dest="progress", action="store_false", default=S)
    a("--threads", type=int, default=S, help="torch threads (default 1 for the 2-D MLP, else torch's default)")
    return p


def parse(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    ns = vars(build_parser().parse_args(argv))
    return Config(**ns), set(ns)


def main(argv: list[str] | None = None) -> int:
    cfg, explicit = parse(argv)
    try:
        train(cfg, explicit)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _cli() -> int:
    from .data import DataNotFoundError

    try:
        return main()
    except (DataNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
