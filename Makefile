# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TINY_MODELS ?= $(HOME)/.cache/imagegen/tiny-models
FULLSIZE_MODELS ?= $(HOME)/.cache/imagegen/fullsize-models
export TINY_MODELS FULLSIZE_MODELS

.PHONY: install models lint test demo bench bench-gpu device-kit fullsize soak fuzz clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,gpu]'
	touch $@

install: $(VENV)/.installed

# Random-weight models of the real architectures, cached outside git; rebuilt when the factory changes.
$(TINY_MODELS)/.stamp: $(VENV)/.installed $(wildcard deployments/factory/*.py)
	rm -rf $(TINY_MODELS)
	$(PY) -m deployments.factory $(TINY_MODELS)
	touch $@

models: $(TINY_MODELS)/.stamp

lint: install
	$(VENV)/bin/ruff check deployments graphs tests
	$(VENV)/bin/mypy

# Three pytest processes: unit and graph tests (in-process Serve), then the integration tests on a real local
# cluster of their own (a process that ran the graph in-process cannot pickle the app for a real cluster), then
# the two-node cluster (one driver connection per process: it cannot join the single-node one).
test: lint models
	$(PY) -m pytest -q --durations=15 -m "not integration and not device_kit"
	$(PY) -m pytest -q --durations=15 -m "integration and not nodes"
	$(PY) -m pytest -q --durations=5 -m nodes

demo: models
	$(PY) -m graphs.demo

bench: models
	$(PY) -m tests.bench_overhead --out bench.json

# Full-size random-weight models (about 20 GB, minutes of CPU), then the full-size checks; not part of `make test`.
$(FULLSIZE_MODELS)/.stamp: $(VENV)/.installed
	$(PY) -m deployments.factory $(FULLSIZE_MODELS) --full
	touch $@

fullsize: $(FULLSIZE_MODELS)/.stamp
	IMAGEGEN_FULLSIZE=1 $(PY) -m pytest -q tests/test_fullsize.py
	$(PY) -m tests.bench_gpu --out fullsize-cpu.json

# On a CUDA machine: the stage table (building the fixtures on the GPU), then the Serve figures. Without CUDA it
# runs the CPU mode: the full-size base at 256², 2 steps, against its float32 self.
bench-gpu: install
	$(PY) -m tests.bench_gpu
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then $(PY) -m tests.bench_gpu_serve; \
	else echo "no CUDA here: Serve figures skipped"; fi

# What a GPU machine without a registry lacks, as one archive to carry (README: "Measuring on a GPU machine").
device-kit: install
	$(PY) -m pytest -q -m device_kit tests/test_fixtures.py
	$(PY) -m tests.device_kit

soak: models
	$(PY) -m tests.soak

# The schema fuzzing of `make test` (tests/test_schema.py) with more examples of every operation (minutes).
fuzz: models
	SCHEMA_EXAMPLES=$${SCHEMA_EXAMPLES:-40} $(PY) -m pytest -q -m integration tests/test_schema.py

clean:
	rm -rf $(VENV) $(TINY_MODELS) $(FULLSIZE_MODELS)
