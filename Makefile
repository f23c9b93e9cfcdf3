# The README's two commands. Each sets itself up on a fresh machine (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.transferkit-installed

.PHONY: demo test docker-test setup assets tools clients clean lint audit

setup: $(STAMP) assets tools clients

# Torch first, pinned to the releases this project is tested with (pip takes them from a local wheel
# cache where one exists, else from PyPI). Then the project with its dev extra.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Offline assets: ImageNet weights into torch's hub cache, MNIST and Fashion-MNIST into the data cache.
assets: $(STAMP)
	bash scripts/install_assets.sh $(PY)

# `hey`, the load generator the serving tests and benchmarks use (apt, where this user may)
tools:
	bash scripts/install_tools.sh

# KServe's REST client, for the Open Inference Protocol tests, in a venv of its own: kserve pins protobuf,
# pandas and psutil below the releases the project runs with.
KSERVE_VENV := .venv-kserve
# An MLflow tracking server, for the tracking and registry tests: the full mlflow package (its server's Flask,
# SQLAlchemy and alembic), kept out of the project's venv, which needs only the client (mlflow-skinny).
MLFLOW_VENV := .venv-mlflow
clients: $(KSERVE_VENV)/.installed $(MLFLOW_VENV)/.installed
$(KSERVE_VENV)/.installed:
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q kserve==0.21.0
	touch $@
$(MLFLOW_VENV)/.installed:
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q mlflow==3.18.0
	touch $@

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

# The container image end to end (tests marked `docker`; `make test` leaves them out and needs no engine).
# Where the shared setup script exists it provides the engine and a local base image first.
DOCKER_SETUP := ../shared/tools/docker-setup.sh
docker-test: setup
	if [ -f $(DOCKER_SETUP) ]; then bash $(DOCKER_SETUP); fi
	$(PY) -m pytest -q -m docker

# ruff: lint rules and formatting from pyproject.toml ([tool.ruff]); CI runs it before the tests
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Known vulnerabilities in the installed packages (pip-audit, in a venv of its own, against PyPI's advisory data).
# --strict: a package that cannot be audited fails the run, so a machine without PyPI's JSON API (the index
# mirrors of these build machines have none) reports that rather than a vacuous "no known vulnerabilities".
# docs/security.md triages the findings.
AUDIT_VENV := .venv-audit
audit: $(STAMP)
	test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install -q pip-audit==2.10.1; }
	$(AUDIT_VENV)/bin/pip-audit --strict --progress-spinner off --path $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

clean:
	rm -rf runs .pytest_cache
