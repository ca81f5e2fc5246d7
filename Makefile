# Two commands matter on a fresh machine: `make setup && make demo`, and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
PROFILE ?= small

.PHONY: setup test test-all demo bench clean lint-bundle

setup: $(VENV)/.installed .cache/jars/.resolved

# Re-installs only when the pins change; a second `make setup` does nothing.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.9.30
	$(UV) pip install --python $(PY) -q -c constraints.txt -e '.[dev]'
	touch $@

# Delta JARs from Maven Central, once, into a project-owned cache; Spark then starts offline.
.cache/jars/.resolved: $(VENV)/.installed
	$(PY) -m recsys.jars --resolve
	touch $@

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

demo: setup
	$(PY) -m recsys.cli --profile $(PROFILE) demo

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf data spark-warehouse metastore_db derby.log
