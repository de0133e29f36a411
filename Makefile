# Two commands do all the set-up on a fresh machine (Python >= 3.10, no model hub needed):
#   make demo   the committed miniature (checkpoints/mini): synthetic data -> probe -> aligned training ->
#               evaluation beside the floor (no ControlNet), offline on the CPU
#   make test   lint, format check and the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint format clean figures

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m innercontrol.demo --out outputs/demo

test: $(VENV)/.installed lint
	$(PY) -m pytest -q -ra

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs .pytest_cache

figures: $(VENV)/.installed
	$(PY) scripts/make_figures.py
