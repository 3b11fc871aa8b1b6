# The README's two commands: `make demo` (the main job on embedded defaults) and `make test`.
# Each creates the virtual environment and installs the pinned dependencies when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_ARGS ?=

.PHONY: demo test install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/pipeline.py $(DEMO_ARGS)

test: $(STAMP) browser
	$(PY) -m pytest -q

# Debian's Chromium for the MLflow UI test (tests/test_mlflow_ui.py), installed when missing and
# this is a root shell with apt-get (a fresh CI machine); elsewhere that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the MLflow UI test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	    echo "could not install chromium: tests/test_mlflow_ui.py will be skipped"; \
	  else echo "chromium not found and not installable here (needs root and apt-get): tests/test_mlflow_ui.py will be skipped"; fi; }

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db data
