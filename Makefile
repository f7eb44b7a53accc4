# Two commands: `make demo` (set up, then run the study on the built-in default)
# and `make test` (set up, then the test suite). Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing pinned dependencies into $(VENV)"
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q --disable-pip-version-check --no-compile -r requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-compile --no-deps --no-build-isolation -e .
	@# pip compiles bytecode on one core; compileall uses every core (bench/bench_demo.py --stages setup).
	@# It exits 1 when a file does not compile (some packages ship invalid files as test data); pip ignores those too.
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") > /dev/null || true
	@touch $(STAMP)

# demo.sh runs (and times) `make setup` itself as its first stage.
demo:
	bash data_scripts/demo.sh

# Two xdist workers of one thread each (one per core), handed whole files in collection order (tests/conftest.py
# puts the longest first); the session fixtures are built once for both (conftest.built_once).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20
