PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: setup model kernels run serve test bench gpu-check clean

setup: $(VENV)/.installed model kernels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,bench,test]'
	# FlashInfer's Python API without its CUDA libraries: the tests check our calls against it (it runs only on a GPU)
	$(PY) -m pip install --quiet --no-deps flashinfer-python==0.6.18 apache-tvm-ffi==0.1.9 einops==0.8.2 \
		tabulate==0.10.0 nvidia-ml-py==13.580.82
	touch $@

model: $(VENV)/.installed
	$(PY) -m engine.default_model

kernels: $(VENV)/.installed
	$(PY) -c "from kernels import cpu_build as k; print('CPU kernels:', 'ready' if k.available() else k.load_error())"

run: setup
	$(PY) -m engine --prompt "$(PROMPT)"

serve: setup
	$(PY) -m server

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) -m bench throughput

# On a GPU machine: the Triton kernels and the engine's GPU path checked and benchmarked (report in bench_out/gpu_check).
# Uses that machine's python (torch, triton, transformers, pytest), not this venv; the C++ CPU kernels are left
# unbuilt there (the tests' CPU reference path is plain torch), which saves their compile.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=. DSPARK_DISABLE_CPU_KERNELS=1 $(GPU_PYTHON) -m bench.gpu_check --out bench_out/gpu_check

clean:
	rm -rf $(VENV) models .cache
