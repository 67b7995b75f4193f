"""Section "gan": SN-GAN training steps (sngan.models, 32x32 images, hinge loss, random data) with spectral norm
on D by each of sngan's kinds: none, torch, sn_ext (per layer), sn_ext_grouped (sn_ext.grouped_spectral_norm) and
torch_converted (torch's, swapped by sn_ext.convert_spectral_norm: the swap costs what sn_ext per layer costs).

Steps: "D step" (G makes a fake batch without autograd; one forward of D on real and fake, backward, Adam step),
"G step" (G makes a batch, D scores it, backward through D into G, Adam step) and "iteration" (n_dis = 5 D steps
and one G step, as in the paper). Eager and torch.compile'd G and D (the optimizers stay eager; under compile
grouped mode computes each layer in the graph, see sn_ext/nn/grouped.py). Real batches are rotated; z is drawn
each step. Peak memory: see benchmarks/memory.py; the iteration's is the larger of its two steps'.

The D and G steps are sngan's own (sngan.step.d_step / g_step, as sngan.train's loop runs them), so that this
times the step that trains.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sngan import step as sngan_step
from sngan.losses import HingeLoss
from sngan.models import SN_KINDS, build_models

from .memory import peak_mib
from .records import failure, log, timing_columns
from .timing import Step, measure

ARCHS = ("cnn", "resnet")
STEPS = ("D step", "G step", "iteration")
N_DIS = 5
Z_DIM = 128
REAL_BATCHES = 3
COLUMNS = timing_columns(["arch", "sn", "mode", "step", "batch", "width"], ["peak_mib"], unit="ms")


class Trainer:
    def __init__(self, arch: str, sn: str, device: torch.device, batch: int, width: float, compiled: bool):
        torch.manual_seed(0)
        G, D = build_models(arch, (3, 32, 32), z_dim=Z_DIM, width=width, sn=sn)
        G, D = G.to(device), D.to(device)
        self.opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.0, 0.9))
        self.opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.0, 0.9))
        self.G, self.D = (torch.compile(G), torch.compile(D)) if compiled else (G, D)
        self.reals = [torch.rand(batch, 3, 32, 32, device=device) * 2 - 1 for _ in range(REAL_BATCHES)]
        self.batch, self.device, self.calls, self.loss = batch, device, 0, HingeLoss()

    def _z(self) -> torch.Tensor:
        return torch.randn(self.batch, Z_DIM, device=self.device)

    def d_step(self) -> None:
        self.calls += 1
        sngan_step.d_step(self.G, self.D, self.loss, self.opt_d, self.reals[self.calls % REAL_BATCHES], self._z())

    def g_step(self) -> None:
        # Unlike the training loop, D's parameters stay trainable here (the backward also computes their gradients,
        # which no optimiser uses): the G step these records have always measured.
        sngan_step.g_step(self.G, self.D, self.loss, self.opt_g, self._z())

    def iteration(self) -> None:
        for _ in range(N_DIS):
            self.d_step()
        self.g_step()


def run(
    archs: list[str],
    device: torch.device,
    *,
    batch: int,
    width: float,
    modes: list[str],
    budget_s: float,
    write: Callable[[dict], None],
) -> None:
    """Every (mode, arch, sn kind): eager first, so that a run stopped by a timeout has those."""
    for mode in modes:
        for arch in archs:
            for sn in SN_KINDS:
                base = {"arch": arch, "sn": sn, "mode": mode, "batch": batch, "width": width}
                try:
                    _measure(Trainer(arch, sn, device, batch, width, mode == "compiled"), base, budget_s, write)
                except Exception as error:  # e.g. torch.compile without a working compiler
                    note = failure(error)
                    for step in STEPS:
                        write({**base, "step": step, "status": "failed", "note": note})
                    log(f"  gan {mode} {arch} sn={sn}: failed ({note})")


def _measure(trainer: Trainer, base: dict, budget_s: float, write: Callable[[dict], None]) -> None:
    peaks = {}
    for step, fn, warmup in (
        ("D step", trainer.d_step, 2),
        ("G step", trainer.g_step, 2),
        ("iteration", trainer.iteration, 0),
    ):
        t = measure([Step(fn)], trainer.device, budget_s=budget_s, warmup=warmup, min_reps=1)
        if step == "iteration":
            peak = max(peaks.values()) if None not in peaks.values() else None
        else:
            peak = peaks[step] = peak_mib(fn, trainer.device)
        write(
            {
                **base,
                "step": step,
                "median_ms": round(t["median_us"] / 1e3, 3),
                "p20_ms": round(t["p20_us"] / 1e3, 3),
                "p80_ms": round(t["p80_us"] / 1e3, 3),
                "reps": t["reps"],
                "repeats": t["repeats"],
                "rotation": REAL_BATCHES,
                "spread": round(t["spread"], 3),
                "peak_mib": "" if peak is None else round(peak, 1),
                "status": "ok",
            }
        )
        log(
            f"  gan {base['mode']} {base['arch']:6} sn={base['sn']:15} {step:9} {t['median_us'] / 1e3:9.2f} ms"
            + ("" if peak is None else f"  peak {peak:7.1f} MiB")
        )
