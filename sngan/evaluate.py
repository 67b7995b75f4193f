"""Samples and evaluation of G during training: G's samples from their own seeded generators (so that evaluating
never moves the training stream), the sample plots / image grids, and the metrics of the data set."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .config import Config
from .data import ImageData, to_uint8


def save_samples(path: str, samples: torch.Tensor, data) -> None:
    """A PNG of the samples: an image grid (up to 64), or a scatter plot over the mixture's modes for 2-D data."""
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
    """The metrics of G's samples: mode coverage / quality on the 2-D mixtures; on images the classifier metrics
    (the classifier trained once and cached) and, with inception weights, Inception FID / IS."""

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
