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
# (one resolve), then the installed files byte-compiled on all cores: a Ray job starts a dozen Python
# processes that import Ray and torch, and where PYTHONDONTWRITEBYTECODE is set (many images set it)
# nothing caches that compile, so each process would redo it (start-up 54 s against 29 s, benchmarks/README.md).
# A few files are for newer Pythons (torch's py312 test helpers) and cannot compile here, hence `|| true`.
# The quickstart needs no test tools; `make test` adds them (moto's server alone is ~40 packages).
SITE_PACKAGES = $$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
COMPILE_VENV = $(VENV)/bin/python -m compileall -qq -j 0 -x '/tests?/' $(SITE_PACKAGES) || true

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --no-compile $(PIP_FLAGS) "$(TORCH_SPEC)" -e .
	$(COMPILE_VENV)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q --no-compile $(PIP_FLAGS) -e '.[test]'
	$(COMPILE_VENV)
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
