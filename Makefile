# `make run` and `make test` are the two commands of the README: each installs what is
# missing (Debian packages, the .venv) and then does its job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?=
comma := ,

# systemd-python builds from source: it needs the headers and a compiler.
RUN_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev
# The real peers the tests talk to: DCMTK as modality, Orthanc + DICOMweb behind
# nginx (mutual TLS) as the cloud archive.
TEST_PACKAGES := $(RUN_PACKAGES) dcmtk orthanc orthanc-dicomweb nginx-light

.PHONY: run test test-slow bench lint clean

run: $(VENV)/.run-installed
	$(BIN)/dicom-gateway run $(if $(CONFIG),--config $(CONFIG))

test: $(VENV)/.test-installed
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.test-installed
	$(BIN)/python tests/bench/ingest.py
	$(BIN)/python tests/bench/transcode.py
	$(BIN)/python tests/bench/crash_run.py --kills 200
	$(BIN)/python tests/bench/worklist.py

lint: $(VENV)/.test-installed
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy

# $(call venv_with,EXTRAS,DEBIAN PACKAGES)
define venv_with
	scripts/ensure-packages $(2)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(1)]'
	touch $@
endef

$(VENV)/.run-installed: pyproject.toml
	$(call venv_with,systemd,$(RUN_PACKAGES))

$(VENV)/.test-installed: pyproject.toml
	$(call venv_with,systemd$(comma)test,$(TEST_PACKAGES))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
