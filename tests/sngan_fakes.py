"""Tiny stand-ins for CIFAR-10 and STL-10 in torchvision's on-disk formats, and an ImageFolder, for the sngan
tests (the real data sets cannot be downloaded here, and sngan never downloads)."""

import os
import pickle

import numpy as np


def write_fake_cifar10(root, n_per_batch: int = 8, seed: int = 0) -> str:
    """ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, pickled as CIFAR-10's python version."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(i % 10) for i in range(n_per_batch)]
        data = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return str(root)


def write_fake_stl10(root, n: int = 6, seed: int = 0) -> str:
    """ROOT/stl10_binary/{train,test}_{X,y}.bin and unlabeled_X.bin: uint8 images 3x96x96 (column-major), labels
    1..10."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "test", "unlabeled"):
        rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8).tofile(os.path.join(folder, f"{split}_X.bin"))
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
    return str(root)


def write_fake_image_folder(root, n_per_class: int = 5, classes=("cats", "dogs"), size=(20, 14), seed=0) -> str:
    """ROOT/CLASS/img_K.png, RGB, non-square (the loader resizes and centre-crops)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for k in range(n_per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"img_{k}.png"))
    return str(root)
