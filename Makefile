# `make run` and `make test` are the two commands of the README: each installs what is
# missing (Debian packages, the .venv) and then does its job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?=
comma := ,

# systemd-python builds from source: it needs the headers and a compiler. glymur
# (J2K with BYPASS for large frames) loads OpenJPEG from libopenjp2-7.
RUN_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev libopenjp2-7
# The real peers the tests talk to: DCMTK and GDCM (gdcmscu, gdcmconv) as modalities
# and decoders, Orthanc + DICOMweb behind nginx (mutual TLS) as the cloud archive; Chromium looks at the status page; systemd
# for systemd-analyze (unit checks); Prometheus and promtool run the alerts of monitoring/
# against gateways and the fleet receiver.
TEST_PACKAGES := $(RUN_PACKAGES) dcmtk libgdcm-tools orthanc orthanc-dicomweb nginx-light chromium systemd prometheus
# The end-to-end benchmark's Orthanc edge peer transcodes to JPEG 2000 with the GDCM plugin.
BENCH_PACKAGES := orthanc-gdcm
# The slow tests apply the Ansible role to a debootstrap chroot and build the image
# with mkosi (which runs systemd-nspawn). The power-cut test puts the spool's ext4 on
# btrfs (reflink snapshots) and runs a gateway under eatmydata (fsync disabled).
SLOW_PACKAGES := debootstrap mkosi systemd-container btrfs-progs eatmydata
# ansible-playbook and ansible-lint live in their own venv: many dependencies.
ANSIBLE_VENV := .venv-ansible

.PHONY: run test test-slow bench lint wheel image dashboard clean

run: $(VENV)/.run-installed
	$(BIN)/dicom-gateway run $(if $(CONFIG),--config $(CONFIG))

test: $(VENV)/.test-installed
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(VENV)/.test-installed $(ANSIBLE_VENV)/.installed
	scripts/ensure-packages $(SLOW_PACKAGES)
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.test-installed
	scripts/ensure-packages $(BENCH_PACKAGES)
	$(BIN)/python tests/bench/ingest.py
	$(BIN)/python tests/bench/e2e.py --repeats 3
	$(BIN)/python tests/bench/transcode.py
	$(BIN)/python tests/bench/mpps.py --steps 200
	$(BIN)/python tests/bench/commitment.py --studies 20 --instances 50 --scu stock
	$(BIN)/python tests/bench/commitment.py --studies 20 --instances 50 --scu woken
	$(BIN)/python tests/bench/crash_run.py --kills 200
	$(BIN)/python tests/bench/status.py
	$(BIN)/python tests/bench/worklist.py
	$(BIN)/python tests/bench/conformance.py
	$(BIN)/python tests/bench/bandwidth.py --seconds 30
	$(BIN)/python tests/bench/uplink.py
	$(BIN)/python tests/bench/fleet.py --boxes 1000 --windows 3 --window-seconds 30
	$(BIN)/python tests/bench/chaos.py --seconds 1800

lint: $(VENV)/.test-installed $(ANSIBLE_VENV)/.installed
	$(BIN)/ruff check gateway tests monitoring
	$(BIN)/ruff format --check gateway tests monitoring
	$(BIN)/mypy
	PATH="$(CURDIR)/$(ANSIBLE_VENV)/bin:$$PATH" ansible-lint -q --profile production ansible/

# The Grafana dashboard of monitoring/, generated with grafanalib (tests/test_monitoring.py
# fails while the committed JSON differs from what the generator makes).
dashboard: $(VENV)/.test-installed
	$(BIN)/python monitoring/dashboard.py monitoring/dashboard.json

# The gateway as a wheel (dist/), what the Ansible role installs on a box.
wheel: $(VENV)/.test-installed
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

# The appliance OS image tree (image/README.md): image/out/dicom-gateway-image.
image: $(VENV)/.test-installed
	scripts/ensure-packages $(SLOW_PACKAGES)
	time image/build

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

$(ANSIBLE_VENV)/.installed: ansible/requirements.txt
	test -x $(ANSIBLE_VENV)/bin/python || $(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/python -m pip install -q --upgrade pip
	$(ANSIBLE_VENV)/bin/python -m pip install -q -r ansible/requirements.txt
	touch $@

clean:
	rm -rf $(VENV) $(ANSIBLE_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -rf image/staging image/out
