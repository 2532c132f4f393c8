PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: setup model kernels run serve test bench clean

setup: $(VENV)/.installed model kernels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,bench,test]'
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

clean:
	rm -rf $(VENV) models .cache
