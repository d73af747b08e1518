"""The appliance image builds with its one documented command (image/build, run by
`make image`), has the gateway inside, and boots: under systemd (systemd-nspawn
--boot) the real unit starts the gateway with all its sandboxing, READY and STATUS
reach systemd, a C-STORE is stored and journalled with its fields, the watchdog
restarts a frozen gateway, and a stop is clean.

Slow (mkosi bootstraps Debian bookworm; the watchdog needs 30 s): ``make test-slow``.
Needs root, mkosi, debootstrap and systemd-container (SLOW_PACKAGES in the
Makefile).  The build time and size are printed (pytest -s) and written to
image/out/build.txt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from gateway import __version__

from .support import corpus

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = "/opt/dicom-gateway/venv/bin"

pytestmark = pytest.mark.slow


def _in_image(image: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(image), *cmd], capture_output=True, text=True, check=False, timeout=120
    )


@pytest.fixture(scope="module")
def image() -> Path:
    if os.geteuid() != 0 or shutil.which("mkosi") is None:
        pytest.skip("needs root and mkosi (make test-slow installs it)")
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "image" / "build")], capture_output=True, text=True, check=False, timeout=3600
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-8000:]
    tree = Path(proc.stdout.strip().splitlines()[-1])
    size = subprocess.run(
        ["du", "-s", "--block-size=1M", "--apparent-size", str(tree)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    summary = f"image/build: {elapsed:.0f} s, {size} MB ({tree})"
    print(summary)
    (tree.parent / "build.txt").write_text(summary + "\n")
    return tree


def test_image_has_the_gateway_enabled(image: Path) -> None:
    assert (image / "usr/bin/python3").exists()
    version = _in_image(image, f"{VENV_BIN}/dicom-gateway", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"dicom-gateway {__version__}"
    sd = _in_image(image, f"{VENV_BIN}/python", "-c", "import systemd.daemon")
    assert sd.returncode == 0, sd.stderr

    enabled = subprocess.run(
        ["systemctl", f"--root={image}", "is-enabled", "dicom-gateway.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr
    unit = image / "usr/lib/systemd/system/dicom-gateway.service"
    assert unit.read_text() == (ROOT / "systemd/dicom-gateway.service").read_text()

    passwd = (image / "etc/passwd").read_text()
    assert re.search(r"^dicom-gateway:x:\d+:\d+:", passwd, re.M), passwd
    check = _in_image(
        image, f"{VENV_BIN}/dicom-gateway", "check-config", "/etc/dicom-gateway/gateway.toml"
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # The build-only compiler is gone again.
    assert not (image / "usr/bin/gcc").exists()


Inside = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def booted(image: Path, tmp_path: Path) -> Iterator[Inside]:
    """A copy of the image booted with systemd-nspawn (private network); yields a
    function running a command inside it (nsenter into all its namespaces)."""
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("needs systemd-nspawn (Debian package systemd-container)")
    tree = tmp_path / "box"
    subprocess.run(["cp", "-a", str(image), str(tree)], check=True)
    shutil.copy(corpus.testdata("CT_small.dcm"), tree / "root/ct.dcm")
    log = (tmp_path / "console.log").open("wb")
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "--quiet", f"--directory={tree}", "--boot", "--keep-unit",
         "--register=no", "--private-network", "--console=pipe"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(nspawn.pid).children():
            assert nspawn.poll() is None, (tmp_path / "console.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        pid1 = psutil.Process(nspawn.pid).children()[0].pid

        def inside(*cmd: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["nsenter", "-t", str(pid1), "-a", *cmd],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )

        yield inside
        inside("systemctl", "poweroff")
        nspawn.wait(timeout=120)
    finally:
        if nspawn.poll() is None:
            nspawn.kill()
            nspawn.wait()


def _show(inside: Inside, prop: str) -> str:
    return inside(
        "systemctl", "show", "dicom-gateway.service", "-p", prop, "--value"
    ).stdout.strip()


def _wait(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_image_boots_and_the_unit_runs_the_gateway(booted: Inside) -> None:
    inside = booted
    _wait("the gateway active", lambda: _show(inside, "ActiveState") == "active", 120)
    # Type=notify: active means READY=1 arrived; STATUS= is the gateway's own line.
    assert _show(inside, "StatusText").startswith("AE DICOMGW on 0.0.0.0:104;")
    assert _show(inside, "NRestarts") == "0"

    # A modality's C-STORE on port 104, under the real sandbox and capability set.
    sent = inside(f"{VENV_BIN}/dicom-gateway", "send", "--port", "104", "--calling-ae",
                  "CT_ROOM1", "/root/ct.dcm")  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    uid = sent.stdout.split()[-1]
    journal = inside("journalctl", "-u", "dicom-gateway", "-o", "verbose", "--no-pager").stdout
    assert f"SOP_INSTANCE_UID={uid}" in journal and "CALLING_AE=CT_ROOM1" in journal

    # Pings arrive: the watchdog timestamp moves (every 15 s of WatchdogSec=30s).
    first = _show(inside, "WatchdogTimestampMonotonic")
    _wait("a watchdog ping", lambda: _show(inside, "WatchdogTimestampMonotonic") != first, 30)

    # Frozen gateway: no pings, systemd kills it (WatchdogSec, then TimeoutAbortSec)
    # and starts a new one.
    frozen = _show(inside, "MainPID")
    assert inside("kill", "-STOP", frozen).returncode == 0
    _wait("a restart", lambda: _show(inside, "NRestarts") == "1", 120)
    _wait("the gateway active again", lambda: _show(inside, "ActiveState") == "active", 60)
    assert _show(inside, "MainPID") != frozen
    journal = inside("journalctl", "-u", "dicom-gateway", "--no-pager").stdout
    assert "Watchdog timeout" in journal, journal[-3000:]

    # A clean stop within TimeoutStopSec.
    assert inside("systemctl", "stop", "dicom-gateway.service").returncode == 0
    assert _show(inside, "ExecMainStatus") == "0"
    assert _show(inside, "Result") == "success"
