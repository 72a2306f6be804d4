# The two commands: `make test` and `make reproduce`. Both create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PRESET ?= default
TORCH_CPU ?= torch==2.13.0

.PHONY: venv test test-all reproduce zoo lab bench clean browser-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "$(TORCH_CPU)"
	$(PIP) install -e ".[test,notebooks]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (workbench)"
	touch $@

venv: $(VENV)/.installed

# Chromium for the JupyterLab browser test (Debian's package; never a browser download).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: install Debian's 'chromium' package for the browser test"; fi; }

test: venv browser-deps
	$(PY) -m pytest -q

test-all: venv browser-deps
	$(PY) -m pytest -q -m ""

zoo: venv
	$(PY) -m workbench zoo --preset $(PRESET)

reproduce: venv
	$(PY) -m workbench reproduce --preset $(PRESET)

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

bench: venv
	$(PY) benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
