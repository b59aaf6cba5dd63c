# Two commands on a fresh machine:  `make demo` (main job end to end)  and  `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
# pytest -n 2 runs two torch processes on 2 cores: spinning OpenMP threads would wait on each other
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test test-min demo bench docs lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first: a plain `torch` requirement would pull a CUDA build of several GB
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test,doc,dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=10 --nbmake --nbmake-timeout=600 tests notebooks -p no:cacheprovider

# the suite against the declared minimum versions, in its own venv (.venv-min)
test-min:
	bash .ci/min_versions.sh

demo: $(STAMP)
	$(PY) -m sccoreset.demo --out demo_output

bench: $(STAMP)
	$(PY) benchmarks/bench_io.py
	$(PY) benchmarks/bench_accuracy.py
	$(PY) benchmarks/bench_stream.py

docs: $(STAMP)
	rm -rf docs/generated
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks && $(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-min docs/_build docs/generated demo_output
