"""What the compiled CUDA kernels look like, read from the built library without a GPU (CI builds them for sm_90):
ptxas' resource usage per kernel through cuobjdump (the copy triton ships, or the CUDA toolkit's).

- no local memory and no stack: nothing spilled from registers;
- at most 85 registers per thread: 3 blocks of kThreads = 256 threads fit on an SM (65536 registers), the
  kernels' __launch_bounds__ (kMinBlocksPerSm in csrc/cuda/common.cuh);
- the parameter block: a per-layer launch's well under 4 KB, a grouped launch's under 4 KB (csrc/cuda/common.cuh,
  kGroupLayers); CONSTANT[0] also holds the driver's 0x210 bytes before the parameters on sm_90.
"""

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from sn_ext import ops

MAX_REGISTERS = 65536 // (3 * 256)
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


@pytest.fixture(scope="module")
def kernels():
    found = {name: usage for name, usage in _resource_usage().items() if re.search(r"(forward|backward)_kernel", name)}
    # 4 dtypes x 2 index types x {per-layer, grouped}, for each of the two kernels
    assert len(found) == 32, sorted(found)
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
        limit = 512 if "Li1EE" in name else 4096
        assert 0 < parameters <= limit, (name, parameters)


def _sass() -> dict[str, str]:
    """Kernel (mangled name) -> its sm_90 SASS."""
    text = subprocess.run(
        [_cuobjdump(), "-sass", "-arch", "sm_90", _library()], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", text, re.S))


def test_streaming_passes_move_16_bytes_per_access():
    """The packed paths of the elementwise passes (W / sigma in the forward; <G, W_sn> and the correction in the
    backward) load and store 128 bits per instruction."""
    found = {name: code for name, code in _sass().items() if re.search(r"(forward|backward)_kernel", name)}
    assert len(found) == 32, sorted(found)
    for name, code in found.items():
        assert "LDG.E.128" in code and "STG.E.128" in code, name


# Arithmetic that uses a loaded value: a run of 128-bit loads with none of these between them is in flight at once.
_ARITHMETIC = re.compile(r"\b(FFMA|DFMA|FADD|DADD|FMUL|DMUL|HFMA2|HADD2|HMUL2|MUFU)\b")


def _load_runs(code: str) -> list[int]:
    """The lengths of the runs of 128-bit loads, in code order."""
    runs, run = [], 0
    for line in code.splitlines():
        if "LDG.E.128" in line:
            run += 1
        elif _ARITHMETIC.search(line):
            if run:
                runs.append(run)
            run = 0
    return runs + ([run] if run else [])


def test_fused_round_reads_rows_in_16_byte_packs():
    """The fused u-first round (fused_round_block, csrc/cuda/common.cuh) reads a row's register-held segment as 64
    bytes of sums' worth of 16-byte packs per thread, all issued before the first is used: 4 LDG.E.128 in a row for
    float32 and float64 weights (2 packs of 8 for float16/bfloat16). Rows wider than a segment are read a pack per
    thread at a time; for float32 unrolled so that several are in flight: 4 rows' packs in a row in the z pass, 2
    segments' in the y pass (the other dtypes spilled so; they keep one pack in flight). The kernels before the fused
    round had 3 in all (W / sigma's), the wide-row path one pack in flight for every dtype."""
    found = {name: code for name, code in _sass().items() if "forward_kernel" in name}
    assert len(found) == 16, sorted(found)
    for name, code in found.items():
        two_byte = "Half" in name or "BFloat16" in name
        float32 = "forward_kernelIff" in name
        packs = 2 if two_byte else 4
        wide = 4 + 2 if float32 else 2
        assert code.count("LDG.E.128") >= 3 + packs + wide, name
        if not two_byte:
            runs = sorted(_load_runs(code), reverse=True)
            assert runs[:3] >= ([packs, 4, 2] if float32 else [packs]), (name, runs)


def test_split_round_loops_read_16_byte_packs():
    """The split round's loops (matvec_block, rmatvec_block in csrc/cuda/common.cuh: every v-first round, and the
    u-first round under SN_EXT_CUDA_ROUND=split) read W in 16-byte packs where the rows are contiguous and aligned:
    W v loads matvec_unroll packs of W and as many of x per step (4 and 4; 2 and 2 for float16/bfloat16, which spilled
    at 4), W^T u kSplitUnroll = 4 rows' packs, all before it adds them. On top of the fused round's and W / sigma's
    (test_fused_round_reads_rows_in_16_byte_packs: 13 LDG.E.128 for float32, 9 for float64, 7 for the 2-byte dtypes)
    at least 2 * 4 + 4 more (2 * 2 + 4 for the 2-byte dtypes), and more runs of 4 loads in flight: 4 in all for
    float32 (the fused round's 2), 3 for float64 (1), 1 for the 2-byte dtypes (0). The scalar loops, which
    SN_EXT_CUDA_ROUND=split-scalar keeps, have none; the kernels before the packed loops fail this test."""
    found = {name: code for name, code in _sass().items() if "forward_kernel" in name}
    assert len(found) == 16, sorted(found)
    for name, code in found.items():
        two_byte = "Half" in name or "BFloat16" in name
        float32 = "forward_kernelIff" in name
        fused_and_divide = 13 if float32 else 7 if two_byte else 9
        split = 2 * 2 + 4 if two_byte else 2 * 4 + 4
        assert code.count("LDG.E.128") >= fused_and_divide + split, (name, code.count("LDG.E.128"))
        runs_of_4 = sum(1 for run in _load_runs(code) if run >= 4)
        assert runs_of_4 >= (4 if float32 else 1 if two_byte else 3), (name, _load_runs(code))
