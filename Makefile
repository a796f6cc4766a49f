# Two commands do everything on a fresh machine:
#   make demo   set up .venv (if missing), train the demo model with D-CHAG on 4 ranks (torchrun, gloo
#               on CPU / NCCL on GPUs: tp=2 x dp_shard=2), then train and evaluate on the real ERA5 sample
#   make test   set up .venv (if missing) and run the test suite
# TORCH_SPEC picks the torch build installed *before* the package (default: the CPU wheel here).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dchag-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,hf]"  # hf: transformers, torch-free (the HF ViT adapter's tests)
	touch $(STAMP)

DEMO_RANKS ?= 4
DEMO_LAYOUT ?= parallel.tp=2 parallel.dp_shard=2

demo: setup
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node $(DEMO_RANKS) \
		-m dchag train --config configs/tiny-weather.yaml --out runs/demo --overwrite --set $(DEMO_LAYOUT)
	$(PY) -m dchag train --config configs/era5-sample.yaml --out runs/era5-sample --overwrite --no-progress
	$(PY) -m dchag eval --run runs/era5-sample --json runs/era5-sample/eval.json --plots runs/era5-sample/plots

test: setup
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
