"""How setup.py configures the build of sn_ext._C: which CUDA toolkit (if any), for which GPU architectures, and the
CPU instruction set. Kept apart from setup.py so that tests can check each decision (tests/test_packaging.py);
every function takes what it looks at as arguments and returns (choice, reason), the reason printed by setup.py.

Environment variables read (by setup.py, passed in here):
  FORCE_CUDA=1            the CUDA kernels are required: an error instead of a CPU-only build when they cannot be built
  FORCE_CUDA=0            CPU kernels only
  CUDA_HOME / CUDA_PATH   the toolkit to use (checked: bin/nvcc, include/cuda_runtime.h, libcudart)
  TORCH_CUDA_ARCH_LIST    the GPU architectures, as torch reads it ("8.0;9.0+PTX"); default: see cuda_arch_list
  SN_EXT_PORTABLE=1       CPU code for baseline x86-64 even where the building machine has AVX2 + FMA
"""

import glob
import os
import re
import shutil
import subprocess

# nvcc's flags for sn_ext's CUDA sources, besides torch's own (setup.py; .ci/compile_cuda.py compiles with the same).
NVCC_FLAGS = ["-O3"]

# Where toolkits are usually installed, after $CUDA_HOME / $CUDA_PATH and the nvcc on PATH.
USUAL_CUDA_HOMES = ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda", "/usr")


def toolkit_problem(home: str) -> str | None:
    """Why `home` is not a usable CUDA toolkit root (None when it is)."""
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"{home}/bin/nvcc does not exist"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return f"{home}/include/cuda_runtime.h does not exist"
    if not any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib", "targets/*/lib")):
        return f"no libcudart.so under {home}/lib64 or {home}/lib"
    return None


def nvcc_version(home: str) -> str | None:
    """The toolkit's "major.minor", from `nvcc --version`."""
    try:
        text = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except OSError:
        return None
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


def find_cuda_home(environ: dict[str, str]) -> tuple[str | None, str]:
    """The CUDA toolkit to build with: $CUDA_HOME or $CUDA_PATH if set (and then only it), else the one the nvcc on
    PATH belongs to (a wrapper script outside the toolkit is followed to no root and skipped), else a usual
    location. Returns (root, reason) or (None, why none)."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(variable):
            home = environ[variable]
            problem = toolkit_problem(home)
            return (
                (home, f"{variable}={home}") if problem is None else (None, f"{variable}={home} is unusable: {problem}")
            )
    candidates = []
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += USUAL_CUDA_HOMES
    for home in candidates:
        if toolkit_problem(home) is None:
            return home, f"found at {home}"
    return None, "no CUDA toolkit found (set CUDA_HOME to one: bin/nvcc, include/cuda_runtime.h, lib64/libcudart)"


def cuda_problem(torch_cuda: str | None, toolkit: str | None) -> str | None:
    """Why the CUDA kernels cannot be built for this torch with this toolkit version (None when they can)."""
    if torch_cuda is None:
        return "the installed torch is a CPU-only build"
    if toolkit is None:
        return "the toolkit's nvcc did not report its version"
    if toolkit.split(".")[0] != torch_cuda.split(".")[0]:
        return (
            f"the toolkit is CUDA {toolkit} and torch was built with CUDA {torch_cuda}: torch refuses a different "
            "major version (install the matching toolkit, or a torch built for yours)"
        )
    return None


def cuda_arch_list(torch_archs: list[str], nvcc_archs: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for a machine without a GPU: every architecture the installed torch was built for that
    nvcc can compile (torch_archs like "sm_90", nvcc_archs like "compute_90"), and PTX of the newest one, so that a
    newer GPU JIT-compiles it. With a GPU visible and no list, torch builds for that GPU itself."""

    def arch_numbers(archs: list[str], prefix: str) -> set[str]:  # "sm_90" -> "90"; "sm_90a" (arch-specific) skipped
        return {m.group(1) for a in archs if (m := re.fullmatch(prefix + r"_(\d+)", a))}

    compilable = arch_numbers(nvcc_archs, "compute")
    numbers = sorted(arch_numbers(torch_archs, "sm") & compilable, key=int)
    if not numbers:
        numbers = sorted(compilable, key=int)[-1:]
    dotted = [f"{n[:-1]}.{n[-1]}" for n in numbers]
    return ";".join(dotted[:-1] + [dotted[-1] + "+PTX"])


def torch_cuda_archs(torch) -> list[str]:
    """The architectures the installed (CUDA) torch was built for, like "sm_90". torch.cuda.get_arch_list() answers
    only with a GPU visible on older torch; the build's flags answer without one."""
    return torch.cuda.get_arch_list() or torch._C._cuda_getArchFlags().split()


def nvcc_gpu_archs(home: str) -> list[str]:
    try:
        return subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, timeout=60
        ).stdout.split()
    except OSError:
        return []


def cpu_isa(portable: bool, cpuinfo: str = "/proc/cpuinfo") -> str:
    """ "avx2" when the building machine has AVX2 + FMA (the compiler vectorizes the CPU kernels for them, ~1.6x
    faster than baseline x86-64; such a build will not run on an older CPU), unless a portable build is asked for."""
    if portable:
        return "baseline"
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "baseline"
    return "avx2" if "avx2" in flags and "fma" in flags else "baseline"
