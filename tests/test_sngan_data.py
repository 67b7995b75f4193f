"""sngan data: the mixtures' modes, scikit-learn digits, CIFAR-10 / STL-10 / ImageFolder read from local files in
torchvision's formats, and a clear, immediate error (never a download) when files are missing."""

import math
import time

import pytest
import torch
from sngan_fakes import write_fake_cifar10, write_fake_image_folder, write_fake_stl10

from sngan.data import DataNotFoundError, digits, grid25, load_data, ring8, to_float, to_uint8


def test_ring8_has_eight_distinct_modes_on_the_unit_circle():
    m = ring8()
    assert m.modes.shape == (8, 2) and m.sigma == 0.01
    assert torch.allclose(m.modes.norm(dim=1), torch.ones(8))
    d = torch.cdist(m.modes, m.modes) + 10 * torch.eye(8)
    assert d.min() > 2 * math.sin(math.pi / 8) - 1e-5  # neighbours 45 degrees apart: no repeated mode


def test_grid25_modes_and_sampling():
    m = grid25()
    assert m.modes.shape == (25, 2) and m.sigma == 0.05
    assert sorted(set(m.modes[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    x = m.sample(10000, torch.Generator().manual_seed(0))
    off = (x - m.modes[torch.cdist(x, m.modes).argmin(1)]).std()
    assert abs(off.item() - 0.05) < 0.005
    x2 = m.sample(10000, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # the caller's generator decides everything


def test_digits():
    d = digits(16)
    assert d.images.shape == (1500, 1, 16, 16) and d.images.dtype == torch.uint8
    assert d.test_x.shape == (297, 1, 16, 16) and d.num_classes == 10
    assert set(d.train_y.unique().tolist()) == set(range(10))
    x = d.sample(32, torch.Generator().manual_seed(0))
    assert x.shape == (32, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(to_float(d.images[:5])), d.images[:5])
    assert digits(8).images.shape[-1] == 8


def test_cifar10_from_local_files(tmp_path):
    root = write_fake_cifar10(tmp_path)
    d = load_data("cifar10", root)
    assert d.images.shape == (40, 3, 32, 32) and d.test_x.shape == (8, 3, 32, 32)
    assert d.train_y.tolist()[:10] == list(range(8)) + [0, 1]
    # the folder itself works as --data-root too, and other sizes resize
    assert load_data("cifar10", str(tmp_path / "cifar-10-batches-py"), img_size=16).images.shape == (40, 3, 16, 16)


def test_stl10_from_local_files(tmp_path):
    root = write_fake_stl10(tmp_path)
    d = load_data("stl10", root)
    assert d.images.shape == (12, 3, 48, 48)  # train + unlabeled, 96 -> 48
    assert d.train_x.shape == (6, 3, 48, 48) and d.train_y.tolist() == [0, 1, 2, 3, 4, 5]


def test_image_folder(tmp_path):
    root = write_fake_image_folder(tmp_path / "imgs")
    d = load_data("folder", root, img_size=8)
    assert d.images.shape[1:] == (3, 8, 8) and len(d.images) + len(d.test_x) == 10 and d.num_classes == 2


@pytest.mark.parametrize("name", ["cifar10", "stl10", "folder"])
def test_missing_data_fails_at_once_without_downloading(name, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def no_download(*a, **k):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(tvu, "download_url", no_download)
    monkeypatch.setattr(tvu, "download_and_extract_archive", no_download)
    t = time.time()
    with pytest.raises(DataNotFoundError, match="never downloads"):
        load_data(name, str(tmp_path / "nothing-here"))
    with pytest.raises(DataNotFoundError, match="--data-root"):
        load_data(name, None)
    if name != "folder":
        (tmp_path / "empty").mkdir()
        with pytest.raises(DataNotFoundError, match="missing"):
            load_data(name, str(tmp_path / "empty"))
    assert time.time() - t < 5
