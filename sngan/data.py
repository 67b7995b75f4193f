"""Training data, all local: generated 2-D Gaussian mixtures, scikit-learn's bundled digits, and CIFAR-10 /
STL-10 / image folders read through torchvision from a path you give. Nothing here ever downloads: a missing
data set raises `DataNotFoundError` (a FileNotFoundError) at once, saying where the files were looked for.

Every data set is held in memory (images as uint8, N x C x H x W, at the training resolution) and sampled with
replacement by `sample(n, gen)` using the caller's torch.Generator, so a run's data stream is a pure function of
the generator's state: checkpoint the state and a resumed run sees the same batches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DATASETS = ("ring8", "grid25", "digits", "cifar10", "stl10", "folder")
DEFAULT_IMG_SIZE = {"digits": 16, "cifar10": 32, "stl10": 48, "folder": 32}


class DataNotFoundError(FileNotFoundError):
    pass


@dataclass
class Mixture:
    """A mixture of isotropic 2-D Gaussians with equal weights."""

    name: str
    modes: torch.Tensor  # (K, 2)
    sigma: float
    shape: tuple[int, ...] = (2,)
    kind: str = "points"

    def sample(self, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(len(self.modes), (n,), generator=gen)
        return self.modes[k] + self.sigma * torch.randn(n, 2, generator=gen)


def ring8(radius: float = 1.0, sigma: float = 0.01) -> Mixture:
    """8 modes at radius * (cos 2 pi k/8, sin 2 pi k/8), k = 0..7, sigma 0.01 (VEEGAN / PacGAN). Not
    linspace(0, 2 pi, 8), which repeats the first mode and makes only 7."""
    angle = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    modes = radius * torch.stack([angle.cos(), angle.sin()], 1)
    return Mixture("ring8", modes.float(), sigma)


def grid25(sigma: float = 0.05) -> Mixture:
    """25 modes on {-4, -2, 0, 2, 4}^2, sigma 0.05."""
    v = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    modes = torch.cartesian_prod(v, v)
    return Mixture("grid25", modes, sigma)


@dataclass
class ImageData:
    """Images in memory as uint8 (N, C, H, W); `sample` returns floats in [-1, 1]. `train_*`/`test_*` (labels
    included) are for the metrics classifier; the GAN trains on `images` (the train split, or unlabeled data)."""

    name: str
    images: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    kind: str = "images"
    shape: tuple[int, ...] = field(default=())
    source: str = ""

    def __post_init__(self) -> None:
        self.shape = tuple(self.images.shape[1:])

    def sample(self, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(len(self.images), (n,), generator=gen)
        return to_float(self.images[idx])


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 (0..255), rounding: fake images are quantised like the real ones before metrics."""
    return images.detach().add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def _resize_u8(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """uint8 (N, C, H, W) to uint8 (N, C, size, size), area-averaging down / bilinear up, in chunks."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    out = []
    for part in x.split(chunk):
        y = F.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _split(x: torch.Tensor, y: torch.Tensor, n_test: int, seed: int = 0):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def digits(img_size: int = 16) -> ImageData:
    """scikit-learn's bundled `load_digits()`: 1797 8x8 grey images (0..16) of 10 digits, shipped inside the
    wheel. Scaled to 0..255, resized to img_size; a fixed split keeps 297 for the classifier's test set and the
    GAN trains on the other 1500."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("--data digits needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.from_numpy(d.images).float().mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)[:, None]
    x = _resize_u8(x, img_size)
    y = torch.from_numpy(d.target).long()
    trx, tr_y, tex, te_y = _split(x, y, 297)
    return ImageData("digits", trx, trx, tr_y, tex, te_y, 10, source="sklearn.datasets.load_digits")


def _need(root: str | None, what: str, expected: str) -> str:
    if not root:
        raise DataNotFoundError(f"--data {what} needs --data-root PATH holding {expected}; sngan never downloads")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataNotFoundError(f"{what}: {root} is not a directory (expected {expected}); sngan never downloads")
    return root


