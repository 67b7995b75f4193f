# Quick start (see README.md):   make demo   |   make test
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_PREFIX = $(shell $(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
CMAKE_BUILD ?= build-cmake

# nvcc lives in /usr/local/cuda on the machines this project targets (setup.py would find it there too; CMake is
# told).
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
# Without a GPU, setup.py would compile the CUDA kernels for every architecture torch supports (minutes per
# architecture on 2 cores); for development, build for Hopper (H100/H200) only.
ifeq ($(shell command -v nvidia-smi),)
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

SOURCES := setup.py build_config.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: setup demo test test-python test-cpp test-packaging test-matrix lint format bench clean results

setup: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip setuptools wheel
	$(PYTHON) -m pip install -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	$(PYTHON) -m sn_ext.info
	touch $@

# The main job: a small SN-GAN (ring of 8 Gaussians, MLP G/D, hinge loss, sn_ext's spectral norm), ~2 minutes on
# 2 cores: samples and metrics under runs/ (see `python -m sngan.train --help` for the rest).
demo: setup
	$(PYTHON) -m sngan.train

# The results tables of docs/gan_results.md (about an hour on 2 cores).
results: setup
	$(PYTHON) -m sngan.experiments

# The benchmark suite: report, CSVs and plots in benchmarks/results/<device>/ (`$(PYTHON) -m benchmarks --help`).
bench: setup
	$(PYTHON) -m benchmarks

# The whole suite with the compiled kernels, again on the pure-PyTorch fallback, then the C++ test.
test: test-python test-cpp

test-python: setup
	$(PYTHON) -m pytest -q tests
	SN_EXT_DISABLE_EXT=1 $(PYTHON) -m pytest -q tests

# What CI runs besides `make test` (.ci/run): an sdist installed as users install it, and the version matrix
# (.ci/matrix: torch 2.11 + triton 3.6 on Python 3.12 as on the GPU machines, torch 2.6 on Python 3.10, the oldest
# supported; environments cached in ~/.cache/sn_ext/envs, a few minutes each to create the first time).
test-packaging: setup
	SN_EXT_PACKAGING_TEST=1 $(PYTHON) -m pytest -q tests/test_packaging.py

test-matrix:
	.ci/matrix

# ruff (lint + format check, pyproject.toml) and clang-format (.clang-format) on csrc/; run by CI. `make format`
# applies both formatters.
CXX_SOURCES = $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/tests/*.cpp)
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: setup
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

test-cpp: setup
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" -DCUDA_TOOLKIT_ROOT_DIR="$(CUDA_HOME)"
	cmake --build $(CMAKE_BUILD) -j 2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

clean:
	rm -rf build $(CMAKE_BUILD) sn_ext/_C*.so *.egg-info
