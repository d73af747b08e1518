"""The appliance image builds with its one documented command (image/build, run by
`make image`) and has the gateway inside: `dicom-gateway --version` runs there, the
unit is enabled, the static user exists, the default config is valid.

Slow (mkosi bootstraps Debian bookworm): ``make test-slow``.  Needs root, mkosi and
debootstrap (SLOW_PACKAGES in the Makefile).  The build time and size are printed
(pytest -s) and written to image/out/build.txt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gateway import __version__

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _in_image(image: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(image), *cmd], capture_output=True, text=True, check=False, timeout=120
    )


def test_image_builds_with_the_gateway_enabled() -> None:
    if os.geteuid() != 0 or shutil.which("mkosi") is None:
        pytest.skip("needs root and mkosi (make test-slow installs it)")
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "image" / "build")], capture_output=True, text=True, check=False, timeout=3600
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-8000:]
    image = Path(proc.stdout.strip().splitlines()[-1])
    assert image.is_dir() and (image / "usr/bin/python3").exists()
    size = subprocess.run(
        ["du", "-s", "--block-size=1M", "--apparent-size", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    summary = f"image/build: {elapsed:.0f} s, {size} MB ({image})"
    print(summary)
    (image.parent / "build.txt").write_text(summary + "\n")

    version = _in_image(image, "/opt/dicom-gateway/venv/bin/dicom-gateway", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"dicom-gateway {__version__}"
    sd = _in_image(image, "/opt/dicom-gateway/venv/bin/python", "-c", "import systemd.daemon")
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
        image,
        "/opt/dicom-gateway/venv/bin/dicom-gateway",
        "check-config",
        "/etc/dicom-gateway/gateway.toml",
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # The build-only compiler is gone again.
    assert not (image / "usr/bin/gcc").exists()
