"""DistributedDataParallel: two CPU processes (gloo), buffers broadcast from rank 0 before every forward, and the
GAN step D(real), D(fake), one backward. No in-place error (pytorch issues 66363, 68327, 22095, 175024: GAN code
sets broadcast_buffers=False to dodge them), the same u, v and weights on both ranks after every run, and the same
numbers as torch's own spectral norm under the same DDP run.

The workers run in spawned processes (tests/spawned.py; the compiled kernels or, with SN_EXT_DISABLE_EXT=1, the
fallback: the environment is inherited).
"""

import inspect
import os

import pytest
import spawned
import torch
import torch.nn.functional as F
from helpers import TOL, assert_rel
from torch import nn

WORLD = 2
STEPS = 4
TIME_LIMIT_S = 120  # a hang (a collective that never completes) fails the test instead of blocking CI
KINDS = ["sn_ext", "sn_ext_legacy", "torch", "torch_legacy"]


def _register(kind):
    import torch.nn.utils as U
    from torch.nn.utils import parametrizations as P

    import sn_ext

    return {
        "sn_ext": sn_ext.spectral_norm,
        "sn_ext_legacy": sn_ext.legacy.spectral_norm,
        "torch": P.spectral_norm,
        "torch_legacy": U.spectral_norm,
    }[kind]


def _discriminator(kind: str) -> nn.Module:
    apply = _register(kind)
    torch.manual_seed(0)
    return nn.Sequential(
        apply(nn.Conv2d(3, 6, 3)),
        nn.LeakyReLU(0.2),
        apply(nn.ConvTranspose2d(6, 4, 2, stride=2)),
        nn.LeakyReLU(0.2),  # dim=1
        nn.Flatten(),
        apply(nn.Linear(4 * 8 * 8, 1)),
    )


def _sync_buffers_kwargs() -> dict:
    # torch 2.14 renamed broadcast_buffers (still accepted, with a FutureWarning) to forward_sync_buffers.
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": True} if "forward_sync_buffers" in params else {"broadcast_buffers": True}


def _worker(rank: int, world: int, port: int, out_dir: str, build=_discriminator, kinds=tuple(KINDS)) -> None:
    """Trains build(kind) under DDP for each of `kinds` and saves its state dict (tests/test_convert.py passes its
    own `build`: a module-level function, which spawn pickles by name)."""
    with spawned.worker_process(rank, world, port, out_dir):
        for kind in kinds:
            D = build(kind)
            ddp = nn.parallel.DistributedDataParallel(D, **_sync_buffers_kwargs())
            if rank == 1:  # out of step with rank 0: the broadcast before each forward must undo this
                with torch.no_grad():
                    for _name, buf in D.named_buffers():
                        buf.copy_(F.normalize(torch.randn_like(buf), dim=0))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data: gradients differ per rank
            for _ in range(STEPS):
                real, fake = torch.randn(2, 4, 3, 6, 6, generator=gen)
                loss = F.softplus(-ddp(real)).mean() + F.softplus(ddp(fake)).mean()  # two calls, one backward
                opt.zero_grad()
                loss.backward()
                opt.step()
            torch.save(
                {k: v.detach().clone() for k, v in D.state_dict().items()},
                os.path.join(out_dir, f"{kind}_rank{rank}.pt"),
            )


def run_ddp(out_dir: str, build=_discriminator, kinds=tuple(KINDS)) -> dict:
    """Runs _worker on WORLD spawned processes: {(kind, rank): state dict after the steps}."""
    spawned.run(_worker, (build, kinds), WORLD, out_dir, TIME_LIMIT_S)
    return {
        (kind, rank): torch.load(os.path.join(out_dir, f"{kind}_rank{rank}.pt"), weights_only=True)
        for kind in kinds
        for rank in range(WORLD)
    }


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory):
    return run_ddp(str(tmp_path_factory.mktemp("ddp")))


@pytest.mark.parametrize("kind", KINDS)
def test_ddp_two_calls_one_backward_same_state_on_every_rank(ddp_states, kind):
    rank0, rank1 = ddp_states[kind, 0], ddp_states[kind, 1]
    assert list(rank0) == list(rank1)
    initial = _discriminator(kind).state_dict()
    vectors = [k for k in rank0 if k.endswith(("_u", "_v"))]
    assert len(vectors) == 6
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
        assert torch.isfinite(rank0[key]).all(), key
        if rank0[key].numel() > 1:  # a 1-row weight's u is always [1]
            assert not torch.equal(rank0[key], initial[key]), f"{key} did not train"
    for key in vectors:
        assert abs(rank0[key].double().norm().item() - 1) < 1e-5, f"{key} is no longer a unit vector"


@pytest.mark.parametrize("kind,oracle", [("sn_ext", "torch"), ("sn_ext_legacy", "torch_legacy")])
def test_ddp_matches_torch_spectral_norm(ddp_states, kind, oracle):
    ours, theirs = ddp_states[kind, 0], ddp_states[oracle, 0]
    assert list(ours) == list(theirs)
    for key in theirs:
        # Registration's warm-up rounds u, v differently (sn_ext sums in double), and SGD carries that on: a few
        # float32 ulps per step, hence 10x the float32 tolerance.
        assert_rel(ours[key], theirs[key], 10 * TOL[torch.float32], key)
