"""The fleet receiver's Ansible side: the play ansible/fleet.yml with the role
dicom_gateway_fleet, and the dicom_gateway role's heartbeat settings for the boxes.

As tests/test_ansible_args.py: ansible-playbook from .venv-ansible against localhost,
without facts.  Bad settings are refused before any task (check mode).  The role's
tasks/config.yml runs for real into a temporary directory: the certificates, the key
(0600, never in Ansible's output) and a fleet.toml that `dicom-gateway fleet
check-config` accepted; then a real receiver serves with that very file and takes a
box's heartbeat.  The gateway.toml template with the heartbeat settings is rendered
and read back by the gateway's own config loader.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import config as gateway_config
from gateway.fleet import config as fleet_config

from .support.fleet import FleetPki, FleetReceiverProcess, encoded, heartbeat, post
from .support.peers import free_port
from .test_ansible_args import PLAYBOOK, ROOT, run_play

FLEET_ROLE = ROOT / "ansible" / "roles" / "dicom_gateway_fleet"
WHEEL = {"dicom_gateway_fleet_wheel": "/nonexistent/dicom_gateway-0-py3-none-any.whl"}
CERTS = {
    "dicom_gateway_fleet_tls_certificate": "(cert)",
    "dicom_gateway_fleet_tls_key": "(key)",
    "dicom_gateway_fleet_client_ca_certificate": "(ca)",
}


def _extra(tmp_path: Path, settings: dict[str, Any]) -> list[str]:
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(settings))
    return ["-e", f"@{path}"]


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({}, "dicom_gateway_fleet_wheel"),  # required
        ({**WHEEL, "dicom_gateway_fleet_port": "https"}, "dicom_gateway_fleet_port"),
        ({**WHEEL, "dicom_gateway_fleet_log_level": "LOUD"}, "dicom_gateway_fleet_log_level"),
        (WHEEL, "the receiver needs dicom_gateway_fleet_tls_certificate"),
        (
            {**WHEEL, **CERTS, "dicom_gateway_fleet_view_bind": "0.0.0.0"},
            "a view beyond loopback needs",
        ),
    ],
)
def test_bad_fleet_settings_are_refused_before_any_task(
    tmp_path: Path, settings: dict[str, Any], complaint: str
) -> None:
    proc = run_play(tmp_path, *_extra(tmp_path, settings), playbook="fleet.yml",
                    group="fleet_receivers")  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Validating arguments against arg spec" in output, output[-3000:]
    assert complaint in output, output[-3000:]
    assert "Install the OS packages" not in output


def _shim_venv(tmp_path: Path) -> Path:
    """A venv stand-in whose bin/dicom-gateway is this checkout's (the role's template
    validation calls ``<venv>/bin/dicom-gateway fleet check-config``)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "dicom-gateway"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m gateway "$@"\n')
    script.chmod(0o755)
    return venv


