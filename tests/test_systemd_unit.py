"""The systemd unit: the directives the gateway relies on, its stop timeout against the
gateway's own stop budget, `systemd-analyze verify` and the security score.

systemd-analyze comes with Debian's systemd package (in TEST_PACKAGES); the two tests
that run it are skipped only on a machine without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.app import stop_budget_seconds
from gateway.config import EXIT_CONFIG, Config, load

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "dicom-gateway.service"
SYSUSERS = ROOT / "systemd" / "sysusers.d" / "dicom-gateway.conf"
MAX_EXPOSURE = 2.0


def unit_directives(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values...]}}``; systemd allows a key more than once."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(timespan: str) -> float:
    """A systemd time span (``90``, ``90s``, ``1min 30s``, ``2m``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


def service() -> dict[str, list[str]]:
    return unit_directives()["Service"]


def one(key: str) -> str:
    (value,) = service()[key]
    return value


def test_notify_and_watchdog() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert seconds(one("WatchdogSec")) >= 10
    assert one("Restart") in ("on-failure", "on-abnormal", "always")


def test_config_error_is_not_restarted() -> None:
    assert str(EXIT_CONFIG) in one("RestartPreventExitStatus").split()


def test_no_wait_for_the_uplink() -> None:
    text = UNIT.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "network-online.target" not in body


def test_runs_as_static_user_with_one_capability() -> None:
    assert one("User") == "dicom-gateway"
    assert "DynamicUser" not in service()
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one("NoNewPrivileges") == "yes"
    sysusers = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [fields[:2] for fields in sysusers] == [["u", "dicom-gateway"]]


def test_directories_and_config_path() -> None:
    assert one("StateDirectory") == "dicom-gateway"
    assert one("ConfigurationDirectory") == "dicom-gateway"
    assert "--config /etc/dicom-gateway/gateway.toml" in one("ExecStart")


def test_stop_timeout_covers_the_stop_budget() -> None:
    # KillMode=process would leave the J2K workers behind; mixed/control-group do not.
    assert service().get("KillMode", ["control-group"]) != ["process"]
    timeout = seconds(one("TimeoutStopSec"))
    assert timeout > stop_budget_seconds(Config()) + 5
    # The config the Ansible role writes (its drain_seconds) must fit as well.
    template = ROOT / "ansible" / "roles" / "dicom_gateway" / "defaults" / "main.yml"
    if template.exists():
        match = re.search(r"^dicom_gateway_drain_seconds:\s*(\d+)", template.read_text(), re.M)
        assert match, "dicom_gateway_drain_seconds missing from the role defaults"
        drain = float(match.group(1))
        assert timeout > stop_budget_seconds(Config()) - Config().dimse.drain_seconds + drain + 5


def test_stop_budget_follows_drain_seconds(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text("[dimse]\ndrain_seconds = 50\n")
    assert stop_budget_seconds(load(cfg)) == stop_budget_seconds(Config()) + 30


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    return path


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """Verified inside a root with the system's units and a stand-in for the venv's
    executable, since verify also checks that ExecStart= exists."""
    analyze = _systemd_analyze()
    root = tmp_path / "root"
    exe = root / "opt/dicom-gateway/venv/bin/dicom-gateway"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    proc = subprocess.run(
        [analyze, "verify", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (
        proc.stdout + proc.stderr
    )


def test_systemd_analyze_security_score() -> None:
    analyze = _systemd_analyze()
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


_UNDER_MDWE = """
import ctypes, sys
from pathlib import Path
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN): no writable+executable memory from now on,
# what MemoryDenyWriteExecute=yes enforces under systemd.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    raise SystemExit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
from cryptography.hazmat.primitives.asymmetric import ec
from gateway import app, field, notify
from gateway.pipeline import upload
from gateway.config import UploadConfig
from gateway.https import ssl_context
from gateway.pipeline.transcode import transcode
ec.generate_private_key(ec.SECP256R1())
ssl_context(UploadConfig())
result = transcode(Path(sys.argv[1]), Path(sys.argv[2]))
print(result.outcome)
"""


def test_native_code_runs_with_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes; the kernel's PR_SET_MDWE (Linux 6.3+)
    gives the same rule outside systemd: the J2K codec, cryptography and the TLS
    stack must work under it."""
    import sys

    from .support import corpus

    src = corpus.testdata("CT_small.dcm")
    proc = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE, str(src), str(tmp_path / "out.dcm")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if "prctl(PR_SET_MDWE) failed" in proc.stderr:
        pytest.skip("kernel without PR_SET_MDWE")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "compressed"


def _start_with_caps(tmp_path: Path, bounding: str) -> tuple[subprocess.Popen[bytes], Path, str]:
    """The real gateway on port 104 with the capability bounding set *bounding* (as
    CapabilityBoundingSet= does; root keeps only what is in it), on a random loopback
    address so that nothing else on the machine holds the port."""
    import random
    import sys

    from .support.gateway_proc import write_config

    tmp_path.mkdir(parents=True)
    addr = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
    config = write_config(tmp_path / "gateway.toml", tmp_path, 104, dimse={"bind": addr})
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
             sys.executable, "-m", "gateway", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )  # fmt: skip
    return proc, log, addr


def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> None:
    import time

    deadline = time.monotonic() + 30
    while " ready: " not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_port_104_needs_exactly_cap_net_bind_service(tmp_path: Path) -> None:
    """What the unit grants (CAP_NET_BIND_SERVICE, nothing else) is enough to receive
    on port 104 and store; without it the start fails with exit 71 and says why."""
    import os
    import sys

    from .support import corpus

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux)")
    proc, log, addr = _start_with_caps(tmp_path / "with", "-all,+net_bind_service")
    try:
        _wait_ready(proc, log)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        (cap_eff,) = re.findall(r"^CapEff:\s*([0-9a-f]+)$", status, re.M)
        assert int(cap_eff, 16) == 1 << 10  # CAP_NET_BIND_SERVICE alone
        ct = tmp_path / "ct.dcm"
        corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
        sent = subprocess.run(
            [sys.executable, "-m", "gateway", "send", "--host", addr, "--port", "104",
             "--called-ae", "DICOMGW", str(ct)],
            capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log.read_text()

    proc, log, _ = _start_with_caps(tmp_path / "without", "-all")
    assert proc.wait(timeout=60) == 71
    assert "Permission denied" in log.read_text()
