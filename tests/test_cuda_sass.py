"""What the compiled CUDA kernels look like, read from the built library without a GPU (CI builds them for sm_90):
ptxas' resource usage per kernel through cuobjdump (the copy triton ships, or the CUDA toolkit's).

- no local memory and no stack: nothing spilled from registers;
- at most 128 registers per thread: 2 blocks of kThreads = 256 threads fit on an SM (65536 registers), the
  kernels' __launch_bounds__ (kMinBlocksPerSm in csrc/cuda/common.cuh);
- the parameter block: a per-layer launch's well under 4 KB, a grouped launch's under 4 KB (csrc/cuda/common.cuh,
  kGroupLayers); CONSTANT[0] also holds the driver's 0x210 bytes before the parameters on sm_90;
- every loop that streams a tensor in 16-byte loads has at least two of them in flight, and the fused pass, W / sigma,
  <G, W_sn> and the correction as many as their code asks for.
"""

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from sn_ext import ops

MAX_REGISTERS = 65536 // (2 * 256)
DRIVER_CONSTANT_BYTES = 0x210


def _cuobjdump() -> str | None:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.access(c, os.X_OK)), shutil.which("cuobjdump"))


def _library() -> str | None:
    """The compiled library this interpreter loads (a checkout may hold others, built for other Pythons)."""
    spec = importlib.util.find_spec("sn_ext._C")
    return spec.origin if spec is not None else None


pytestmark = pytest.mark.skipif(
    not (ops.library_status.loaded and ops.library_status.built_with_cuda and _library() and _cuobjdump()),
    reason="needs sn_ext built with its CUDA kernels and cuobjdump (shipped with triton, or in the CUDA toolkit)",
)


def _resource_usage() -> dict[str, dict[str, int]]:
    """Kernel (mangled name) -> {"REG": ..., "STACK": ..., "LOCAL": ..., "CONSTANT[0]": ..., ...} for sm_90."""
    text = subprocess.run(
        [_cuobjdump(), "-res-usage", "-arch", "sm_90", _library()], capture_output=True, text=True, check=True
    ).stdout
    kernels = {}
    for name, usage in re.findall(r"Function (\S+):\n\s+(.*)", text):
        kernels[name] = {key: int(value) for key, value in re.findall(r"(\S+):(\d+)", usage)}
    return kernels


# 4 dtypes x 2 index types x {per-layer, grouped}: the backward kernel's 16; the forward kernel's 32, its fused rounds
# and its split rounds each a kernel of their own (Lb1E, Lb0E in the name).
KERNELS = 48


@pytest.fixture(scope="module")
def kernels():
    found = {name: usage for name, usage in _resource_usage().items() if re.search(r"(forward|backward)_kernel", name)}
    assert len(found) == KERNELS, sorted(found)
    return found


def test_no_spills_and_no_stack(kernels):
    for name, usage in kernels.items():
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (name, usage)


def test_registers_allow_three_blocks_per_sm(kernels):
    for name, usage in kernels.items():
        assert usage["REG"] <= MAX_REGISTERS, (name, usage)


def test_parameter_blocks(kernels):
    """The launch structs' capacity is a template argument: Li1E (one layer) or Li12E (kGroupLayers) in the name."""
    for name, usage in kernels.items():
        parameters = usage["CONSTANT[0]"] - DRIVER_CONSTANT_BYTES
        limit = 512 if re.search(r"Li1E(Lb[01]E)?E", name) else 4096
        assert 0 < parameters <= limit, (name, parameters)


