# Two commands matter on a fresh machine: `make setup && make demo`, and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
PROFILE ?= small

.PHONY: setup test test-fast lint test-all demo serve bench bench-demo bench-pipeline bench-real-week bench-nightly bench-checks bench-system-cost bench-lookup bench-serve clean lint-bundle

setup: $(VENV)/.installed .cache/jars/.resolved

# Re-installs only when the pins change; a second `make setup` does nothing.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.9.30
	$(UV) pip install --python $(PY) -q --compile-bytecode -c constraints.txt -e '.[spark,dev]'
	touch $@

# Delta JARs from Maven Central, once, into a project-owned cache; Spark then starts offline.
.cache/jars/.resolved: $(VENV)/.installed
	$(PY) -m recsys.jars --resolve
	touch $@

# Two pytest workers, a test file each at a time (a file's Spark fixtures are built once): on tiny data a Spark
# session keeps about one core busy planning queries, so two sessions side by side use both cores.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: setup
	$(PYTEST)

# The tests that need no Spark session (seconds): models, metrics, config, bundle, lookups, checks.
test-fast: setup
	$(PY) -m pytest -q -m 'not slow and not spark'

lint: setup
	$(VENV)/bin/ruff check recsys tests benchmarks jobs

test-all: setup
	$(PYTEST) -m ''

demo: setup
	$(PY) -m recsys.cli --profile $(PROFILE) demo

# The published lists over HTTP and the page (http://127.0.0.1:8000/), without Spark; after `make demo`.
serve: setup
	$(PY) -m recsys.cli --profile $(PROFILE) serve

# Full-scale benchmarks (about an hour on 2 cores); each writes benchmarks/results/*.json, see docs/BENCHMARKS.md.
bench: setup
	$(PY) benchmarks/synth_full.py
	$(PY) benchmarks/ingest_full.py data/full/raw --nightly
	$(PY) benchmarks/features_full.py data/full/bench-ingest
	$(PY) benchmarks/train_throughput.py --scale small
	$(PY) benchmarks/score_full.py
	$(PY) benchmarks/real_week.py --ablation

# `make demo` from nothing, in a folder of its own, against its 15-minute target.
bench-demo: setup
	$(PY) benchmarks/demo.py

# The whole pipeline at full size (synth once, then every stage), stage times and peak memory.
bench-pipeline: setup
	$(PY) benchmarks/pipeline_full.py --fresh

# The two stages, the two-tower alone and the baselines on the real last week (needs ../shared/data/hm-real).
bench-real-week: setup
	$(PY) benchmarks/real_week.py --ablation

# Lookups and serving at full size (a synthetic 16.5 M-row published table, written once into data/bench-serve).
bench-lookup: setup
	$(PY) benchmarks/lookup_full.py

bench-serve: setup
	$(PY) benchmarks/serve_full.py

# The nightly from a daily drop at full size: synth + one drop, ingest, `recsys nightly --date D`, then the same
# day again (nothing to do); benchmarks/results/nightly_full.json. NIGHTLY_ARGS=--primed refreshes the lake that
# `make bench-pipeline` published (the steady state: warm from the champion); --prime builds one first.
bench-nightly: setup
	$(PY) benchmarks/nightly_full.py --scale full $(NIGHTLY_ARGS)

# What the checks before a publish cost per run, on the tables `make bench-pipeline` left.
bench-checks: setup
	$(PY) benchmarks/checks_full.py

# Where the two stages' time goes per customer (each step for 10,000 and 50,000 customers), on that lake too.
bench-system-cost: setup
	$(PY) benchmarks/system_cost.py --customers 10000 50000

clean:
	rm -rf data spark-warehouse metastore_db derby.log
