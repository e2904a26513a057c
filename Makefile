# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TINY_MODELS ?= $(HOME)/.cache/imagegen/tiny-models
export TINY_MODELS

.PHONY: install models lint test demo bench soak clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Random-weight models of the real architectures, cached outside git; rebuilt when the factory changes.
$(TINY_MODELS)/.stamp: $(VENV)/.installed deployments/tiny.py deployments/sgm.py
	rm -rf $(TINY_MODELS)
	$(PY) -m deployments.tiny $(TINY_MODELS)
	touch $@

models: $(TINY_MODELS)/.stamp

lint: install
	$(VENV)/bin/ruff check deployments graphs tests
	$(VENV)/bin/mypy

test: lint models
	$(PY) -m pytest -q

demo: models
	$(PY) -m graphs.demo

bench: models
	$(PY) -m tests.bench_overhead

soak: models
	$(PY) -m tests.soak

clean:
	rm -rf $(VENV) $(TINY_MODELS)