def _sass() -> dict[str, str]:
    """Kernel (mangled name) -> its sm_90 SASS."""
    text = subprocess.run(
        [_cuobjdump(), "-sass", "-arch", "sm_90", _library()], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", text, re.S))


@pytest.fixture(scope="module")
def sass():
    found = {name: code for name, code in _sass().items() if re.search(r"(forward|backward)_kernel", name)}
    assert len(found) == KERNELS, sorted(found)
    return found


def test_streaming_passes_move_16_bytes_per_access(sass):
    """The packed paths load and store 128 bits per instruction (every kernel: the forward's W / sigma, the fused
    pass or the split products; the backward's <G, W_sn> and correction)."""
    for name, code in sass.items():
        assert "LDG.E.128" in code and "STG.E.128" in code, name


# Arithmetic that uses a loaded value: a run of 128-bit loads with none of these between them is in flight at once.
_ARITHMETIC = re.compile(r"\b(FFMA|DFMA|FADD|DADD|FMUL|DMUL|HFMA2|HADD2|HMUL2|MUFU)\b")


def _instructions(code: str) -> list[tuple[int, str]]:
    """(address, instruction) of each SASS line."""
    return [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", code)]


def _innermost_loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """[first, last] address of each innermost loop: a backward branch's span holding no other backward branch."""
    back = []
    for address, text in instructions:
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)$", text)
        if target and int(target.group(1), 16) <= address:
            back.append((int(target.group(1), 16), address))
    return [(t, a) for t, a in back if not any(t <= t2 and a2 < a for t2, a2 in back if (t2, a2) != (t, a))]


def _load_runs(instructions: list[tuple[int, str]], first: int = 0, last: int = 1 << 40) -> list[int]:
    """The lengths of the runs of 128-bit loads in [first, last], in code order."""
    runs, run = [], 0
    for address, text in instructions:
        if not first <= address <= last:
            continue
        if "LDG.E.128" in text:
            run += 1
        elif _ARITHMETIC.search(text):
            if run:
                runs.append(run)
            run = 0
    return runs + ([run] if run else [])


def _streaming_loops(code: str) -> list[list[int]]:
    """The 128-bit load runs of each innermost loop that has any: one list per streaming loop."""
    instructions = _instructions(code)
    loops = [_load_runs(instructions, first, last) for first, last in _innermost_loops(instructions)]
    return [runs for runs in loops if runs]


def _itemsize(name: str) -> int:
    if "BFloat16" in name or "Half" in name:
        return 2
    return 8 if re.search(r"_kernelId", name) else 4


def test_every_streaming_loop_keeps_two_16_byte_loads_in_flight(sass):
    """Issue 29: at least two 16-byte loads in flight in every streaming loop, per loop: each innermost loop that
    reads 128 bits at a time issues two or more before any arithmetic uses one (the earlier kernels' float32 wide-row
    y pass issued one; a test comparing all the runs of a kernel at once let it pass)."""
    for name, code in sass.items():
        loops = _streaming_loops(code)
        assert loops, name
        for runs in loops:
            assert max(runs) >= 2, (name, loops)


def test_passes_keep_what_their_code_asks_for_in_flight(sass):
    """What each streaming loop asks for (csrc/cuda: block_walk.h's constants): the fused pass two rows of
    kFusedBytes of op-math sums' worth (2 x 4 packs for float32 and float64, 2 x 2 for the 2-byte dtypes); W / sigma
    and the correction kStreamPacks = 4 packs; <G, W_sn> kStreamPairPacks = 4 of each tensor; the split round's W v
    matvec_unroll packs of W and of x (4 + 4, 2 + 2 for the 2-byte dtypes), its W^T u 4 rows' packs."""
    for name, code in sass.items():
        loops = [max(runs) for runs in _streaming_loops(code)]
        two_byte = _itemsize(name) == 2
        if "backward_kernel" in name:
            assert 8 in loops and 4 in loops, (name, loops)  # <G, W_sn>; the correction
        elif re.search(r"Lb1EE", name):  # fused rounds
            rows = 4 if two_byte else 8
            assert loops.count(rows) >= 2 and 4 in loops, (name, loops)  # narrow and wide passes; W / sigma
        else:  # split rounds
            assert (4 if two_byte else 8) in loops and 4 in loops, (name, loops)  # W v; W^T u and W / sigma
