"""torch.compile(fullgraph=True) of models using sn_ext's spectral norm, with every backend usable here: no graph
break, no recompilation between steps, and the same numbers as eager (train-mode forward and backward, buffers
updated identically, weights updated between steps; then eval).

On the CPU the matrix runs with torch.compile's "aot_eager" backend (dynamo + AOTAutograd with the ops' fake
kernels and autograd formulas, no code generation: fast); one test runs Inductor itself. With a CUDA device the
"cuda" and "triton" backends run under Inductor too. torch._dynamo.reset() between cases keeps them independent.
"""

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from helpers import small_backend_net
from torch import nn

import sn_ext
from sn_ext import backends

REGISTER = {"parametrization": sn_ext.spectral_norm, "legacy": sn_ext.legacy.spectral_norm}
CASES = [(name, "cpu") for name in ("cpu", "reference") if not backends.get(name).unavailable_reasons()]
if torch.cuda.is_available():
    CASES += [
        (name, "cuda")
        for name in ("cuda", "triton", "reference")
        if not backends.get(name).not_supported_reasons("cuda", torch.float32)
    ]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _net(kind: str, backend: str | None, device: str, dtype=torch.float32) -> nn.Module:
    return small_backend_net(REGISTER[kind], backend, device, dtype)


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item() / scale
    assert err < 1e-5, f"{what}: normwise difference {err:.2e}"


def _steps_match(eager: nn.Module, compiled_module: nn.Module, compiled, x: torch.Tensor, steps: int = 3) -> None:
    for step in range(steps + 1):
        if step == steps:  # then eval: no power iteration
            eager.eval()
            compiled_module.eval()
        out_e, out_c = eager(x), compiled(x)
        _assert_close(out_c, out_e, f"output, step {step}")
        if step == steps:
            break
        for net, out in ((eager, out_e), (compiled_module, out_c)):
            net.zero_grad()
            out.square().sum().backward()
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled_module.named_parameters()):
            _assert_close(b.grad, a.grad, f"grad of {name}, step {step}")
        with torch.no_grad():
            for net in (eager, compiled_module):
                for param in net.parameters():
                    param -= 0.05 * param.grad
        for (name, a), (_, b) in zip(eager.named_buffers(), compiled_module.named_buffers()):
            _assert_close(b, a, f"buffer {name}, step {step}")


@pytest.mark.parametrize("kind", list(REGISTER))
@pytest.mark.parametrize("backend,device", CASES, ids=[f"{b}-{d}" for b, d in CASES])
def test_fullgraph_matches_eager(backend, device, kind):
    eager = _net(kind, backend, device)
    twin = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 7, 7, device=device, generator=torch.Generator().manual_seed(2)).to(device)
    _steps_match(eager, twin, compiled, x)
    assert counter.frame_count == 2, "one graph for train mode, one for eval, no recompilation per step"


def test_inductor_on_cpu_matches_eager():
    """Inductor itself (C++ code generation) on a model with both kinds of spectral norm, default backend."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    torch.manual_seed(1)
    sn_ext.spectral_norm(eager[0])
    sn_ext.legacy.spectral_norm(eager[2])
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor")
    _steps_match(eager, twin, compiled, torch.randn(4, 6, generator=torch.Generator().manual_seed(3)), steps=2)


@pytest.mark.parametrize("kind", list(REGISTER))
def test_compiles_after_a_cast(kind):
    """A module cast (or moved) after registration: the compiled graph looks its kernels up, no graph break."""
    eager = _net(kind, "reference", "cpu").double()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    _steps_match(eager, twin, compiled, torch.randn(2, 3, 7, 7, dtype=torch.float64), steps=1)
