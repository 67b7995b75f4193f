"""sngan models and losses: a few optimisation steps of every (architecture, loss, spectral norm) combination at
tiny sizes; spectral norm on every layer of D; the paper's shapes; the losses' values and the triplet loss's
expectation."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sngan.losses import LOSSES, TRIPLET_G, HingeLoss, NonSaturatingLoss, TripletLoss, WGANGPLoss, make_loss
from sngan.models import (
    SN_KINDS,
    CNNDiscriminator,
    CNNGenerator,
    ResNetDiscriminator,
    ResNetGenerator,
    apply_spectral_norm,
    build_models,
)

TINY = 1 / 16


def _shape(arch):
    return (2,) if arch == "mlp" else (1, 16, 16)


@pytest.mark.parametrize("sn", SN_KINDS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_every_combination_trains(arch, loss_name, sn):
    torch.manual_seed(0)
    loss = make_loss(loss_name, embed_dim=4, triplet_g="anchor" if loss_name == "triplet" else "seed")
    shape = _shape(arch)
    G, D = build_models(arch, shape, z_dim=8, width=TINY, out_dim=loss.out_dim, sn=sn)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    g_before = [p.clone() for p in G.parameters()]
    for _ in range(2):
        real = torch.randn(6, *shape, generator=gen).clamp(-1, 1)
        with torch.no_grad():
            fake = G(torch.randn(6, 8, generator=gen))
        assert fake.shape == real.shape
        ld, stats = loss.d_loss(D, real, fake, gen)
        assert torch.isfinite(ld) and all(torch.isfinite(v) for v in stats.values())
        opt_d.zero_grad()
        ld.backward()
        opt_d.step()
        lg, _ = loss.g_loss(D, G(torch.randn(6, 8, generator=gen)), real)
        assert torch.isfinite(lg)
        opt_g.zero_grad()
        lg.backward()
        opt_g.step()
    after = D.state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    if sn != "none":  # u, v moved with the weights
        assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith("._u"))
    assert any(not torch.equal(a, b) for a, b in zip(g_before, G.parameters()))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_spectral_norm_on_every_layer_of_d_only(arch):
    for kind in ("torch", "sn_ext", "sn_ext_grouped", "torch_converted"):
        G, D = build_models(arch, _shape(arch), z_dim=8, width=TINY, sn=kind)
        assert hasattr(D, "_sn_ext_group") == (kind == "sn_ext_grouped")
        layers = [m for m in D.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
        assert not any(parametrize.is_parametrized(m) for m in G.modules())
    _, D = build_models(arch, _shape(arch), z_dim=8, width=TINY, sn="none")
    assert not any(parametrize.is_parametrized(m) for m in D.modules())


def test_torch_and_sn_ext_give_the_same_discriminator():
    """Same init, same u/v draws, same state_dict keys: the D's agree on outputs (grouped sn_ext included)."""
    Ds = []
    for kind in ("torch", "sn_ext", "sn_ext_grouped", "torch_converted"):
        torch.manual_seed(1)
        _, D = build_models("cnn", (3, 32, 32), z_dim=8, width=TINY, sn=kind)
        Ds.append(D)
    assert list(Ds[0].state_dict()) == list(Ds[1].state_dict()) == list(Ds[2].state_dict())
    assert list(Ds[3].state_dict()) == list(Ds[0].state_dict())
    assert all(type(m).__module__.startswith("sn_ext") for m in Ds[3].modules() if "SpectralNorm" in type(m).__name__)
    x = torch.randn(4, 3, 32, 32)
    outs = [D(x) for D in Ds]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[3], outs[0], rtol=1e-5, atol=1e-6)
    Ds[1].load_state_dict(Ds[0].state_dict())  # a torch checkpoint loads into sn_ext


def test_apply_spectral_norm_covers_embedding_and_rejects_unknown():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.ConvTranspose2d(3, 2, 4))
    apply_spectral_norm(m, "sn_ext")
    assert all(parametrize.is_parametrized(layer, "weight") for layer in m)
    with pytest.raises(ValueError, match="unknown spectral norm"):
        apply_spectral_norm(nn.Linear(2, 2), "weight_norm")


