"""sngan training: the CLI end to end, every data set with every architecture for a few steps, bit-exact resume on
CPU, and a 2-process DDP run (gloo) whose ranks end with identical weights and spectral-norm buffers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from sngan_fakes import write_fake_cifar10, write_fake_image_folder, write_fake_stl10

from sngan.data import DataNotFoundError
from sngan.train import Config, main, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("classifier-cache"))


def tiny(out, cache_dir, **kw) -> Config:
    base = dict(
        steps=2,
        width=1 / 16,
        batch_size=8,
        z_dim=8,
        eval_samples=40,
        progress=False,
        out=str(out),
        metrics_cache=cache_dir,
        classifier_epochs=1,
        embed_dim=4,
        sample_every=0,
    )
    base.update(kw)
    return Config(**base)


def test_cli_writes_samples_metrics_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--steps", "20", "--out", str(out), "--no-progress", "--batch-size", "32"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["data"] == "ring8" and m["config"]["sn"] == "sn_ext" and m["config"]["arch"] == "mlp"
    assert m["final"]["n_modes"] == 8 and 0 <= m["final"]["modes_covered"] <= 8
    assert m["train"]["steps"] == 20 and m["train"]["steps_per_s"] > 0
    assert (out / "samples" / "final.png").stat().st_size > 1000 and (out / "checkpoint.pt").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # log_every 50: only the last step
    # D's spectral norms (sngan/sigma_log.py): every layer's sigma per log step, the report per evaluation, the plot
    rec = json.loads((out / "metrics.jsonl").read_text())
    names = [row["name"] for row in m["final"]["spectral_report"]]
    assert names and sorted(k for k in rec if k.startswith("sigma/")) == sorted(f"sigma/{n}" for n in names)
    assert all(row["operator_norm"] > 0 for row in m["final"]["spectral_report"]) and m["final"]["lipschitz_bound"] > 0
    assert (out / "sigma.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["steps"] == 20


def test_toy_preset_scales_the_mlp_discriminator_only():
    """The toy preset's D output scale (10: lets the hinge saturate under SN) reaches the MLP D; other archs get 1."""
    from sngan.config import resolve
    from sngan.models import build_models

    assert resolve(Config(data="ring8"), points=True).d_scale == 10.0
    assert resolve(Config(data="ring8", d_scale=1.0), points=True).d_scale == 1.0
    assert resolve(Config(data="digits", arch="cnn", preset="toy"), points=False).d_scale == 1.0
    x = torch.randn(5, 2)
    torch.manual_seed(0)
    _, D1 = build_models("mlp", (2,), z_dim=4, sn="none")
    torch.manual_seed(0)
    _, D10 = build_models("mlp", (2,), z_dim=4, sn="none", d_scale=10.0)
    torch.testing.assert_close(D10(x), 10 * D1(x))
    with pytest.raises(ValueError, match="mlp"):
        build_models("cnn", (1, 16, 16), z_dim=4, width=1 / 16, d_scale=10.0)


