"""Compiles sn_ext's Triton kernels for an NVIDIA GPU (sm_90) on a machine without one, as the GPU would: every
launch the ops make for a set of weights is recorded instead of run (sn_ext/triton/_dry_run.py), then handed to
triton.compile with a CUDA target (Triton bundles ptxas: no driver needed). Catches what the CPU interpreter cannot:
code that does not lower to CUDA, and spills. Prints "COMPILED <n>" or "SKIP <why>".

    python tests/triton_compile_check.py [--all] [--facts]    # run by tests/test_triton.py in a fresh process

The weights:
- a GAN run's (benchmarks/triton_variants.py: every layer of sngan's CNN and ResNet discriminators at 32x32 and
  48x48) in float32 and bfloat16, each through its whole run (sn_ext.triton.warm_up.layer_launches: 15 power
  iterations at creation, the training forward and backward, the eval forward): the variants a GAN compiles;
- every launch path and round order (one program in one or two passes, the split passes, the one-read gram round;
  u-first and v-first; n = 0, 1, 2; the plain and the scaled forms) on a small conv weight with dim 0 and dim 1 and
  a grid-sized one, in bfloat16 and float64 (--all: every dtype), and the widest one-pass rows in float64.

Fails on a kernel that spills registers (local memory or stack). --facts lists every variant's registers, spills,
shared memory and global loads (128-bit, all, cp.async): docs/design.md's compile facts come from it.
"""

import functools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(all_variants: bool, facts: bool) -> None:
    try:
        import triton
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
    sys.path.insert(0, ROOT)
    from benchmarks.triton_variants import gan_layers
    from sn_ext.triton import _host, warm_up

    first_seen = {}  # variant -> the weight that first launched it

    def record(what: str, calls) -> None:
        for key, variant in warm_up.variants(calls).items():
            first_seen.setdefault(key, (what, variant))

    for dtype in (torch.float32, torch.bfloat16):
        for shape, dim, v_first in gan_layers():
            name = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} (GAN)"
            record(name, functools.partial(warm_up.layer_launches, shape, dim, dtype, v_first=v_first))
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16] if all_variants else [torch.bfloat16]
    for dtype in dtypes + ([] if all_variants else [torch.float64]):
        for shape, dim, knobs in PATH_CASES:
            name = f"{'x'.join(map(str, shape))} dim={dim} {str(dtype).removeprefix('torch.')} {knobs or ''}"
            record(name, functools.partial(_path_launches, _host, shape, dim, dtype, knobs))
    for shape, v_first in (((32, 2048), False), ((2048, 32), True)):  # the widest one-pass rows
        knobs = {"FUSED_MAX_NUMEL": 1 << 16}
        record(
            f"{shape} float64 widest one pass",
            functools.partial(_path_launches, _host, shape, 0, torch.float64, knobs, v_first),
        )
    failed, lines = [], []
    for key, (what, variant) in first_seen.items():
        name = key[0]
        try:
            compiled = warm_up.compile_variant(variant)
        except Exception as error:
            print(f"FAILED {name} ({what}) {variant.constexprs} {variant.signature}\n{error}")
            sys.exit(1)
        usage = _resources(compiled.asm["cubin"])
        line = f"{name} ({what}) {_constexprs(variant)} warps={variant.options['num_warps']} {usage}"
        if usage["spills"]:
            failed.append(line)
        lines.append(line)
    if failed:
        print("SPILLS\n" + "\n".join(failed))
        sys.exit(1)
    print(f"COMPILED {len(first_seen)} (triton {triton.__version__})")
    if facts:
        print("\n".join(sorted(lines)))


# (shape, dim, knobs): the one-program paths on a first conv layer (dim 0: contiguous rows of 27; dim 1: inner 9),
# the grid on a wider weight, with the one-read gram round, and without it (the split passes).
PATH_CASES = [
    ((64, 3, 3, 3), 0, None),
    ((64, 3, 3, 3), 1, {"ONE_PASS_MAX": 0}),
    ((300, 200, 3, 3), 1, None),
    ((300, 200, 3, 3), 1, {"GRAM_ROUNDS": False}),
]


def _path_launches(host, shape, dim, dtype, knobs, v_first=None) -> None:
    """The launches of n = 0, 1 (u-first), 2 (v-first) and 2 (u-first) forwards and a backward on one weight, and
    of a scaled form's (docs/variants.md: coeff and gamma) u-first and v-first forwards and backward."""
    import torch.nn.functional as F

    saved = {name: getattr(host, name) for name in knobs or {}}
    for name, value in (knobs or {}).items():
        setattr(host, name, value)
    try:
        forward = torch.ops.sn_ext.triton_spectral_normalize_.default
        backward = torch.ops.sn_ext.triton_spectral_normalize_backward.default
        weight = torch.randn(shape).to(dtype)
        rows = weight.shape[dim]
        u = F.normalize(torch.randn(rows), dim=0).to(dtype)
        v = F.normalize(torch.randn(weight.numel() // rows), dim=0).to(dtype)
        rounds = [(1, v_first)] if v_first is not None else [(0, False), (1, False), (2, True), (2, False)]
        for n, first_v in rounds:
            forward(weight, u, v, dim, n, 1e-12, first_v)
        backward(weight, weight, u, v, torch.ones(()), dim)
        gamma = torch.ones(())
        for n, first_v in rounds[-2:]:
            forward(weight, u, v, dim, n, 1e-12, first_v, 0.5, gamma)
        scaled_backward = torch.ops.sn_ext.triton_spectral_normalize_scaled_backward.default
        scaled_backward(weight, weight, u, v, torch.ones(()), dim, 0.5, gamma)
    finally:
        for name, value in saved.items():
            setattr(host, name, value)


def _constexprs(variant) -> str:
    names = variant.kernel.arg_names
    return " ".join(
        f"{names[path[0]]}={value}" for path, value in variant.constexprs.items() if names[path[0]].isupper()
    )


def _resources(cubin: bytes) -> dict:
    """Registers, spills (local memory or stack) and global load widths of a compiled kernel, read with the
    cuobjdump that Triton bundles."""
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
