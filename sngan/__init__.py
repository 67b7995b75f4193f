"""sngan: GAN training on top of sn_ext (an application of the library; sn_ext never imports it).

    python -m sngan.train                      # the default: a small SN-GAN on the ring of 8 Gaussians, ~2 min on CPU
    python -m sngan.train --data digits --loss hinge --sn sn_ext --steps 5000
    torchrun --nproc_per_node 2 -m sngan.train --data ring8     # DDP: gloo on CPU, nccl on GPU
    python -m sngan.experiments                # the results tables in docs/gan_results.md

Modules: models (MLP, SN-GAN standard CNN and ResNet G/D, `apply_spectral_norm`), losses (hinge, non-saturating,
WGAN-GP, the seed's siamese/triplet loss and its variants), data (2-D mixtures, scikit-learn digits, CIFAR-10 /
STL-10 / image folders from local files only), metrics (mixture modes / high quality, classifier FID / KID /
precision / recall / density / coverage), config (the Config, the presets, the CLI's flags), checkpoint (save,
bit-exact resume), step (one D and one G update, also timed by benchmarks/gan_step.py), evaluate (samples, metrics
during training), sigma_log (D's sigmas and spectral reports, logged and plotted), ddp (the process group, the
ranks' consistency check), train (the CLI and the loop), experiments (the results script).
"""
