"""Offline GAN metrics.

2-D mixtures (VEEGAN / PacGAN protocol): draw 2500 samples; a sample is *high quality* if it lies within 3 sigma
of its nearest mode; a mode is *covered* if at least one high-quality sample has it as nearest mode.

Images: no Inception weights can be downloaded here, so the feature space is a small CNN classifier that sngan
trains on the data set itself (train split; its test accuracy is reported with every number) and caches on disk.
In its penultimate (128-d) features:
- classifier-FID: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2)  (torchmetrics FrechetInceptionDistance
  with the classifier as its feature network);
- KID: unbiased MMD^2 with the kernel (a.b/d + 1)^3, mean and std over subsets (torchmetrics);
- precision / recall / density / coverage with k = 5 nearest neighbours (Naeem et al. 2020).
Inception FID / IS run only when you supply the Inception weights file (torch-fidelity's pt_inception-2015-12-05
.pth) and torch-fidelity is installed; otherwise they are reported as not available, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData, Mixture, to_float, to_uint8

# ---------------------------------------------------------------------------------------------------------------
# 2-D mixtures


def mixture_metrics(samples: torch.Tensor, mixture: Mixture, n_sigma: float = 3.0) -> dict:
    """modes_covered (of n_modes), high_quality_pct, and mode_kl: KL(mode histogram of the high-quality samples
    || uniform) in nats (0 = every mode equally often; log K = all in one mode)."""
    x = samples.detach().double().cpu()
    modes = mixture.modes.double()
    dist = torch.cdist(x, modes)
    mind, nearest = dist.min(1)
    hq = mind <= n_sigma * mixture.sigma
    counts = torch.bincount(nearest[hq], minlength=len(modes)).double()
    out = {
        "modes_covered": int((counts > 0).sum()),
        "n_modes": len(modes),
        "high_quality_pct": 100.0 * hq.double().mean().item() if len(x) else 0.0,
        "n_samples": len(x),
    }
    if counts.sum() > 0:
        p = counts / counts.sum()
        nz = p > 0
        out["mode_kl"] = float((p[nz] * (p[nz] * len(modes)).log()).sum())
    else:
        out["mode_kl"] = None
    return out


# ---------------------------------------------------------------------------------------------------------------
# The classifier whose features the image metrics use


class Classifier(nn.Module):
    """[conv3x3 16, BN, ReLU, maxpool], [conv3x3 32, BN, ReLU, maxpool], [conv3x3 64, BN, ReLU], global average
    pool, dense 128 + ReLU (the features), dense n_classes. Small enough to train in seconds on digits."""

    num_features = 128

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(channels, 16),
            nn.MaxPool2d(2),
            *block(16, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _FeatureNet(nn.Module):
    """What torchmetrics calls with images: uint8 (N, C, H, W) -> classifier features (N, 128), float64."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        self.clf = clf
        self.num_features = clf.num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(to_float(x)).double()


