"""The pure-PyTorch fallback: with SN_EXT_DISABLE_EXT=1 the compiled library is not loaded, every op still runs
(through sn_ext.reference) and still matches torch; sn_ext.info() says which backend serves the CPU."""

import os
import subprocess
import sys
import textwrap

import torch

import sn_ext
from sn_ext import _library

FALLBACK_SCRIPT = textwrap.dedent("""
    import copy, torch, sn_ext
    from torch import nn
    from torch.nn.utils import parametrizations as P

    info = sn_ext.info()
    assert info["compiled_library"]["loaded"] is False, info
    assert "SN_EXT_DISABLE_EXT" in info["compiled_library"]["reason"], info
    assert info["backends"]["cpu"]["usable"] is False, info
    assert info["backends"]["reference"]["usable"] is True, info
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("sn_ext::spectral_normalize_", "CPU")

    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3).double()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1); P.spectral_norm(theirs)
    torch.manual_seed(1); sn_ext.spectral_norm(ours)
    sn_t, sn_o = theirs.parametrizations.weight[0], ours.parametrizations.weight[0]
    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    assert rel(sn_o._u, sn_t._u) < 1e-12 and rel(sn_o._v, sn_t._v) < 1e-12
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    for step in range(3):
        out_t, out_o = theirs(x), ours(x)
        assert rel(out_o, out_t) < 1e-12, step
        assert rel(sn_o._u, sn_t._u) < 1e-12 and rel(sn_o._v, sn_t._v) < 1e-12, step
    g = torch.randn_like(out_t)
    (out_t * g).sum().backward()
    (out_o * g).sum().backward()
    w_t, w_o = theirs.parametrizations.weight.original, ours.parametrizations.weight.original
    assert rel(w_o.grad, w_t.grad) < 1e-12
    print("FALLBACK-OK")
""")


def test_fallback_subprocess_matches_torch():
    env = dict(os.environ, SN_EXT_DISABLE_EXT="1")
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FALLBACK-OK" in result.stdout


def test_info_reports_cpu_backend():
    info = sn_ext.info()
    assert info["sn_ext"] == sn_ext.__version__ and info["torch"] == torch.__version__
    cpu = info["backends"]["cpu"]
    assert set(cpu) == {"usable", "reason"} and cpu["reason"]
    assert info["backends"]["reference"]["usable"] is True
    disabled = os.environ.get("SN_EXT_DISABLE_EXT") == "1"
    loaded = info["compiled_library"]["loaded"]
    if disabled:
        assert not loaded and "SN_EXT_DISABLE_EXT" in info["compiled_library"]["reason"]
        assert cpu["usable"] is False
    else:
        # Without the switch the compiled kernels must be in use: a silent fallback would leave them untested.
        assert loaded, f"the compiled library did not load: {info['compiled_library']['reason']}"
        assert cpu["usable"] is True and cpu["reason"].startswith("fused C++ kernels")
    assert _library.has_compiled_kernel("CPU") == (not disabled)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sn_ext::spectral_normalize_", "CPU") == (not disabled)


def test_info_command_prints_json():
    result = subprocess.run([sys.executable, "-m", "sn_ext.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import json

    printed = json.loads(result.stdout)
    assert printed["backends"]["cpu"]["usable"] == sn_ext.info()["backends"]["cpu"]["usable"]
