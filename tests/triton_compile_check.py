"""Compiles sn_ext's Triton kernels for an NVIDIA GPU (sm_90) on a machine without one, as the GPU would: every
launch the ops make for a set of weights (every path, dtype and kernel variant) is recorded instead of run, then
handed to triton.compile with a CUDA target (Triton bundles ptxas: no driver needed). Catches what the CPU
interpreter cannot: code that does not lower to CUDA. Prints "COMPILED <n>" or "SKIP <why>".

    python tests/triton_compile_check.py [--all]      # run by tests/test_triton.py in a fresh process
"""

import sys

import torch
import torch.nn.functional as F


def main(all_variants: bool) -> None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as error:
        print(f"SKIP triton's compiler API is not available: {error}")
        return
    import inspect

    if "constexprs" not in inspect.signature(ASTSource).parameters:  # triton < 3.3 takes `constants` of another form
        print(
            f"SKIP triton {triton.__version__}'s ASTSource predates the API this check uses (triton >= 3.3); the "
            f"kernels still run in its interpreter"
        )
        return
    import sn_ext.triton as sn_triton

    loaded, reason = sn_triton.load()
    if not loaded or sn_triton.interpreted():
        print(f"SKIP the kernels are not loaded for a GPU: {reason}")
        return
    from sn_ext.triton import _host
    from sn_ext.triton import spectral_normalize as forward_module
    from sn_ext.triton import spectral_normalize_backward as backward_module

    pointer_types = {
        torch.float32: "*fp32",
        torch.float64: "*fp64",
        torch.float16: "*fp16",
        torch.bfloat16: "*bf16",
        torch.int32: "*i32",
    }
    launches = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
                names = self.kernel.arg_names
                signature, constants = {}, {}
                for name, arg in zip(names, args):
                    if isinstance(arg, torch.Tensor):
                        signature[name] = pointer_types[arg.dtype]
                    elif isinstance(arg, bool):
                        signature[name] = "i1"
                    elif isinstance(arg, int):
                        signature[name] = "i64" if abs(arg) >= 2**31 else "i32"
                    else:
                        signature[name] = "fp32"
                for name in names[len(args) :]:
                    signature[name], constants[name] = "constexpr", kwargs[name]
                key = (
                    self.kernel.fn.__name__,
                    tuple(signature.items()),
                    tuple(constants.items()),
                    tuple(options.items()),
                )
                launches[key] = (self.kernel, signature, constants, options)

            return launch

    forward_module.wrap_triton = backward_module.wrap_triton = Recorder

    def record(shape, dim, dtype, n, v_first, **knobs):
        saved = {name: getattr(_host, name) for name in knobs}
        for name, value in knobs.items():
            setattr(_host, name, value)
        try:
            weight = torch.randn(shape).to(dtype)
            h = weight.shape[dim]
            u = F.normalize(torch.randn(h), dim=0).to(dtype)
            v = F.normalize(torch.randn(weight.numel() // h), dim=0).to(dtype)
            forward_module.triton_spectral_normalize(weight, u, v, dim, n, 1e-12, v_first)
            backward_module.triton_spectral_normalize_backward(weight, weight, u, v, torch.ones(()), dim)
        finally:
            for name, value in saved.items():
                setattr(_host, name, value)

    # Every kernel variant in bfloat16 (a low-precision dtype: conversions); float64 (its own division and square
    # root) for the one-program kernels at their widest; --all: every dtype.
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16] if all_variants else [torch.bfloat16]
    for dtype in dtypes:
        for n, v_first in [(0, False), (1, False), (2, True)]:
            record((64, 3, 3, 3), 0, dtype, n, v_first)  # one program, one pass per round
            record((64, 3, 3, 3), 1, dtype, n, v_first, ONE_PASS_MAX=0)  # one program, two passes
            record((300, 200, 3, 3), 1, dtype, n, v_first)  # the grid
    record((32, 2048), 0, torch.float64, 1, False)  # the widest one-pass rows, in registers
    record((2048, 32), 0, torch.float64, 1, True)
    target = GPUTarget("cuda", 90, 32)
    for (name, _, constants, _), (kernel, signature, consts, options) in launches.items():
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts), target=target, options=options)
        except Exception as error:
            print(f"FAILED {name} {constants} {signature}\n{error}")
            sys.exit(1)
    print(f"COMPILED {len(launches)}")


if __name__ == "__main__":
    main("--all" in sys.argv)
