# Two commands a newcomer runs: `make quickstart` and `make test`. Everything else here serves them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# The CPU build keeps the venv small; a GPU machine installs the package into its own torch environment.
TORCH_SPEC ?= torch==2.13.0+cpu
PIP_FLAGS ?=
PYTEST_ARGS ?=

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv quickstart test services-install clean

# Rebuilt only when pyproject.toml changes; the package itself is installed editable. One pip call
# (one resolve) without byte-compiling every installed file: Python compiles what it imports, once.
# The quickstart needs no test tools; `make test` adds them (moto's server alone is ~40 packages).
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --no-compile $(PIP_FLAGS) "$(TORCH_SPEC)" -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q --no-compile $(PIP_FLAGS) -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The main job on the embedded defaults: synthetic shards, a local Ray cluster, results in ./results.
quickstart: venv
	test -f data/synthetic/manifest.json || $(VENV)/bin/ocr-cluster data synth data/synthetic
	$(VENV)/bin/python -m ocr_cluster.train jobs/quickstart.yaml
	$(VENV)/bin/ocr-cluster results table --store results

# SLURM comes from Debian's packages; the script is a no-op when they are already there.
services-install:
	bash scripts/install_slurm.sh

test: $(VENV)/.installed-test services-install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
