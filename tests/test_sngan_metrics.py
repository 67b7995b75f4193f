"""sngan metrics: mixtures (a perfect sampler covers every mode at ~99% high quality, a collapsed one covers 1),
PRDC and FID / KID sanity, the digits classifier, its cache, and Inception metrics reported as not available."""

import pytest
import torch

from sngan.data import digits, grid25, ring8
from sngan.metrics import ImageMetrics, feature_metrics, get_classifier, inception_metrics, mixture_metrics, prdc


@pytest.mark.parametrize("make", [ring8, grid25])
def test_perfect_sampler_covers_all_modes(make):
    m = make()
    out = mixture_metrics(m.sample(2500, torch.Generator().manual_seed(0)), m)
    assert out["modes_covered"] == len(m.modes)
    # P(|N(0, s^2 I_2)| < 3 s) = 1 - exp(-9/2) = 98.9%
    assert 98.0 < out["high_quality_pct"] <= 100.0
    assert out["mode_kl"] < 0.05


def test_collapsed_and_off_mode_samplers():
    m = ring8()
    g = torch.Generator().manual_seed(0)
    collapsed = m.modes[3] + 0.01 * torch.randn(2500, 2, generator=g)
    out = mixture_metrics(collapsed, m)
    assert out["modes_covered"] == 1 and out["high_quality_pct"] > 98.0
    assert out["mode_kl"] == pytest.approx(torch.log(torch.tensor(8.0)).item())
    blurry = m.sample(2500, g) + 0.3 * torch.randn(2500, 2, generator=g)
    out = mixture_metrics(blurry, m)
    assert out["high_quality_pct"] < 5.0
    nothing = mixture_metrics(torch.zeros(100, 2), m)
    assert nothing["modes_covered"] == 0 and nothing["high_quality_pct"] == 0 and nothing["mode_kl"] is None


def test_prdc_sanity():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(800, 8, generator=g)
    same = prdc(real, torch.randn(800, 8, generator=g))
    assert same["precision"] > 0.7 and same["recall"] > 0.7 and 0.7 < same["density"] < 1.3
    assert same["coverage"] > 0.9
    far = prdc(real, torch.randn(800, 8, generator=g) + 10)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    narrow = prdc(real, 0.1 * torch.randn(800, 8, generator=g))  # a collapsed generator: precise, no recall
    assert narrow["precision"] > 0.9 and narrow["recall"] < 0.2 and narrow["coverage"] < 0.2


def test_fid_and_kid_in_a_feature_space():
    class Net(torch.nn.Module):  # "features" = the flattened uint8 image, as float64
        num_features = 4

        def forward(self, x):
            return x.flatten(1).double()

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 128, (600, 1, 2, 2), generator=g, dtype=torch.uint8)
    same = feature_metrics(real, torch.randint(0, 128, (600, 1, 2, 2), generator=g, dtype=torch.uint8), Net())
    shifted = feature_metrics(real, real + 50, Net())
    assert 0 <= same["fid"] < 0.01 * shifted["fid"]
    assert shifted["fid"] == pytest.approx(4 * 50**2, rel=0.01)  # same covariance: FID = ||mu_r - mu_g||^2
    assert shifted["kid"] > 1000 * abs(same["kid"])


def test_digits_classifier_is_accurate_and_cached(tmp_path):
    d = digits(8)  # 8x8: the classifier trains 4x faster than at 16x16
    clf, info = get_classifier(d, str(tmp_path), epochs=6, log=lambda *a: None)
    assert info["test_accuracy"] > 0.85
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    clf2, info2 = get_classifier(d, str(tmp_path), epochs=6, log=lambda *a: None)  # from the cache
    assert info2 == info
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), clf2.state_dict().values()))
    metrics = ImageMetrics(d, str(tmp_path), epochs=6)
    real_like = metrics(d.test_x)  # held-out real digits score well; noise scores badly
    noise = metrics(torch.rand(297, 1, 8, 8) * 2 - 1)
    assert real_like["classifier_test_accuracy"] == info["test_accuracy"]
    assert noise["fid"] > 5 * real_like["fid"] and noise["precision"] < real_like["precision"]
    assert real_like["coverage"] > 0.5


def test_inception_metrics_without_weights_say_why():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    out = inception_metrics(x, x, None)
    assert out["available"] is False and "cannot be downloaded" in out["reason"]
    out = inception_metrics(x, x, "/nonexistent/pt_inception.pth")
    assert out["available"] is False and "not found" in out["reason"]