def cifar10(root: str | None, img_size: int = 32) -> ImageData:
    """CIFAR-10 "python version" as torchvision lays it out: ROOT/cifar-10-batches-py/{data_batch_1..5,
    test_batch, batches.meta} (ROOT may also be that folder itself). Files are checked for presence only (not
    torchvision's md5), so a re-packed or reduced copy loads; download is never attempted."""
    from torchvision.datasets import CIFAR10

    expected = "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"
    root = _need(root, "cifar10", expected)
    if os.path.basename(root.rstrip("/")) == CIFAR10.base_folder:
        root = os.path.dirname(root.rstrip("/"))
    names = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = [f for f in names if not os.path.isfile(os.path.join(root, CIFAR10.base_folder, f))]
    if missing:
        raise DataNotFoundError(
            f"cifar10: missing {', '.join(missing)} under {os.path.join(root, CIFAR10.base_folder)}"
            f" (expected {expected}); sngan never downloads"
        )

    class _Local(CIFAR10):
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:  # as torchvision's, without its md5 check
            import pickle

            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def load(train: bool):
        ds = _Local(root, train=train, download=False)
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long())

    trx, tr_y = load(True)
    tex, te_y = load(False)
    trx, tex = _resize_u8(trx, img_size), _resize_u8(tex, img_size)
    return ImageData("cifar10", trx, trx, tr_y, tex, te_y, 10, source=root)


def stl10(root: str | None, img_size: int = 48) -> ImageData:
    """STL-10 binary version as torchvision lays it out: ROOT/stl10_binary/{train_X.bin, train_y.bin,
    test_X.bin, test_y.bin, unlabeled_X.bin}. The GAN trains on train + unlabeled (105k images, resized from 96 to
    img_size = 48 as in the paper); the classifier on the labeled train / test splits. Presence checked only."""
    from torchvision.datasets import STL10

    expected = "stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin)"
    root = _need(root, "stl10", expected)
    if os.path.basename(root.rstrip("/")) == STL10.base_folder:
        root = os.path.dirname(root.rstrip("/"))
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]
    missing = [f for f in names if not os.path.isfile(os.path.join(root, STL10.base_folder, f))]
    if missing:
        raise DataNotFoundError(
            f"stl10: missing {', '.join(missing)} under {os.path.join(root, STL10.base_folder)}"
            f" (expected {expected}); sngan never downloads"
        )

    class _Local(STL10):
        def _check_integrity(self) -> bool:
            return True

    def load(split: str):
        ds = _Local(root, split=split, download=False)
        x = _resize_u8(torch.from_numpy(ds.data), img_size)
        y = torch.from_numpy(ds.labels).long() if ds.labels is not None else None
        return x, y

    trx, tr_y = load("train")
    tex, te_y = load("test")
    unl, _ = load("unlabeled")
    return ImageData("stl10", torch.cat([trx, unl]), trx, tr_y, tex, te_y, 10, source=root)


def image_folder(root: str | None, img_size: int = 32, test_fraction: float = 0.1) -> ImageData:
    """Any torchvision ImageFolder (ROOT/CLASS/*.png|jpg...): resized (shorter side) and centre-cropped to
    img_size, RGB. The classes label the classifier's data (one class is fine: then its accuracy says nothing);
    a fixed 10% is held out as its test set, and the GAN trains on the rest."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = _need(root, "folder", "one sub-folder per class with image files")
    tf = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.PILToTensor()])
    try:
        ds = ImageFolder(root, transform=tf)
    except FileNotFoundError as e:
        raise DataNotFoundError(f"folder: {e}; sngan never downloads") from e
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    x, y = torch.stack(xs), torch.tensor(ys).long()
    n_test = max(1, int(round(test_fraction * len(x)))) if len(x) > 1 else 0
    trx, tr_y, tex, te_y = _split(x, y, n_test)
    return ImageData("folder", trx, trx, tr_y, tex, te_y, max(1, len(ds.classes)), source=root)


def load_data(name: str, root: str | None = None, img_size: int | None = None):
    """The data set `name` (one of DATASETS) as a Mixture or ImageData."""
    if name == "ring8":
        return ring8()
    if name == "grid25":
        return grid25()
    size = img_size or DEFAULT_IMG_SIZE.get(name, 32)
    if name == "digits":
        return digits(size)
    if name == "cifar10":
        return cifar10(root, size)
    if name == "stl10":
        return stl10(root, size)
    if name == "folder":
        return image_folder(root, size)
    raise ValueError(f"unknown data {name!r}: choose one of {', '.join(DATASETS)}")
