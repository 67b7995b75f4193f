"""GAN losses. Each loss object runs D itself, so every D step is ONE forward of D on cat(real, fake[, interp])
(no BN in any D, so batching them together changes nothing) and one backward, which is also what DDP wants.

    loss.d_loss(D, real, fake, gen) -> (scalar to minimise over D, stats)
    loss.g_loss(D, fake, real)      -> (scalar to minimise over G, stats)

`gen` is the torch.Generator of the training loop (the only randomness a loss draws: WGAN-GP's interpolation
weights), so a resumed run draws the same numbers. `out_dim` is what D must output: 1, or k for the triplet loss.

Losses (D(x) is a logit / critic value, or an embedding e(x) in R^k for the triplet family):

- hinge (the SN-GAN paper's best): D minimises E relu(1 - D(x)) + E relu(1 + D(G(z))); G minimises -E D(G(z)).
- nonsat ("naive GAN" of the seed, non-saturating G): D maximises E log sigmoid D(x) + E log(1 - sigmoid D(G(z)))
  (i.e. minimises the binary cross-entropy); G minimises -E log sigmoid D(G(z)).
- wgan-gp: D minimises E D(G(z)) - E D(x) + lambda E (||grad_x D(x_hat)|| - 1)^2, x_hat uniformly between paired
  real and fake samples (lambda = 10); G minimises -E D(G(z)).
- triplet / triplet_hinge (the seed's siamese loss): see `TripletLoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("hinge", "nonsat", "wgan-gp", "triplet", "triplet_hinge")
TRIPLET_G = ("seed", "seed_max", "anchor", "mean")


def _d_forward(D: nn.Module, *batches: torch.Tensor) -> list[torch.Tensor]:
    out = D(torch.cat(batches))
    return list(out.split([b.shape[0] for b in batches]))


class GANLoss:
    name = ""
    out_dim = 1
    needs_real_in_g = False

    def d_loss(self, D, real, fake, gen=None):
        raise NotImplementedError

    def g_loss(self, D, fake, real=None):
        raise NotImplementedError


class HingeLoss(GANLoss):
    """D: E relu(1 - D(x)) + E relu(1 + D(G(z))). G: -E D(G(z))."""

    name = "hinge"

    def d_loss(self, D, real, fake, gen=None):
        d_real, d_fake = _d_forward(D, real, fake)
        loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        return loss, {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}

    def g_loss(self, D, fake, real=None):
        return -D(fake).mean(), {}


class NonSaturatingLoss(GANLoss):
    """D: -E log sigmoid D(x) - E log(1 - sigmoid D(G(z))) (binary cross-entropy on logits).
    G: -E log sigmoid D(G(z)) (the non-saturating G loss of Goodfellow et al., used by the SN-GAN paper)."""

    name = "nonsat"

    def d_loss(self, D, real, fake, gen=None):
        d_real, d_fake = _d_forward(D, real, fake)
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        return loss, {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}

    def g_loss(self, D, fake, real=None):
        return F.softplus(-D(fake)).mean(), {}


class WGANGPLoss(GANLoss):
    """Critic D: E D(G(z)) - E D(x) + lam * E (||grad D(x_hat)||_2 - 1)^2 with x_hat = eps x + (1 - eps) G(z),
    eps ~ U(0, 1) per sample (Gulrajani et al. 2017). G: -E D(G(z)). The penalty needs the gradient of D's
    output with respect to its input with create_graph=True: a double backward through spectral norm."""

    name = "wgan-gp"

    def __init__(self, lam: float = 10.0) -> None:
        self.lam = lam

    def d_loss(self, D, real, fake, gen=None):
        n = min(real.shape[0], fake.shape[0])
        eps = torch.rand(n, *([1] * (real.dim() - 1)), generator=gen).to(real)  # drawn on the CPU generator
        x_hat = (eps * real[:n] + (1 - eps) * fake[:n]).requires_grad_(True)
        d_real, d_fake, d_hat = _d_forward(D, real, fake, x_hat)
        (grad,) = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)
        gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        wdist = d_real.mean() - d_fake.mean()
        return -wdist + self.lam * gp, {"wdist": wdist.detach(), "gp": gp.detach()}

    def g_loss(self, D, fake, real=None):
        return -D(fake).mean(), {}


class TripletLoss(GANLoss):
    """The seed's siamese / triplet discriminator (seed_exam_answer.md, part b). D maps a sample to an embedding
    e(.) in R^k. Triplets (x, y, G(z)): x and y real, distinct samples of the batch (y is the batch rolled by one,
    so no extra D forward is needed; the seed's "drawback" of a third forward goes away), G(z) fake.

    D minimises, per triplet, t = ||e(x) - e(y)||^2 - ||e(x) - e(G(z))||^2 + alpha:
      - hinge=False (loss "triplet", the seed's L_D):  E t. Its expectation is
        tr Sigma_r - tr Sigma_g - ||mu_r - mu_g||^2 + alpha (mu, Sigma: mean and covariance of real / fake
        embeddings): D is rewarded for spreading fake embeddings and pulling real ones together *without bound*,
        so an unconstrained D diverges; spectral norm (a Lipschitz bound) is what keeps it finite.
      - hinge=True (loss "triplet_hinge", the triplet loss of the seed's part 3): E [t]_+, which stops pushing a
        triplet once the fake sits alpha further from the anchor than the positive does (FaceNet-style margin).

    G minimises, by `g_mode`:
      - "seed": ||e(G(z))||^2, as the seed writes L_G. E = ||mu_g||^2 + tr Sigma_g: it pulls fake embeddings to
        the origin and shrinks their spread (rewards collapse); it points at the real data only if D happens to
        embed real samples near 0.
      - "seed_max": -||e(G(z))||^2, the seed's prose ("G tries to maximise ||D(G(z))||"): pushes fakes out to
        large norms, bounded only by D's Lipschitz constant.
      - "anchor": ||e(x) - e(G(z))||^2, the term D maximises (the minimax counterpart): pulls every fake embedding
        towards real ones; E = ||mu_r - mu_g||^2 + tr Sigma_r + tr Sigma_g, still rewards shrinking tr Sigma_g.
      - "mean": ||mean e(x) - mean e(G(z))||^2, feature matching on D's embedding (Salimans et al. 2016): matches
        first moments only, with no pull towards collapse.
    """

    def __init__(self, hinge: bool = False, alpha: float = 1.0, out_dim: int = 16, g_mode: str = "seed") -> None:
        if g_mode not in TRIPLET_G:
            raise ValueError(f"unknown triplet G loss {g_mode!r}: choose one of {', '.join(TRIPLET_G)}")
        self.hinge, self.alpha, self.out_dim, self.g_mode = hinge, alpha, out_dim, g_mode
        self.name = "triplet_hinge" if hinge else "triplet"
        self.needs_real_in_g = g_mode in ("anchor", "mean")

    def triplet_terms(self, e_x: torch.Tensor, e_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||e_x - e_y||^2, ||e_x - e_g||^2) per triplet, with y = x rolled by one within the batch."""
        n = min(e_x.shape[0], e_g.shape[0])
        e_x, e_g = e_x[:n], e_g[:n]
        e_y = e_x.roll(1, dims=0)
        return (e_x - e_y).pow(2).sum(1), (e_x - e_g).pow(2).sum(1)

    def d_loss(self, D, real, fake, gen=None):
        e_x, e_g = _d_forward(D, real, fake)
        pos, neg = self.triplet_terms(e_x, e_g)
        t = pos - neg + self.alpha
        loss = F.relu(t).mean() if self.hinge else t.mean()
        return loss, {"d_pos": pos.mean().detach(), "d_neg": neg.mean().detach()}

    def g_loss(self, D, fake, real=None):
        if self.g_mode in ("seed", "seed_max"):
            sq = D(fake).pow(2).sum(1).mean()
            return (sq if self.g_mode == "seed" else -sq), {}
        if real is None:
            raise ValueError(f"triplet G loss {self.g_mode!r} needs a real batch")
        e_g, e_x = _d_forward(D, fake, real)
        e_x = e_x.detach()
        if self.g_mode == "anchor":
            n = min(e_x.shape[0], e_g.shape[0])
            return (e_x[:n] - e_g[:n]).pow(2).sum(1).mean(), {}
        return (e_x.mean(0) - e_g.mean(0)).pow(2).sum(), {}


def make_loss(
    name: str, *, alpha: float = 1.0, embed_dim: int = 16, triplet_g: str = "seed", gp_lambda: float = 10.0
) -> GANLoss:
    if name == "hinge":
        return HingeLoss()
    if name == "nonsat":
        return NonSaturatingLoss()
    if name == "wgan-gp":
        return WGANGPLoss(gp_lambda)
    if name in ("triplet", "triplet_hinge"):
        return TripletLoss(hinge=(name == "triplet_hinge"), alpha=alpha, out_dim=embed_dim, g_mode=triplet_g)
    raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
