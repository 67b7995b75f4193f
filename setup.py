"""Builds sn_ext._C: the CUDA kernels when a CUDA toolkit and a CUDA build of torch are present (or FORCE_CUDA=1),
else the CPU kernels only. The choice is printed here and recorded in the library (see `python -m sn_ext.info`)."""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
with_cuda = force_cuda or (CUDA_HOME is not None and torch.version.cuda is not None)
if force_cuda and CUDA_HOME is None:
    raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to it")
print(f"sn_ext: building {'CPU + CUDA' if with_cuda else 'CPU only'} kernels "
      f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})")

sources = ["csrc/sn_ext.cpp", "csrc/matrix_view.cpp", "csrc/python_module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
macros = [("SN_EXT_BUILD_TORCH", f'"{torch.__version__}"')]
cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is torch's choice (C++17 up to 2.x, C++20 later)
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [("SN_EXT_BUILD_CUDA", f'"{torch.version.cuda}"')]
    extension = CUDAExtension
    extra_compile_args = {"cxx": cxx_flags, "nvcc": ["-O3"]}
else:
    extension = CppExtension
    extra_compile_args = {"cxx": cxx_flags}

setup(
    name="sn_ext",
    version="0.1.0",
    description="Fused spectral normalization for PyTorch: a drop-in for torch's spectral_norm",
    packages=["sn_ext", "sn_ext.nn"],
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=[extension("sn_ext._C", sources, define_macros=macros, extra_compile_args=extra_compile_args,
                           extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
)