def test_steps_move_one_side_and_leave_frozen_parameters_trainable():
    """sngan.step (the loop's and benchmarks/gan_step.py's step): the D step updates D only; the G step updates G
    only, gives D's frozen parameters no gradient and leaves them trainable."""
    from sngan.losses import HingeLoss
    from sngan.models import build_models
    from sngan.step import d_step, g_step

    torch.manual_seed(0)
    G, D = build_models("mlp", (2,), z_dim=4, sn="torch")
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-2), torch.optim.Adam(D.parameters(), 1e-2)
    g0, d0 = [p.detach().clone() for p in G.parameters()], [p.detach().clone() for p in D.parameters()]
    d_loss, _ = d_step(G, D, HingeLoss(), opt_d, torch.randn(8, 2), torch.randn(8, 4))
    assert d_loss.ndim == 0 and all(p.grad is None for p in G.parameters())
    assert all(torch.equal(a, b) for a, b in zip(g0, G.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(d0, D.parameters()))
    d1, grads = [p.detach().clone() for p in D.parameters()], [p.grad.clone() for p in D.parameters()]
    g_loss = g_step(G, D, HingeLoss(), opt_g, torch.randn(8, 4), frozen=D.parameters())
    assert g_loss.ndim == 0 and all(p.requires_grad for p in D.parameters())
    assert all(torch.equal(a, b) for a, b in zip(d1, D.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, D.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(g0, G.parameters()))


IMAGE_DATA = {
    "digits": lambda tmp: None,
    "cifar10": lambda tmp: write_fake_cifar10(tmp / "c10", n_per_batch=4),
    "stl10": lambda tmp: write_fake_stl10(tmp / "stl", n=4),
    "folder": lambda tmp: write_fake_image_folder(tmp / "imgs", n_per_class=6),
}


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("data", list(IMAGE_DATA))
def test_image_data_with_every_arch(data, arch, tmp_path, cache):
    root = IMAGE_DATA[data](tmp_path)
    cfg = tiny(
        tmp_path / "run",
        cache,
        data=data,
        data_root=root,
        arch=arch,
        img_size=16 if data == "folder" else None,
        loss="nonsat",
        sn="sn_ext",
    )
    m = train(cfg)
    size = {"digits": 16, "cifar10": 32, "stl10": 48, "folder": 16}[data]
    assert m["final"]["fid"] >= 0 and 0 <= m["final"]["coverage"] <= 1
    assert "classifier_test_accuracy" in m["final"]
    from PIL import Image

    with Image.open(tmp_path / "run" / "samples" / "final.png") as im:
        assert im.size[0] >= size


@pytest.mark.parametrize("loss", ["hinge", "triplet_hinge"])
@pytest.mark.parametrize("data", ["ring8", "grid25"])
def test_mixtures(data, loss, tmp_path, cache):
    m = train(tiny(tmp_path, cache, data=data, loss=loss, steps=3, sn="torch"))
    assert m["final"]["n_modes"] == (8 if data == "ring8" else 25)


def _state(path):
    ck = torch.load(path, weights_only=False)
    return ck


def _assert_same_checkpoint(a, b):
    assert a["step"] == b["step"]
    for part in ("G", "D"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for part in ("opt_g", "opt_d"):
        sa, sb = a[part]["state"], b[part]["state"]
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), f"{part} state {i}.{k} differs"
    assert all(torch.equal(x, y) for x, y in zip(a["gen_states"], b["gen_states"]))


RESUME_CASES = {
    "ring8-mlp-wgan-gp": dict(data="ring8", arch="mlp", loss="wgan-gp", n_dis=2, lr_decay="linear"),
    "digits-resnet-triplet": dict(data="digits", arch="resnet", loss="triplet", triplet_g="anchor", n_dis=2),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_exact_on_cpu(case, tmp_path, cache):
    kw = dict(RESUME_CASES[case], steps=6, sn="sn_ext", device="cpu", eval_every=0)
    train(tiny(tmp_path / "straight", cache, **kw))
    train(tiny(tmp_path / "stopped", cache, stop_after=3, **kw))
    stopped = _state(tmp_path / "stopped" / "checkpoint.pt")
    assert stopped["step"] == 3
    train(Config(resume=str(tmp_path / "stopped"), progress=False))
    _assert_same_checkpoint(
        _state(tmp_path / "straight" / "checkpoint.pt"), _state(tmp_path / "stopped" / "checkpoint.pt")
    )
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["final"]
    b = json.loads((tmp_path / "stopped" / "metrics.json").read_text())["final"]
    a.pop("eval_seconds"), b.pop("eval_seconds")
    assert a == b


def test_resume_refuses_a_different_training_setup(tmp_path, cache):
    train(tiny(tmp_path, cache, steps=2))
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        main(["--resume", str(tmp_path), "--loss", "nonsat", "--no-progress"])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="never downloads"):
        main(["--data", "cifar10", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")])


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    # --standalone: torchrun picks a free port itself (a port chosen here could be taken before torchrun binds it).
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sngan.train",
        "--data",
        "digits",
        "--arch",
        "cnn",
        "--width",
        "0.0625",
        "--loss",
        "wgan-gp",
        "--steps",
        "4",
        "--n-dis",
        "2",
        "--sn",
        "sn_ext",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--eval-samples",
        "64",
        "--classifier-epochs",
        "1",
        "--metrics-cache",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    ddp = m["ddp"]
    # D's 7 convs + dense each have u and v. The run also covers the gradient penalty's double backward through
    # DDP and sn_ext, G's BatchNorm buffers, and rank 0 alone computing the image metrics (no collective there).
    assert ddp["world_size"] == 2 and ddp["n_sn_buffers"] == 16
    assert ddp["sn_buffers_identical"] and ddp["d_params_identical"] and ddp["g_params_identical"]
    assert m["train"]["world_size"] == 2 and m["train"]["steps"] == 4 and m["final"]["fid"] >= 0


def test_experiments_script_smoke(tmp_path):
    from sngan import experiments

    assert experiments.main(["--quick", "--no-digits", "--jobs", "1", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "table.md").read_text()
    assert "**ring8**" in md and "**grid25**" in md and md.count("| SN") == 6
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 8 and all(r["error"] is None for r in runs)
