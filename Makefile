PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: setup model kernels run serve test bench gpu-check gpu-pack gpu-train clean

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

# A draft training leg on one GPU with no network (docs/training.md#a-gpu-leg): `make gpu-pack` here writes the
# conversations and the target's GGUF in parts under data/gpupack; `make gpu-train` there reassembles them, trains the
# default draft for GPU_MINUTES (features and export included) and writes it to GPU_EXPORT in shards of <= 15 MiB.
GPU_PACK ?= data/gpupack
GPU_MINUTES ?= 8
GPU_EXPORT ?= $(if $(OUT),$(OUT)/draft,runs/dspark_smollm2_gpu/export)
gpu-pack:
	$(PY) -m train.gpu_leg pack --config train/configs/dspark_smollm2_gpu.json --out $(GPU_PACK)

gpu-train:
	PYTHONPATH=. DSPARK_DISABLE_CPU_KERNELS=1 PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m train.gpu_leg train --pack $(GPU_PACK) \
		--minutes $(GPU_MINUTES) --out runs/dspark_smollm2_gpu --export-to $(GPU_EXPORT)

clean:
	rm -rf $(VENV) models .cache
