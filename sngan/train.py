"""Train a GAN on top of sn_ext.

    python -m sngan.train                      # default: ring-8 mixture, MLP G/D, hinge, sn_ext; ~1-2 min on 1 core
    python -m sngan.train --data digits --arch cnn --loss hinge --sn sn_ext --steps 5000
    python -m sngan.train --data cifar10 --data-root ~/data --arch resnet --preset resnet --steps 50000
    python -m sngan.train --resume runs/NAME           # continue a run (bit-exactly on CPU)
    torchrun --nproc_per_node 2 -m sngan.train ...     # DDP: gloo on CPU, nccl on GPU

Writes to --out (default runs/DATA-ARCH-LOSS-SN-sSEED): config.json, samples/*.png, metrics.jsonl (losses, D's
sigmas), metrics.json (final metrics, timing), sigma.png (sngan/sigma_log.py), checkpoint.pt, tensorboard/.

Every random draw of the loop (data batches, z, WGAN-GP's interpolation weights) comes from one torch.Generator
per rank whose state is checkpointed with the models, the optimisers and the step; evaluation uses its own
generators. So a run resumed from step N continues exactly as if it had not stopped (bit for bit on CPU; on GPU up
to the kernels' own non-determinism).
"""

# This module is the loop (setup, DDP, steps, logging, progress, final metrics); config, checkpoint, step (shared
# with benchmarks/gan_step.py), evaluate and ddp each do one of the other jobs (sngan/__init__.py lists them).

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpts
from . import config
from .config import Config, resolve
from .data import ImageData, load_data
from .ddp import gather_gen_states, rank_consistency, setup_dist
from .evaluate import Evaluator, generate, save_samples
from .losses import make_loss
from .models import build_models
from .sigma_log import plot, report_record, sigma_record
from .step import d_step, g_step


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def train(cfg: Config, explicit: set[str] | None = None) -> dict:
    """Train as `cfg` says; returns the final metrics dict (also written to OUT/metrics.json on rank 0).
    `explicit`: the fields set on the command line (only used with cfg.resume)."""
    previous = torch.get_num_threads()
    try:
        return _train(cfg, explicit)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: Config, explicit: set[str] | None) -> dict:
    cfg, ckpt = ckpts.load_resume(cfg, explicit)
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
        step, history_evals, elapsed_before = ckpts.restore(
            ckpt, G, D, opt_g, opt_d, gen, rank=d.rank, world=d.world, seed=cfg.seed, log=log
        )
        log(f"resumed from {cfg.resume} at step {step}")

    Gm, Dm = G, D  # the plain modules (checkpoints, the G step's pass through D, evaluation)
    if d.world > 1:
        ddp = nn.parallel.DistributedDataParallel
        ids = [d.device.index] if d.device.type == "cuda" else None
        G, D = ddp(G, device_ids=ids), ddp(D, device_ids=ids)

    writer = _tensorboard(os.path.join(out, "tensorboard")) if cfg.tensorboard and d.main else None
    evaluator = Evaluator(cfg, data, log)
    B, GB = cfg.batch_size, cfg.g_batch_size
    d_params = list(Dm.parameters())

    def evaluate_now(at: int) -> dict:
        t = time.time()
        m = evaluator(Gm, d.device)
        m.update(report_record(Dm, data.shape, d.device))  # D's spectral norms (sngan/sigma_log.py)
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
        states = gather_gen_states(gen, d)
        if d.main:
            ckpts.save(out, cfg, at, Gm, Dm, opt_g, opt_d, states, history_evals, elapsed)

    def samples(path: str) -> None:
        save_samples(path, generate(Gm, 2500 if points else 64, cfg.z_dim, cfg.seed + 20_000, d.device), data)

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
    t0, start_step = time.time(), step
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
        # Every draw from `gen`, in this order (a resumed run replays it): per D step the real batch, then z.
        for _ in range(cfg.n_dis):
            real = data.sample(B, gen).to(d.device)
            z = torch.randn(B, cfg.z_dim, generator=gen).to(d.device)
            d_loss, stats = d_step(G, D, loss, opt_d, real, z, gen)
        # G step: through the plain D with D's parameters frozen (no gradient, no DDP hook); D still updates its SN
        # buffers in train mode, as torch's spectral norm does on every training-mode forward.
        z = torch.randn(GB, cfg.z_dim, generator=gen).to(d.device)
        real_g = data.sample(GB, gen).to(d.device) if loss.needs_real_in_g else None
        g_loss = g_step(G, Dm, loss, opt_g, z, real_g, frozen=d_params)
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
                **sigma_record(Dm),  # sigma/<layer>: each D layer's sigma of its last forward
            }
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
            if writer is not None:
                for k, v in rec.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
        if d.main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            samples(os.path.join(out, "samples", f"step_{step:06d}.png"))
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
        samples_png = os.path.join(out, "samples", "final.png")
        samples(samples_png)
        plot(history_evals, os.path.join(out, "sigma.png"))  # estimated vs exact sigma per D layer
        train_stats = {
            "steps": step,
            "steps_this_run": step - start_step,
            "seconds_this_run": round(seconds, 3),
            "steps_per_s": (step - start_step) / max(seconds, 1e-9),
            "seconds_total": round(elapsed_before + seconds, 3),
            "d_loss": d_loss.item(),
            "g_loss": g_loss.item(),
            "world_size": d.world,
            "device": str(d.device),
        }
        result.update(_summary(cfg, history_evals, train_stats, samples_png))
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


def _tensorboard(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(path)


def _summary(cfg: Config, evals: list, train_stats: dict, samples_png: str) -> dict:
    """metrics.json's record on rank 0: the final and all evaluations, the training's numbers, the config and the
    sn_ext build that ran."""
    import sn_ext

    return {
        "final": dict(evals[-1]),
        "evals": evals,
        "train": train_stats,
        "config": dataclasses.asdict(cfg),
        "sn_ext": {
            "version": sn_ext.__version__,
            "compiled": sn_ext.ops.library_status.loaded,
            "disabled_by_env": os.environ.get("SN_EXT_DISABLE_EXT", "") == "1",
        },
        "samples": samples_png,
    }


# ---------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    return config.build_parser(__doc__)


def parse(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    return config.parse(argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg, explicit = parse(argv)
    try:
        train(cfg, explicit)
        if dist.is_initialized():
            # Every rank tears its process group down together: rank 0 computes the metrics alone, and a gloo
            # rank that destroys its group while a peer is still working aborts ("terminate called").
            dist.barrier()
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