def test_the_role_writes_a_fleet_toml_the_receiver_serves_with(tmp_path: Path) -> None:
    pki = FleetPki(tmp_path / "pki")
    key_text = pki.server_key.read_text()
    port, view_port = free_port(), free_port()
    config_dir, state_dir = tmp_path / "etc", tmp_path / "var"
    settings = {
        "dicom_gateway_fleet_tls_certificate": pki.server_cert.read_text(),
        "dicom_gateway_fleet_tls_key": key_text,
        "dicom_gateway_fleet_client_ca_certificate": pki.ca_file.read_text(),
        "dicom_gateway_fleet_bind": "127.0.0.1",
        "dicom_gateway_fleet_port": port,
        "dicom_gateway_fleet_view_port": view_port,
        "dicom_gateway_fleet_stale_after_seconds": 90,
        "dicom_gateway_fleet_venv": str(_shim_venv(tmp_path)),
        "dicom_gateway_fleet_start": False,
        # Role vars (vars/main.yml) give way only to extra vars: the service user of a
        # receiver host is not on this machine, and /etc is not ours.
        "dicom_gateway_fleet_user": getpass.getuser(),
        "dicom_gateway_fleet_group": grp.getgrgid(os.getgid()).gr_name,
        "dicom_gateway_fleet_config_dir": str(config_dir),
        "dicom_gateway_fleet_state_dir": str(state_dir),
    }
    play = [
        {
            "name": "The fleet role's certificates and fleet.toml",
            "hosts": "fleet_receivers",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "The role's config.yml",
                    "ansible.builtin.include_role": {
                        "name": "dicom_gateway_fleet",
                        "tasks_from": "config.yml",
                    },
                }
            ],
        }
    ]
    playbook = tmp_path / "fleet-config.yml"
    playbook.write_text(json.dumps(play))
    proc = run_play(tmp_path, "-v", *_extra(tmp_path, settings), playbook=str(playbook),
                    check=False, group="fleet_receivers")  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "PRIVATE KEY" not in output and key_text.splitlines()[1] not in output  # no_log

    tls = config_dir / "tls"
    key = tls / "receiver.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_text() == key_text
    assert (tls / "boxes-ca.pem").read_text() == pki.ca_file.read_text()
    assert not (tls / "view.pem").exists()
    config = fleet_config.load(config_dir / "fleet.toml")
    assert config.receiver.port == port and config.receiver.client_ca_file == tls / "boxes-ca.pem"
    assert config.boxes.stale_after_seconds == 90.0
    assert config.view.bind == "127.0.0.1" and config.view.tls_cert is None
    assert config.database.path == state_dir / "fleet.sqlite3"

    # The receiver, started with exactly that file, takes a box's heartbeat.
    receiver = FleetReceiverProcess(tmp_path / "run", pki)
    receiver.config_path = config_dir / "fleet.toml"
    receiver.port, receiver.view_port = port, view_port
    receiver.db_path = state_dir / "fleet.sqlite3"
    receiver.start()
    try:
        assert post(receiver, pki.box("clinic-3-gw1"), encoded(heartbeat())).status == 204
        assert set(receiver.boxes()) == {"clinic-3-gw1"}
    finally:
        assert receiver.stop() == 0


