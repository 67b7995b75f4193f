"""The run's configuration: the Config dataclass, the Adam presets, the defaults that depend on the data, and the
command line that fills them (`python -m sngan.train`'s flags)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from .data import DATASETS
from .losses import LOSSES, TRIPLET_G
from .models import ARCHS, SN_KINDS

# Adam settings of the SN-GAN paper (Table 1), its ResNet recipe, and a tuned one for the 2-D toy problems.
PRESETS = {
    "A": dict(lr=1e-4, beta1=0.5, beta2=0.9, n_dis=5),
    "B": dict(lr=1e-4, beta1=0.5, beta2=0.999, n_dis=1),
    "C": dict(lr=2e-4, beta1=0.5, beta2=0.999, n_dis=1),
    "D": dict(lr=1e-3, beta1=0.5, beta2=0.9, n_dis=5),
    "E": dict(lr=1e-3, beta1=0.5, beta2=0.999, n_dis=5),
    "F": dict(lr=1e-3, beta1=0.9, beta2=0.999, n_dis=5),
    "resnet": dict(lr=2e-4, beta1=0.0, beta2=0.9, n_dis=5, lr_decay="linear", batch_size=64, g_batch_size=128),
    # toy: found by a sweep on ring8/grid25 (docs/gan_results.md). d_scale 10 lets the hinge saturate under SN (the
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


def build_parser(doc: str) -> argparse.ArgumentParser:
    """The CLI's parser. `doc`: the usage text (sngan.train's docstring), its first paragraph the description and
    the rest the epilog."""
    p = argparse.ArgumentParser(
        prog="python -m sngan.train",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
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
        help="spectral norm on D: none, torch, sn_ext, sn_ext_grouped or torch_converted (torch's, converted by "
        "sn_ext.convert_spectral_norm) (default sn_ext)",
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


def parse(argv: list[str] | None, doc: str) -> tuple[Config, set[str]]:
    """The Config the command line asks for, and the fields it set explicitly (what --resume may override)."""
    ns = vars(build_parser(doc).parse_args(argv))
    return Config(**ns), set(ns)
