# patchrec_dist: `make demo` runs the main job on embedded defaults, `make test` the tests.
# Everything installs into .venv with torch pinned (constraints.txt): an unpinned resolve can
# pull a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[test,gguf,bench,ray]"
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m patchrec_dist.demo $(ARGS)

lint: setup
	$(VENV)/bin/ruff check patchrec_dist launchers tools tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