@pytest.mark.parametrize("size", [32, 48])
def test_paper_shapes(size):
    z = torch.randn(2, 128)
    for Gc, Dc in ((CNNGenerator, CNNDiscriminator), (ResNetGenerator, ResNetDiscriminator)):
        G, D = Gc(128, size, 3, width=TINY), Dc(size, 3, width=TINY, out_dim=5)
        x = G(z)
        assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
        assert D(x).shape == (2, 5)
    # the paper's full widths: parameter counts of the 32x32 ResNet (G 4.3M, D 1.1M, as in torch-mimicry)
    G, D = ResNetGenerator(128, 32, 3), ResNetDiscriminator(32, 3)
    assert 4.2e6 < sum(p.numel() for p in G.parameters()) < 4.4e6
    assert 1.0e6 < sum(p.numel() for p in D.parameters()) < 1.1e6


def test_hinge_and_nonsat_values():
    D = nn.Identity()
    real, fake = torch.tensor([[2.0], [0.5]]), torch.tensor([[-2.0], [0.0]])
    ld, _ = HingeLoss().d_loss(D, real, fake)
    assert ld.item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert HingeLoss().g_loss(D, fake)[0].item() == pytest.approx(1.0)
    ld, _ = NonSaturatingLoss().d_loss(D, real, fake)
    sp = torch.nn.functional.softplus
    assert ld.item() == pytest.approx((sp(-real).mean() + sp(fake).mean()).item())
    assert NonSaturatingLoss().g_loss(D, fake)[0].item() == pytest.approx(sp(-fake).mean().item())


def test_wgan_gp_penalty_vanishes_for_a_unit_gradient_critic():
    D = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        D.weight.copy_(torch.tensor([[0.6, 0.8, 0.0]]))
    real, fake = torch.randn(16, 3), torch.randn(16, 3)
    loss, stats = WGANGPLoss().d_loss(D, real, fake, torch.Generator().manual_seed(0))
    assert stats["gp"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx((D(fake).mean() - D(real).mean()).item(), abs=1e-6)


def test_triplet_loss_expectation_matches_the_moment_formula():
    """Without the hinge, E L_D = tr S_r - tr S_g - ||mu_r - mu_g||^2 + alpha (reference notes, derived)."""
    g = torch.Generator().manual_seed(0)
    n, k, alpha = 200_000, 3, 0.7
    mu_r, mu_g = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 2.0])
    s_r, s_g = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.5, 0.3, 0.2])
    real = (mu_r + s_r * torch.randn(n, k, generator=g)).double()
    fake = (mu_g + s_g * torch.randn(n, k, generator=g)).double()
    loss = TripletLoss(hinge=False, alpha=alpha, out_dim=k)
    ld, _ = loss.d_loss(nn.Identity(), real, fake)
    expected = (s_r**2).sum() - (s_g**2).sum() - ((mu_r - mu_g) ** 2).sum() + alpha
    assert ld.item() == pytest.approx(expected.item(), abs=0.05)
    # the seed's G loss: E ||e_g||^2 = ||mu_g||^2 + tr S_g, which G lowers by shrinking its spread (collapse)
    lg, _ = loss.g_loss(nn.Identity(), fake)
    assert lg.item() == pytest.approx(((mu_g**2).sum() + (s_g**2).sum()).item(), rel=0.01)
    # with the hinge the loss is non-negative and at most the un-hinged per-triplet mean's positive part
    lh, _ = TripletLoss(hinge=True, alpha=alpha, out_dim=k).d_loss(nn.Identity(), real, fake)
    assert lh.item() >= max(ld.item(), 0.0)


@pytest.mark.parametrize("g_mode", TRIPLET_G)
def test_triplet_generator_losses(g_mode):
    loss = TripletLoss(out_dim=2, g_mode=g_mode)
    real = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    fake = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    lg, _ = loss.g_loss(nn.Identity(), fake, real)
    expected = {"seed": 4.0, "seed_max": -4.0, "anchor": (5.0 + 13.0) / 2, "mean": 4.0 + 4.0}[g_mode]
    assert lg.item() == pytest.approx(expected)
    if g_mode in ("anchor", "mean"):
        with pytest.raises(ValueError, match="needs a real batch"):
            loss.g_loss(nn.Identity(), fake, None)