def _fingerprint(data: ImageData) -> str:
    h = hashlib.sha1()
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.flatten()[:: max(1, t.numel() // 65536)].numpy().tobytes())  # a sparse sample of the bytes
    return h.hexdigest()[:12]


@torch.no_grad()
def accuracy(clf: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    if len(x_u8) == 0:
        return float("nan")
    clf.eval()
    correct = 0
    for xb, yb in zip(x_u8.split(batch), y.split(batch)):
        correct += (clf(to_float(xb)).argmax(1) == yb).sum().item()
    return correct / len(x_u8)


def train_classifier(data: ImageData, epochs: int, seed: int = 0, log=print) -> tuple[Classifier, float]:
    """Adam 1e-3, batch 128, random horizontal flips for RGB data; returns (classifier, test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = Classifier(data.shape[0], data.num_classes)
    opt = torch.optim.Adam(clf.parameters(), 1e-3)
    n = len(data.train_x)
    t0 = time.time()
    for _epoch in range(epochs):
        clf.train()
        perm = torch.randperm(n, generator=g)
        for idx in perm.split(128):
            x = to_float(data.train_x[idx])
            if data.shape[0] == 3:
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(clf(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    acc = accuracy(clf, data.test_x, data.test_y)
    log(f"metrics classifier for {data.name}: {epochs} epochs in {time.time() - t0:.0f}s, test accuracy {acc:.4f}")
    return clf.eval(), acc


def get_classifier(data: ImageData, cache_dir: str, epochs: int | None = None, log=print) -> tuple[Classifier, dict]:
    """The data set's classifier, from `cache_dir` if one was trained before on the same data (shape, labels and
    a sample of the bytes) and epochs, else trained now and saved there."""
    epochs = epochs if epochs is not None else (20 if data.name == "digits" else 15)
    key = f"classifier-{data.name}-{'x'.join(map(str, data.shape))}-e{epochs}-{_fingerprint(data)}"
    path = os.path.join(cache_dir, key + ".pt")
    clf = Classifier(data.shape[0], data.num_classes)
    if os.path.isfile(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        clf.load_state_dict(blob["state_dict"])
        info = json.loads(blob["info"])
        return clf.eval(), info
    clf, acc = train_classifier(data, epochs, log=log)
    info = {
        "data": data.name,
        "shape": list(data.shape),
        "epochs": epochs,
        "test_accuracy": acc,
        "n_train": len(data.train_x),
        "n_test": len(data.test_x),
        "path": path,
    }
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"state_dict": clf.state_dict(), "info": json.dumps(info)}, tmp)
    os.replace(tmp, path)
    return clf, info


# ---------------------------------------------------------------------------------------------------------------
# Feature-space metrics


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Precision, recall, density, coverage (Naeem et al. 2020, their reference implementation's definitions):
    r_i = distance from real i to its k-th nearest real neighbour (self excluded), likewise s_j for fakes;
    precision = frac. of fakes inside some real ball; recall = frac. of reals inside some fake ball;
    density = mean over fakes of (number of real balls containing it) / k; coverage = frac. of real balls
    containing at least one fake."""
    real, fake = real.double(), fake.double()
    r_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    r_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    d = torch.cdist(real, fake)  # (R, F)
    inside_real = d < r_real[:, None]
    return {
        "precision": inside_real.any(0).double().mean().item(),
        "recall": (d < r_fake[None, :]).any(1).double().mean().item(),
        "density": inside_real.sum(0).double().mean().item() / k,
        "coverage": (d.min(1).values < r_real).double().mean().item(),
    }


def feature_metrics(real_u8: torch.Tensor, fake_u8: torch.Tensor, feature_net: nn.Module, seed: int = 0) -> dict:
    """classifier-FID, KID (mean, std) and PRDC between uint8 image sets, in feature_net's space."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    reals = [feature_net(xb) for xb in real_u8.split(500)]
    fakes = [feature_net(xb) for xb in fake_u8.split(500)]
    fr, ff = torch.cat(reals), torch.cat(fakes)
    # The metrics get the features themselves (an identity "network"): computed once, shared with PRDC.
    ident = _Identity(feature_net.num_features)
    warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
    # sync_on_compute=False: under DDP only rank 0 evaluates, and torchmetrics would wait for the other ranks.
    fid = FrechetInceptionDistance(feature=ident, reset_real_features=False, sync_on_compute=False)
    kid = KernelInceptionDistance(
        feature=ident, subsets=20, subset_size=min(1000, len(fr), len(ff)), sync_on_compute=False
    )
    with torch.random.fork_rng():  # KID draws its subsets from the global generator: keep training's untouched
        torch.manual_seed(seed)
        for m in (fid, kid):
            m.update(fr, real=True)
            m.update(ff, real=False)
        fid_value = fid.compute().item()
        kid_mean, kid_std = (v.item() for v in kid.compute())
    out = {"fid": fid_value, "kid": kid_mean, "kid_std": kid_std, "n_real": len(fr), "n_fake": len(ff)}
    out.update(prdc(fr, ff))
    return out


class _Identity(nn.Module):
    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ImageMetrics:
    """Classifier-feature metrics for one data set: the classifier (cached in cache_dir) and the real set
    (the GAN's training images, at most n_real of them)."""

    def __init__(
        self, data: ImageData, cache_dir: str, n_real: int = 10000, epochs: int | None = None, log=print
    ) -> None:
        self.data = data
        clf, self.classifier_info = get_classifier(data, cache_dir, epochs, log=log)
        self.net = _FeatureNet(clf)
        self.real = data.images[:n_real]

    def __call__(self, fake: torch.Tensor) -> dict:
        """fake: floats in [-1, 1] (quantised to 8 bits like the real images) or uint8."""
        fake_u8 = fake if fake.dtype == torch.uint8 else to_uint8(fake.cpu())
        out = feature_metrics(self.real, fake_u8, self.net)
        out["classifier_test_accuracy"] = self.classifier_info["test_accuracy"]
        return out

    def real_baseline(self) -> dict:
        """The same metrics for the held-out real test split against the real training set: what a perfect
        generator would score at that sample size."""
        return feature_metrics(self.real, self.data.test_x, self.net)


def inception_metrics(real_u8: torch.Tensor, fake_u8: torch.Tensor, weights: str | None) -> dict:
    """Inception FID / IS (torchmetrics + torch-fidelity) with a local weights file; otherwise
    {"available": False, "reason": ...}. RGB only."""
    if not weights:
        return {
            "available": False,
            "reason": "no Inception weights given (--inception-weights PATH to "
            "torch-fidelity's pt_inception-2015-12-05-6726825d.pth); they cannot be downloaded here",
        }
    if not os.path.isfile(weights):
        return {"available": False, "reason": f"Inception weights file {weights} not found"}
    if real_u8.shape[1] != 3:
        return {"available": False, "reason": "Inception metrics need RGB images"}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
        from torchmetrics.image.inception import InceptionScore

        feat = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
        logits = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=weights)
    except (ImportError, ModuleNotFoundError) as e:
        return {"available": False, "reason": f"torch-fidelity is not installed ({e})"}
    feat.num_features = 2048
    fid = FrechetInceptionDistance(feature=feat, sync_on_compute=False)
    is_ = InceptionScore(feature=logits, sync_on_compute=False)
    for xb in real_u8.split(200):
        fid.update(xb, real=True)
    for xb in fake_u8.split(200):
        fid.update(xb, real=False)
        is_.update(xb)
    is_mean, is_std = is_.compute()
    return {"available": True, "fid": fid.compute().item(), "is": is_mean.item(), "is_std": is_std.item()}
