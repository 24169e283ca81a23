# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision first and pinned: PyPI's torchvision does not load beside other torch builds.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow venv bench gpu-wheels clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/ichd-ray demo

# Two tiers: `make test` (under 20 min here); `make test-slow` runs the fault scenarios (SIGKILLs, a
# node killed, S3 through a fault proxy, a full disk); .ci/run runs both.
test: venv
	$(PY) -m pytest -m "not slow" --durations=15

test-slow: venv
	$(PY) -m pytest -m slow --durations=15

bench: venv
	$(PY) bench/preprocess.py

# pydantic for a GPU image that has torch and timm but not it (bench/gpu.py imports the model configs).
GPU_PYTHON ?= 3.12
gpu-wheels: venv
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -m pip list --format=freeze | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')

clean:
	rm -rf demo_out .pytest_cache