def test_role_defaults_match_the_receivers_defaults() -> None:
    from .test_ansible_args import _yaml

    if not PLAYBOOK.exists():
        pytest.fail("no .venv-ansible: run `make .venv-ansible/.installed`")
    defaults = _yaml(FLEET_ROLE / "defaults" / "main.yml")
    options = _yaml(FLEET_ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    c = fleet_config.FleetConfig()
    pairs = {
        "bind": c.receiver.bind, "port": c.receiver.port,
        "max_body_bytes": c.receiver.max_body_bytes,
        "max_clock_skew_seconds": c.receiver.max_clock_skew_seconds,
        "view_bind": c.view.bind, "view_port": c.view.port,
        "refresh_seconds": c.view.refresh_seconds,
        "stale_after_seconds": c.boxes.stale_after_seconds, "log_level": c.logging.level,
    }  # fmt: skip
    for name, value in pairs.items():
        var = f"dicom_gateway_fleet_{name}"
        assert defaults[var] == value, var
        assert options[var]["default"] == value, var
    for var in ("dicom_gateway_fleet_tls_key", "dicom_gateway_fleet_view_tls_key"):
        assert options[var]["no_log"] is True


def test_a_box_gets_its_heartbeat_settings(tmp_path: Path) -> None:
    """The dicom_gateway role's template: no [heartbeat] table by default; with a URL,
    the table gateway.toml's loader reads back, the receiver's CA as heartbeat.ca_file."""
    base = {"dicom_gateway_start": False}
    sites = {
        "quiet": base,
        "watched": {
            **base,
            "dicom_gateway_heartbeat_url": "https://fleet.example.org:8443/heartbeat",
            "dicom_gateway_heartbeat_interval_seconds": 30,
            "dicom_gateway_heartbeat_ca_certificate": "(the fleet CA)",
        },
    }
    plays = [
        {
            "name": f"Site {name}",
            "hosts": "gateways",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "The role's gateway.toml",
                    "vars": settings,  # above the role's files (vars_files, below)
                    "ansible.builtin.template": {
                        "src": str(ROOT / "ansible/roles/dicom_gateway/templates/gateway.toml.j2"),
                        "dest": str(tmp_path / f"{name}.toml"),
                        "mode": "0640",
                    },
                }
            ],
        }
        for name, settings in sites.items()
    ]
    role = ROOT / "ansible" / "roles" / "dicom_gateway"
    for play in plays:  # the role's variables, as the role would have them
        play["vars_files"] = [str(role / "defaults" / "main.yml"), str(role / "vars" / "main.yml")]
    playbook = tmp_path / "box.yml"
    playbook.write_text(json.dumps(plays))
    proc = run_play(tmp_path, playbook=str(playbook), check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    quiet = (tmp_path / "quiet.toml").read_text()
    assert "[heartbeat]" not in quiet
    assert gateway_config.load(tmp_path / "quiet.toml").heartbeat.url == ""
    watched = gateway_config.load(tmp_path / "watched.toml").heartbeat
    assert watched.url == "https://fleet.example.org:8443/heartbeat"
    assert watched.interval_seconds == 30.0
    assert watched.ca_file == Path("/etc/dicom-gateway/tls/heartbeat-ca.pem")


# -- the unit the role installs -------------------------------------------------------------

FLEET_UNIT = ROOT / "systemd" / "dicom-gateway-fleet.service"


def test_the_unit_runs_what_the_role_installs() -> None:
    from .test_ansible_args import _yaml
    from .test_systemd_unit import unit_directives

    if not PLAYBOOK.exists():
        pytest.fail("no .venv-ansible: run `make .venv-ansible/.installed`")
    defaults = _yaml(FLEET_ROLE / "defaults" / "main.yml")
    role_vars = _yaml(FLEET_ROLE / "vars" / "main.yml")
    service = unit_directives(FLEET_UNIT)["Service"]
    prefix = defaults["dicom_gateway_fleet_prefix"]
    config_dir = role_vars["dicom_gateway_fleet_config_dir"]
    assert service["ExecStart"] == [
        f"{prefix}/venv/bin/dicom-gateway fleet serve --config {config_dir}/fleet.toml"
    ]
    assert service["User"] == [role_vars["dicom_gateway_fleet_user"]]
    assert service["ConfigurationDirectory"] == [Path(config_dir).name]
    assert service["StateDirectory"] == [Path(role_vars["dicom_gateway_fleet_state_dir"]).name]
    assert service["RestartPreventExitStatus"] == [str(gateway_config.EXIT_CONFIG)]
    sysusers = (ROOT / "systemd" / "sysusers.d" / "dicom-gateway-fleet.conf").read_text()
    assert f"u {role_vars['dicom_gateway_fleet_user']} " in sysusers


def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    import re
    import shutil
    import subprocess

    from .test_systemd_unit import MAX_EXPOSURE, _systemd_analyze

    analyze = _systemd_analyze()
    root = tmp_path / "root"
    exe = root / "opt/dicom-gateway-fleet/venv/bin/dicom-gateway"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(FLEET_UNIT, root / "etc/systemd/system" / FLEET_UNIT.name)
    verify = subprocess.run([analyze, "verify", f"--root={root}", FLEET_UNIT.name],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(FLEET_UNIT)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, security.stdout


_UNDER_MDWE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE: what MemoryDenyWriteExecute=yes does
    raise SystemExit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
import json
from pathlib import Path
from gateway.fleet import config, server
from gateway.heartbeat_body import decode
print(decode(sys.argv[1].encode())["ae_title"])
c = config.from_dict({"receiver": {"tls_cert": sys.argv[2], "tls_key": sys.argv[3],
                                   "client_ca_file": sys.argv[4]}})
server.receiver_tls(c)
"""


def test_the_receiver_runs_with_memory_deny_write_execute(tmp_path: Path) -> None:
    """msgspec, SQLite and the TLS stack under the unit's MemoryDenyWriteExecute=yes
    (the kernel's PR_SET_MDWE, Linux 6.3+, gives the same rule outside systemd)."""
    import subprocess

    pki = FleetPki(tmp_path)
    args = [encoded(heartbeat(ae_title="MDWE")).decode(), str(pki.server_cert),
            str(pki.server_key), str(pki.ca_file)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _UNDER_MDWE, *args], capture_output=True,
                          text=True, check=False, timeout=60, cwd=ROOT)  # fmt: skip
    if "prctl(PR_SET_MDWE) failed" in proc.stderr:
        pytest.skip("kernel without PR_SET_MDWE")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "MDWE"
