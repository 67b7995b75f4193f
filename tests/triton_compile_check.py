"""Compiles sn_ext's Triton kernels for an NVIDIA GPU (sm_90) on a machine without one, as the GPU would: every
launch the ops make for a set of weights (every path, dtype and kernel variant) is recorded instead of run, then
handed to triton.compile with a CUDA target (Triton bundles ptxas: no driver needed). Catches what the CPU
interpreter cannot: code that does not lower to CUDA. Prints "COMPILED <n>" or "SKIP <why>".

    python tests/triton_compile_check.py [--all] [--facts]    # run by tests/test_triton.py in a fresh process

Fails on a kernel that spills registers. --facts also lists every variant's registers, spills, shared memory and
global loads (128-bit, all, cp.async) for FACT_SHAPES in float32.
"""

import sys

import torch
import torch.nn.functional as F


def main(all_variants: bool, facts: bool) -> None:
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
    from sn_ext.triton import _dry_run, _host
    from sn_ext.triton import spectral_normalize as forward_module
    from sn_ext.triton import spectral_normalize_backward as backward_module

    def record(shape, dim, dtype, n, v_first, **knobs):
        saved = {name: getattr(_host, name) for name in knobs}
        for name, value in knobs.items():
            setattr(_host, name, value)
        try:
            weight = torch.randn(shape).to(dtype)
            h = weight.shape[dim]
            u = F.normalize(torch.randn(h), dim=0).to(dtype)
            v = F.normalize(torch.randn(weight.numel() // h), dim=0).to(dtype)
            forward_module.triton_spectral_normalize_(weight, u, v, dim, n, 1e-12, v_first)
            backward_module.triton_spectral_normalize_backward(weight, weight, u, v, torch.ones(()), dim)
        finally:
            for name, value in saved.items():
                setattr(_host, name, value)
        for key in variants.keys() - first_seen.keys():
            first_seen[key] = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"

    # The launches are bound as on an sm_90 GPU (sn_ext/triton/_dry_run.py): the variants compiled below are those a
    # GPU would compile, with Triton's specializations (equal to 1, divisible by 16) and constexprs.
    first_seen = {}  # variant -> the weight that first launched it
    with _dry_run.dry_run() as variants:
        # Every kernel variant in bfloat16 (a low-precision dtype: conversions); float64 (its own division and
        # square root) for the one-program kernels at their widest; --all: every dtype.
        dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16] if all_variants else [torch.bfloat16]
        for dtype in dtypes:
            for n, v_first in [(0, False), (1, False), (2, True)]:
                record((64, 3, 3, 3), 0, dtype, n, v_first)  # one program, one pass per round
                record((64, 3, 3, 3), 1, dtype, n, v_first, ONE_PASS_MAX=0)  # one program, two passes
                record((300, 200, 3, 3), 1, dtype, n, v_first)  # the grid
            for n in (1, 2):  # the grid, u-first rounds in one pass (gram_kernel)
                record((300, 200, 3, 3), 1, dtype, n, False, GRAM_MIN_PARTS=1)
        record((32, 2048), 0, torch.float64, 1, False, FUSED_MAX_NUMEL=1 << 16)  # the widest one-pass rows
        record((2048, 32), 0, torch.float64, 1, True, FUSED_MAX_NUMEL=1 << 16)
        for shape in FACT_SHAPES if facts else ():
            record(shape, 0, torch.float32, 1, False)
    failed = []
    lines = []
    for key, variant in variants.items():
        name = key[0]
        try:
            compiled = triton.compile(
                ASTSource(
                    fn=variant.kernel, signature=variant.signature, constexprs=variant.constexprs, attrs=variant.attrs
                ),
                target=GPUTarget(*_dry_run.TARGET),
                options=variant.options,
            )
        except Exception as error:
            print(f"FAILED {name} {variant.constexprs} {variant.signature}\n{error}")
            sys.exit(1)
        usage = _resources(compiled.asm["cubin"])
        if usage["spills"]:
            failed.append(f"{name} {variant.constexprs}: {usage}")
        lines.append(f"{name} ({first_seen[key]}) {_constexprs(variant)} warps={variant.options['num_warps']} {usage}")
    if failed:
        print("SPILLS\n" + "\n".join(failed))
        sys.exit(1)
    print(f"COMPILED {len(variants)}")
    if facts:
        print("\n".join(sorted(lines)))


# Weights whose fp32 variants --facts lists (registers, spills, load widths): a discriminator's first conv, a wide
# Linear, a discriminator's largest conv, a large square weight.
FACT_SHAPES = [(64, 3, 3, 3), (1, 8192), (128, 128, 3, 3), (512, 512, 3, 3), (4096, 4096)]


def _constexprs(variant) -> str:
    names = variant.kernel.arg_names
    return " ".join(
        f"{names[path[0]]}={value}" for path, value in variant.constexprs.items() if names[path[0]].isupper()
    )


def _resources(cubin: bytes) -> dict:
    """Registers, spills (local memory or stack) and global load widths of a compiled kernel, read with the
    cuobjdump that Triton bundles."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    loads = re.findall(r"\b(LDGSTS|LDG)\b([\w.]*)", sass)
    return {
        "regs": int(fields["REG"]),
        "spills": int(fields["STACK"]) + int(fields["LOCAL"]),
        "shared": int(fields["SHARED"]),
        "ldg128": sum(1 for op, mods in loads if ".128" in mods and op == "LDG"),
        "ldg": sum(1 for op, _ in loads if op == "LDG"),
        "cp_async": sum(1 for op, _ in loads if op == "LDGSTS"),
        "cp_async128": sum(1 for op, mods in loads if ".128" in mods and op == "LDGSTS"),
    }


if __name__ == "__main__":
    main("--all" in sys.argv, "--facts" in sys.argv)
