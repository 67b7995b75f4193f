"""Compiles sn_ext's CUDA kernels (csrc/cuda/*.cu) against the installed torch's headers with the local nvcc, for
sm_90, through torch's own BuildExtension (its flags, its C++ standard), into a temporary folder: the CUDA check for
a torch whose CUDA version differs from the toolkit's (torch 2.6's PyPI build is CUDA 12.4, CI's nvcc 13.0), which
setup.py builds CPU-only. Nothing is loaded: torch's CUDA version check, which refuses a different major version,
is skipped for this compile only. Exits non-zero on any compiler error (`.ci/matrix`, `# cuda: compile-only`)."""

import glob
import os
import sys
import tempfile

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_config  # noqa: E402


def main() -> None:
    os.chdir(ROOT)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    cpp_extension._check_cuda_version = lambda *args: None  # compile only: the result is never loaded
    sources = sorted(glob.glob("csrc/cuda/*.cu"))
    print(
        f"compile_cuda: {len(sources)} CUDA sources against torch {torch.__version__} (CUDA {torch.version.cuda}) "
        f"headers with {cpp_extension.CUDA_HOME}/bin/nvcc, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as out:
        # The nvcc flags of setup.py's extension (build_config.NVCC_FLAGS plus torch's own).
        extension = cpp_extension.CUDAExtension(
            "sn_ext_cuda_compile_check", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": build_config.NVCC_FLAGS}
        )
        setup(
            name="sn_ext_cuda_compile_check",
            ext_modules=[extension],
            cmdclass={"build_ext": cpp_extension.BuildExtension},
            script_args=["-q", "build_ext", "--build-temp", out, "--build-lib", out],
        )
        objects = glob.glob(os.path.join(out, "**", "*.o"), recursive=True)
        if len(objects) != len(sources):
            sys.exit(f"compile_cuda: {len(objects)} objects for {len(sources)} sources")
    print(f"compile_cuda: OK ({', '.join(os.path.basename(s) for s in sources)})")


if __name__ == "__main__":
    main()
