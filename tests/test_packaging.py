"""Installing sn_ext as users do (README, "Install"): the build's decisions (build_config.py, setup.py run for real
in a child process), a library that exists but fails to load, `import sn_ext.info`, and, with
SN_EXT_PACKAGING_TEST=1 (`make test-packaging`, run by CI), the whole route: an sdist built from this checkout,
installed with --no-build-isolation into a fresh virtual environment that reuses this environment's torch, imported
from outside the checkout, run forward and backward, `python -m sn_ext.info` reporting its compiled library."""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_config  # noqa: E402

PACKAGING = os.environ.get("SN_EXT_PACKAGING_TEST") == "1"
CUDA_HOME = build_config.find_cuda_home({"PATH": os.environ.get("PATH", "")})[0]
# Whether setup.py builds the CUDA kernels here: a CUDA build of torch and a toolkit of its major version.
CUDA_BUILD = (
    CUDA_HOME is not None
    and build_config.cuda_problem(torch.version.cuda, build_config.nvcc_version(CUDA_HOME)) is None
)


def run_setup(args: list[str], env_overrides: dict[str, str | None], python: str = sys.executable):
    """setup.py run as pip runs it (cwd = the source tree), with these environment variables set or removed."""
    env = dict(os.environ)
    for name, value in env_overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([python, "setup.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# The build's decisions


def test_arch_list_without_a_gpu_is_torchs_architectures_with_ptx_for_the_newest():
    torch_archs = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_90a", "sm_100", "sm_120"]
    nvcc = ["compute_75", "compute_80", "compute_86", "compute_89", "compute_90", "compute_100", "compute_120"]
    assert build_config.cuda_arch_list(torch_archs, nvcc) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    # an architecture this nvcc cannot compile any more (sm_50 in CUDA 13) is left out
    assert build_config.cuda_arch_list(["sm_50", "sm_90"], nvcc) == "9.0+PTX"


def test_toolkit_is_validated_and_a_wrapper_nvcc_is_not_taken_for_one(tmp_path):
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text('#!/bin/sh\nexec /usr/local/cuda/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    home, reason = build_config.find_cuda_home({"PATH": str(wrapper_dir)})
    assert home != str(tmp_path), reason  # tmp_path has bin/nvcc but no headers or libcudart
    assert build_config.toolkit_problem(str(tmp_path)) == f"{tmp_path}/include/cuda_runtime.h does not exist"
    home, reason = build_config.find_cuda_home({"CUDA_HOME": str(tmp_path), "PATH": ""})
    assert home is None and reason.startswith(f"CUDA_HOME={tmp_path} is unusable"), reason


def test_cuda_problem_names_the_mismatch():
    assert build_config.cuda_problem("13.0", "13.0") is None
    assert build_config.cuda_problem("12.8", "12.4") is None  # torch accepts a minor difference
    assert "CUDA 13.0 and torch was built with CUDA 12.4" in build_config.cuda_problem("12.4", "13.0")
    assert "CPU-only build" in build_config.cuda_problem(None, "13.0")


@pytest.mark.skipif(not CUDA_BUILD, reason="needs a CUDA build of torch and a CUDA toolkit of its major version")
def test_setup_finds_the_toolkit_and_picks_architectures_without_gpu_or_cuda_home(tmp_path):
    """No CUDA_HOME, an nvcc wrapper first on PATH, no TORCH_CUDA_ARCH_LIST, no GPU: the toolkit is found and the
    architectures are torch's own (the IndexError and the -lcudart link failure of issue 12)."""
    (tmp_path / "nvcc").write_text('#!/bin/sh\nexec /usr/local/cuda/bin/nvcc "$@"\n')
    (tmp_path / "nvcc").chmod(0o755)
    result = run_setup(
        ["--version"],
        {
            "CUDA_HOME": None,
            "CUDA_PATH": None,
            "TORCH_CUDA_ARCH_LIST": None,
            "FORCE_CUDA": None,
            "PATH": f"{tmp_path}:{os.environ['PATH']}",
            "CUDA_VISIBLE_DEVICES": "",
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("sn_ext: building"))
    assert "CPU + CUDA kernels" in line and f"toolkit {CUDA_HOME}" in line, line
    expected = build_config.cuda_arch_list(build_config.torch_cuda_archs(torch), build_config.nvcc_gpu_archs(CUDA_HOME))
    assert f"TORCH_CUDA_ARCH_LIST={expected}" in line and expected.endswith("+PTX"), line


def test_setup_builds_cpu_only_saying_why_and_force_cuda_makes_it_an_error(tmp_path):
    result = run_setup(["--version"], {"CUDA_HOME": str(tmp_path), "FORCE_CUDA": None})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"CPU kernels only (CUDA_HOME={tmp_path} is unusable: {tmp_path}/bin/nvcc does not exist)" in result.stdout
    result = run_setup(["--version"], {"CUDA_HOME": str(tmp_path), "FORCE_CUDA": "1"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"sn_ext: FORCE_CUDA=1 but the CUDA kernels cannot be built: CUDA_HOME={tmp_path} is unusable: "
        f"{tmp_path}/bin/nvcc does not exist"
    )


def test_setup_without_torch_says_in_one_line_what_to_run(tmp_path):
    """As pip's isolated build environment runs it: an interpreter without torch."""
    venv.EnvBuilder(with_pip=False).create(tmp_path / "bare")
    result = run_setup(["--version"], {}, python=str(tmp_path / "bare" / "bin" / "python"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-build-isolation" in lines[0], result.stderr


def test_sdist_manifest_carries_every_source():
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        manifest = f.read()
    for pattern in ("*.h", "*.cuh", "*.cpp", "*.cu"):
        assert "recursive-include csrc" in manifest and pattern in manifest, pattern
    assert "build_config.py" in manifest  # setup.py imports it


def test_every_package_under_sn_ext_is_installed():
    """pyproject.toml finds sn_ext's packages instead of listing them (a hand-written list once left sn_ext.compat
    out of the sdist, which then failed at `import sn_ext`); what it finds is every folder holding an __init__.py."""
    from setuptools import find_packages

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert '[tool.setuptools.packages.find]\ninclude = ["sn_ext", "sn_ext.*"]' in pyproject
    on_disk = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(ROOT, "sn_ext"))
        if "__init__.py" in files
    }
    assert set(find_packages(ROOT, include=["sn_ext", "sn_ext.*"])) == on_disk


# ---------------------------------------------------------------------------------------------------------------
# Loading


BROKEN_LIBRARY_SCRIPT = textwrap.dedent("""
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import sn_ext
    import torch
    messages = [str(w.message) for w in caught if "sn_ext" in str(w.message)]
    print(len(messages))
    print(messages[0] if messages else "")
    print(sn_ext.ops.library_status.loaded)
    layer = sn_ext.spectral_norm(torch.nn.Linear(4, 3))
    layer(torch.randn(2, 4)).sum().backward()  # the reference kernels serve
""")


@pytest.mark.parametrize("disabled", [False, True], ids=["warns", "silenced"])
def test_a_library_that_fails_to_load_warns_once_naming_the_reason(tmp_path, disabled):
    """A copy of the package whose _C is not a loadable library (as one built against another torch)."""
    shutil.copytree(
        os.path.join(ROOT, "sn_ext"), tmp_path / "sn_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__")
    )
    (tmp_path / "sn_ext" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not a shared library")
    env = {k: v for k, v in os.environ.items() if k != "SN_EXT_DISABLE_EXT"}
    env["PYTHONPATH"] = str(tmp_path)
    if disabled:
        env["SN_EXT_DISABLE_EXT"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", BROKEN_LIBRARY_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count, message, loaded = result.stdout.splitlines()[:3]
    assert loaded == "False"
    if disabled:
        assert count == "0", message
    else:
        assert count == "1", message
        assert "could not be imported" in message and "SN_EXT_DISABLE_EXT=1" in message, message


def test_info_stays_callable_after_importing_the_info_module():
    result = subprocess.run(
        [sys.executable, "-c", "import sn_ext.info, sn_ext, json; print(json.dumps(sn_ext.info()['sn_ext']))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import sn_ext

    assert json.loads(result.stdout) == sn_ext.__version__


# ---------------------------------------------------------------------------------------------------------------
# The whole route (make test-packaging)


USER_SCRIPT = textwrap.dedent("""
    import sys, torch, sn_ext
    assert sn_ext.__file__.startswith(sys.prefix), sn_ext.__file__  # the installed copy, not the checkout
    assert sn_ext.ops.library_status.loaded, sn_ext.ops.library_status.reason
    torch.manual_seed(0)
    reference = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(3, 5, 3))
    torch.manual_seed(0)
    layer = sn_ext.spectral_norm(torch.nn.Conv2d(3, 5, 3))
    x = torch.randn(2, 3, 7, 7)
    ours, theirs = layer(x), reference(x)
    ours.square().sum().backward(); theirs.square().sum().backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad,
                               reference.parametrizations.weight.original.grad)
    print("USER-OK")
""")


@pytest.mark.skipif(
    not PACKAGING, reason="builds and installs an sdist (minutes): SN_EXT_PACKAGING_TEST=1, `make test-packaging`"
)
def test_sdist_installs_into_a_fresh_environment_and_runs(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), ROOT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    (sdist,) = glob.glob(str(dist / "sn_ext-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = subprocess.run(
        ["git", "ls-files", "csrc", "setup.py", "build_config.py", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(tracked) <= names, f"missing from the sdist: {sorted(set(tracked) - names)}"

    # A fresh environment that sees this one's packages (torch) through a .pth file, not its sn_ext: the checkout is
    # not on its path, and this environment's editable install is not activated from there.
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(site, "reuse_torch.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    env.pop("SN_EXT_DISABLE_EXT", None)
    # --ignore-installed: pip sees this environment's sn_ext through the .pth file and must leave it alone.
    install = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-v",
            sdist,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stdout[-8000:] + install.stderr[-5000:]
    assert "sn_ext: building" in install.stdout + install.stderr

    run = subprocess.run(
        [python, "-c", USER_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "USER-OK" in run.stdout, run.stdout + run.stderr
    info = subprocess.run(
        [python, "-m", "sn_ext.info"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["compiled_library"]["loaded"] is True, report
    if CUDA_BUILD:
        assert "CUDA" in report["compiled_library"]["reason"], report
