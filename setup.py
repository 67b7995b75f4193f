"""Builds sn_ext._C: the CUDA kernels when a CUDA toolkit and a CUDA build of torch are present, else the CPU
kernels only. FORCE_CUDA=1 requires the CUDA kernels (an error if no toolkit is found), FORCE_CUDA=0 builds the
CPU kernels only. The choices are printed here and recorded in the library (see `python -m sn_ext.info`)."""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def build_machine_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


force_cuda = os.environ.get("FORCE_CUDA", "")
with_cuda = force_cuda == "1" or (force_cuda != "0" and CUDA_HOME is not None and torch.version.cuda is not None)
if force_cuda == "1" and CUDA_HOME is None:
    raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to it")
# The CPU kernels' loops are vectorized by the compiler: for AVX2 + FMA when the building machine has them
# (~1.6x faster than baseline x86-64; such a build will not run on an older CPU), unless SN_EXT_PORTABLE=1.
cpu_isa = "avx2" if os.environ.get("SN_EXT_PORTABLE", "0") != "1" and build_machine_has_avx2() else "baseline"
print(f"sn_ext: building {'CPU + CUDA' if with_cuda else 'CPU only'} kernels, CPU code for {cpu_isa} "
      f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})")

sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
macros = [("SN_EXT_BUILD_TORCH", f'"{torch.__version__}"'), ("SN_EXT_BUILD_CPU_ISA", f'"{cpu_isa}"')]
# The C++ standard is torch's choice (C++17 up to torch 2.9, C++20 later).
extra_compile_args = {"cxx": ["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if cpu_isa == "avx2" else [])]}
extension = CppExtension
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [("SN_EXT_BUILD_CUDA", f'"{torch.version.cuda}"')]
    extra_compile_args["nvcc"] = ["-O3"]
    extension = CUDAExtension

setup(
    name="sn_ext",
    version="0.1.0",
    description="Fused spectral normalization for PyTorch: a drop-in for torch's spectral_norm",
    packages=["sn_ext", "sn_ext.nn", "sn_ext.triton"],
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=[extension("sn_ext._C", sources, define_macros=macros, extra_compile_args=extra_compile_args,
                           extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
)
