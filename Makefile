# Two commands on a fresh machine with Python >= 3.10 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test test-slow test-all lint format bench clean

# Installed without byte-compiling (--no-compile): pip would compile every module of torch,
# lightning and the rest up front (~80 s on 2 cores, most of the install); Python compiles the few
# hundred modules a run imports on first use instead. That needs bytecode writing, so a
# PYTHONDONTWRITEBYTECODE of the caller's environment is dropped for the commands run here.
unexport PYTHONDONTWRITEBYTECODE

# (Re)install when the project's metadata or pins change. torch is pinned to the CPU build for
# development and CI through constraints-dev.txt; users keep any torch >= 2.4.
$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --disable-pip-version-check -c constraints-dev.txt -e '.[dev]'
	# timm's optimizers import only torch; timm itself needs torchvision, whose PyPI build is for
	# torch's CUDA build and does not load with the CPU build pinned here. So timm comes without it.
	$(PY) -m pip install --quiet --no-compile --disable-pip-version-check --no-deps -c constraints-dev.txt timm
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/spike_demo.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

# ruff, configured in pyproject.toml: the formatter's check and the linter.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_optim.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
