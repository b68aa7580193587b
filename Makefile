# The two commands of the README. Each sets itself up (virtual environment, installs) on a fresh machine;
# a second call finds the stamp and goes straight to work.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint setup

setup: $(STAMP)

# torch and torchvision from pip are CUDA builds: a new environment takes ~6 GB. Say so before pip fails halfway.
NEED_GIB ?= 7
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0 if free >= $(NEED_GIB) else f'make: only {free:.1f} GiB of disk free here; a new environment needs ~6 GiB (torch, torchvision): free some and run make again')"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rescascade demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

# import-linter reads the installed package, not the editable install's mapped folders: check a throwaway install
lint: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cp -r cascade training profiling pyproject.toml README.md "$$tmp"/ && \
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation --no-compile --target "$$tmp/site" "$$tmp" && \
	PYTHONPATH="$$tmp/site" $(VENV)/bin/lint-imports
