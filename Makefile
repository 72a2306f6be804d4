# The two commands: `make test` and `make reproduce`. Both create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Bytecode: pip installs with --no-compile (compiling all ~20,000 installed modules took ~43 s of a 2.1-min venv),
# then one import of what the workbench, its notebooks and its tests use writes the bytecode of those ~4,000
# modules (~22 s). Without it, where Python writes no bytecode itself (PYTHONDONTWRITEBYTECODE=1, as on this
# project's CI box), every kernel and test process would compile torch and transformers from source: their import
# 10.4 s instead of 4.7 s. Measured 2026-12-07 on the 2-core box.
PIP_INSTALL := $(PIP) install --no-compile
WARM_IMPORTS := import importlib, pkgutil, workbench; \
	[importlib.import_module(m.name) for m in pkgutil.walk_packages(workbench.__path__, 'workbench.') \
	 if not m.name.endswith('__main__')]; \
	import ipykernel.kernelapp, papermill, nbconvert, seaborn, matplotlib.pyplot, ipywidgets, peft, pytest, scipy.stats; \
	from transformers import LlamaForCausalLM
PRESET ?= default
TORCH_CPU ?= torch==2.13.0

.PHONY: venv test test-all reproduce zoo lab bench clean browser-deps

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) "$(TORCH_CPU)"
	$(PIP_INSTALL) -c constraints.txt -e ".[test,notebooks]"
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "$(WARM_IMPORTS)"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (workbench)"
	touch $@

venv: $(VENV)/.installed

# Chromium for the JupyterLab browser test: Debian's package at /usr/bin/chromium (driven by the
# venv's Playwright through executable_path); never a Playwright browser download.
browser-deps:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: install Debian's 'chromium' package (sudo apt-get install chromium) for tests/test_browser.py"; fi; }

test: venv browser-deps
	$(PY) -m pytest -q

test-all: venv browser-deps
	$(PY) -m pytest -q -m ""

zoo: venv
	$(PY) -m workbench zoo --preset $(PRESET)

# make reproduce [PRESET=tiny] [ONLY=02,03]: outputs under figures/<preset>/ and data/results/<preset>/;
# for the default preset the executed notebooks are also published as HTML in docs/notebooks/.
reproduce: venv
	$(PY) -m workbench reproduce --preset $(PRESET) $(if $(ONLY),--only $(ONLY))

# JupyterLab on localhost; the ipywidgets lab extension comes with jupyterlab_widgets (no build step).
# The notebooks read WORKBENCH_PRESET. Without a built default zoo and no PRESET given, they use the
# tiny preset (a zoo of a few minutes) and say so, instead of a silent ~40-minute build in a first cell.
lab: venv
	@preset="$(PRESET)"; \
	if [ "$(origin PRESET)" = "file" ] && [ ! -f "$${WORKBENCH_ZOO:-zoo}/default/zoo.json" ]; then \
	  preset=tiny; \
	  echo "notice: no default zoo yet ($${WORKBENCH_ZOO:-zoo}/default/zoo.json): the notebooks use the TINY preset"; \
	  echo "        (~20 items per benchmark: a smoke test). Real numbers: make zoo (~40 min), then make lab."; \
	fi; \
	WORKBENCH_PRESET=$$preset $(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 notebooks/

bench: venv
	$(PY) benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
