# llmkit — `make install`, `make test`, `make demo` are all a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLMKIT := $(VENV)/bin/llmkit
# torch is installed first and only when missing: 2.13.0 is the CPU wheel on these machines'
# disk; from PyPI on a Linux GPU machine the same pin is a CUDA build. Install your own torch
# first (or set TORCH_SPEC) to keep it.
TORCH_SPEC ?= torch==2.13.0
SHAKESPEARE_URL := https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
DATA ?= $(firstword $(wildcard ../shared/data/tinyshakespeare/input.txt) data/tinyshakespeare/input.txt)

.PHONY: install test test-slow test-clusters test-all lint format demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,eval,html,serve,gguf,distributed,ray]'
	@# DeepSpeed (sharded training, tests/training/test_train_deepspeed.py): only when it installs
	@# cleanly from the package index; the tests that need it skip without it
	@$(PY) -m pip install -q -e '.[deepspeed]' >/dev/null 2>&1 || \
	  echo "note: deepspeed not installed; its tests will be skipped"
	@# the chat page's browser test needs chromium + chromedriver: installed when apt-get can
	@# (best effort: the install never fails over it; the test skips without them)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -q && apt-get install -y -q chromium chromium-driver' >/dev/null 2>&1 \
	    || echo "note: chromium not installed; the chat page's browser test will be skipped"; }
	@# prepare --executor slurm's real one-node Slurm test (make test-slow) needs Debian's
	@# slurm-wlm (munged, slurmctld, slurmd, sbatch): installed when apt-get can, best effort
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -q && apt-get install -y -q slurm-wlm' >/dev/null 2>&1 \
	    || echo "note: slurm-wlm not installed; the real Slurm test will be skipped"; }
	@touch $@

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -q -m slow

# prepare --executor ray|slurm on real clusters started (and stopped) by the tests on this
# machine, loopback only: a 2-node Ray and a one-node Slurm (skipped, saying why, without
# unshare, Ray or slurm-wlm). About three minutes; also part of test-slow.
test-clusters: install
	$(PY) -m pytest -q -m slow tests/data/distributed/test_distributed_clusters.py

test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

data/tinyshakespeare/input.txt:
	@mkdir -p $(dir $@)
	@curl -fsSL $(SHAKESPEARE_URL) -o $@.part && mv $@.part $@ || { rm -f $@.part; rmdir -p $(dir $@) 2>/dev/null; \
	  echo "error: cannot download tiny Shakespeare from $(SHAKESPEARE_URL) (offline?) — pass DATA=path/to/text.txt" >&2; exit 2; }

demo: install $(DATA)
	$(LLMKIT) prepare $(DATA) --output data/shakespeare --vocab-size 1024 --block-size 128 --overwrite
	$(LLMKIT) train --config recipes/shakespeare-tiny.yaml --overwrite
	$(LLMKIT) generate "ROMEO:" --model runs/shakespeare-tiny --max-new-tokens 100 --seed 2
	$(LLMKIT) eval --model runs/shakespeare-tiny --data data/shakespeare

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit $$?; done

clean:
	rm -rf runs data/shakespeare .pytest_cache .ruff_cache
