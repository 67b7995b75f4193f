"""Builds sn_ext._C against the torch installed in this environment (hence `pip install --no-build-isolation`):
the CPU kernels always, the CUDA kernels when a CUDA build of torch and a matching CUDA toolkit are present. Each
choice and its reason is printed here and recorded in the library (`python -m sn_ext.info`); build_config.py makes
the choices and documents the environment variables (FORCE_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST, SN_EXT_PORTABLE).
The package metadata is in pyproject.toml."""

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # build_config, beside this file
import build_config  # noqa: E402

try:
    import torch
except ImportError:
    sys.exit(
        "sn_ext builds against the torch installed in your environment, and none is importable here: install "
        "torch first, then `pip install --no-build-isolation sn_ext` (or `pip install --no-build-isolation .`)"
    )

force_cuda = os.environ.get("FORCE_CUDA", "")
cuda_home, cuda_reason = build_config.find_cuda_home(dict(os.environ))
if force_cuda == "0":
    cuda_problem = "FORCE_CUDA=0"
elif cuda_home is None:
    cuda_problem = cuda_reason
else:
    cuda_problem = build_config.cuda_problem(torch.version.cuda, build_config.nvcc_version(cuda_home))
if cuda_problem and force_cuda == "1":
    sys.exit(f"sn_ext: FORCE_CUDA=1 but the CUDA kernels cannot be built: {cuda_problem}")
with_cuda = cuda_problem is None
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home  # before torch's cpp_extension guesses its own
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's own guess without a visible GPU fails (an empty list on a build machine or in Docker).
        os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.cuda_arch_list(
            build_config.torch_cuda_archs(torch), build_config.nvcc_gpu_archs(cuda_home)
        )

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

cpu_isa = build_config.cpu_isa(portable=os.environ.get("SN_EXT_PORTABLE", "0") == "1")
if with_cuda:
    cuda_text = (
        f"CPU + CUDA kernels (toolkit {cuda_home}, {cuda_reason}; TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST') or 'the visible GPUs'})"
    )
else:
    cuda_text = f"CPU kernels only ({cuda_problem})"
print(f"sn_ext: building {cuda_text}, CPU code for {cpu_isa}, against torch {torch.__version__}", flush=True)

sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
macros = [("SN_EXT_BUILD_TORCH", f'"{torch.__version__}"'), ("SN_EXT_BUILD_CPU_ISA", f'"{cpu_isa}"')]
# The C++ standard is torch's choice (C++17 up to torch 2.9, C++20 later).
extra_compile_args = {"cxx": ["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if cpu_isa == "avx2" else [])]}
extension = CppExtension
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [("SN_EXT_BUILD_CUDA", f'"{torch.version.cuda}"')]
    extra_compile_args["nvcc"] = build_config.NVCC_FLAGS
    extension = CUDAExtension

from setuptools import setup  # noqa: E402

setup(
    ext_modules=[
        extension(
            "sn_ext._C",
            sources,
            define_macros=macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
