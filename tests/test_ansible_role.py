"""The Ansible role applied for real: site.yml on a Debian bookworm chroot made with
debootstrap (connection community.general.chroot), twice; the second run must change
nothing.  Then the files, modes, user, venv and enabled unit are checked inside.

Slow (apt and pip inside the chroot download packages): ``make test-slow``.  Needs
root (chroot, mounts), debootstrap (TEST_PACKAGES) and the Ansible venv that the
Makefile makes (.venv-ansible).  The root filesystem tarball is cached by
scripts/bookworm-rootfs under ~/.cache/dicom-gateway-test.  The chroot gets the host's
resolv.conf and local CA certificates, as a box gets its site's network settings.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
ANSIBLE_BIN = ROOT / ".venv-ansible" / "bin"

pytestmark = pytest.mark.slow

ENTRA_SECRET = "entra-client-secret-4c2d9a"  # made up; must reach only its file


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload,no-any-return]


def build_wheel(dest: Path) -> Path:
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(ROOT)]
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = dest.glob("dicom_gateway-*.whl")
    return wheel


def make_chroot(target: Path) -> None:
    tarball = _run([str(ROOT / "scripts" / "bookworm-rootfs")], timeout=1800)
    assert tarball.returncode == 0, tarball.stderr
    target.mkdir()
    proc = _run(["tar", "-C", str(target), "-xf", tarball.stdout.strip()])
    assert proc.returncode == 0, proc.stderr
    shutil.copy("/etc/resolv.conf", target / "etc/resolv.conf")
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir() and any(local_cas.iterdir()):
        shutil.copytree(local_cas, target / "usr/local/share/ca-certificates", dirs_exist_ok=True)
        proc = _run(["chroot", str(target), "update-ca-certificates"])
        assert proc.returncode == 0, proc.stderr


def apply_role(chroot: Path, extra_vars: Path, log: Path) -> str:
    """ansible-playbook site.yml against the chroot, in a private mount namespace
    (so /proc and /dev mounted into the chroot vanish with it)."""
    inventory = chroot.parent / "hosts.yml"
    inventory.write_text(
        "gateways:\n  hosts:\n    box:\n"
        f"      ansible_host: {chroot}\n"
        "      ansible_connection: community.general.chroot\n"
        "      ansible_python_interpreter: /usr/bin/python3\n"
    )
    script = (
        f'mount -t proc proc "{chroot}/proc" && mount --rbind /dev "{chroot}/dev" && '
        f'exec "{ANSIBLE_BIN}/ansible-playbook" -i "{inventory}" -e "@{extra_vars}" site.yml'
    )
    env = dict(
        os.environ,
        PATH=f"{ANSIBLE_BIN}:{os.environ['PATH']}",
        ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    proc = _run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=ANSIBLE,
        env=env,
        timeout=1800,
    )
    output = proc.stdout + proc.stderr
    with log.open("a") as f:
        f.write(output)
    assert proc.returncode == 0, output[-6000:]
    return output


def recap(output: str) -> dict[str, int]:
    match = re.search(r"^box\s*:\s*(.*)$", output, re.M)
    assert match, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_role_applies_to_a_bookworm_chroot_and_is_idempotent(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for chroot and mounts")
    assert (ANSIBLE_BIN / "ansible-playbook").exists(), "run `make .venv-ansible/.installed`"
    wheel = build_wheel(tmp_path / "dist")
    chroot = tmp_path / "box"
    make_chroot(chroot)

    ca = trustme.CA()
    client = ca.issue_cert("clinic-7-gw1")
    extra = tmp_path / "vars.yml"
    indent = "\n".join("  " + line for line in client.private_key_pem.bytes().decode().splitlines())
    extra.write_text(
        f"dicom_gateway_wheel: {wheel}\n"
        "dicom_gateway_ae_title: CLINICGW\n"
        "dicom_gateway_allowed_aets: [CT_ROOM1, US_ROOM2]\n"
        "dicom_gateway_archive_url: https://archive.example.org/dicom-web\n"
        "dicom_gateway_worklist_host: 192.0.2.20\n"
        "dicom_gateway_worklist_ae: RIS\n"
        "dicom_gateway_firewall: true\n"
        "dicom_gateway_modality_subnets: [192.0.2.0/24, 198.51.100.0/25]\n"
        "dicom_gateway_ca_certificate: |\n"
        + "\n".join("  " + line for line in ca.cert_pem.bytes().decode().splitlines())
        + "\ndicom_gateway_client_certificate: |\n"
        + "\n".join("  " + line for line in client.cert_chain_pems[0].bytes().decode().splitlines())
        + f"\nvault_dicom_gateway_client_key: |\n{indent}\n"
        "dicom_gateway_client_key: '{{ vault_dicom_gateway_client_key }}'\n"
        # A Microsoft Entra token on top of the client certificate.
        "dicom_gateway_archive_profile: azure\n"
        "dicom_gateway_auth_method: azure\n"
        "dicom_gateway_auth_tenant_id: contoso.onmicrosoft.com\n"
        "dicom_gateway_auth_client_id: 6731de76-14a6-49ae-97bc-6eba6914391e\n"
        f"vault_dicom_gateway_auth_client_secret: {ENTRA_SECRET}\n"
        "dicom_gateway_auth_client_secret: '{{ vault_dicom_gateway_auth_client_secret }}'\n"
    )
    log = tmp_path / "ansible.log"

    first = recap(apply_role(chroot, extra, log))
    assert first["failed"] == 0 and first["changed"] > 0
    second_output = apply_role(chroot, extra, log)
    second = recap(second_output)
    assert second["changed"] == 0 and second["failed"] == 0, second_output[-6000:]
    # The private key and the client secret never appear in Ansible's output.
    assert "PRIVATE KEY" not in log.read_text()
    assert ENTRA_SECRET not in log.read_text()

    # The static user from sysusers.d.
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (chroot / "etc/passwd").read_text().splitlines()
    }
    user = passwd["dicom-gateway"]
    uid, gid, home, shell = int(user[2]), int(user[3]), user[5], user[6]
    assert uid < 1000 and home == "/var/lib/dicom-gateway" and shell == "/usr/sbin/nologin"

    def mode_owner(path: str) -> tuple[int, int, int]:
        st = (chroot / path.lstrip("/")).stat()
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    assert mode_owner("/etc/dicom-gateway/tls/device.key") == (0o600, uid, gid)
    assert mode_owner("/etc/dicom-gateway/secrets") == (0o750, 0, gid)
    assert mode_owner("/etc/dicom-gateway/secrets/client-secret") == (0o600, uid, gid)
    assert (chroot / "etc/dicom-gateway/secrets/client-secret").read_text() == ENTRA_SECRET
    assert mode_owner("/etc/dicom-gateway/gateway.toml") == (0o640, 0, gid)
    assert mode_owner("/etc/dicom-gateway") == (0o750, 0, gid)
    assert mode_owner("/etc/systemd/system/dicom-gateway.service")[0] == 0o644
    assert (chroot / "etc/systemd/system/dicom-gateway.service").read_text() == (
        ROOT / "systemd/dicom-gateway.service"
    ).read_text()
    assert (chroot / "usr/lib/sysusers.d/dicom-gateway.conf").exists()

    # Enabled: the symlink systemctl makes, and systemctl's own answer (offline).
    wants = chroot / "etc/systemd/system/multi-user.target.wants/dicom-gateway.service"
    assert wants.is_symlink()
    enabled = _run(["chroot", str(chroot), "systemctl", "is-enabled", "dicom-gateway.service"])
    assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr

    # The gateway in its venv runs, takes the written config, and has systemd-python.
    venv = "/opt/dicom-gateway/venv/bin"
    version = _run(["chroot", str(chroot), f"{venv}/dicom-gateway", "--version"])
    assert version.returncode == 0 and version.stdout.startswith("dicom-gateway "), version
    check = _run(
        ["chroot", str(chroot), f"{venv}/dicom-gateway", "check-config",
         "/etc/dicom-gateway/gateway.toml"]
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    toml = (chroot / "etc/dicom-gateway/gateway.toml").read_text()
    assert 'ae_title = "CLINICGW"' in toml and "port = 104" in toml
    assert 'client_key = "/etc/dicom-gateway/tls/device.key"' in toml
    assert 'archive = "azure"' in toml and '[upload.auth]\nmethod = "azure"\n' in toml
    assert 'client_secret_file = "/etc/dicom-gateway/secrets/client-secret"' in toml
    sd = _run(["chroot", str(chroot), f"{venv}/python", "-c", "import systemd.daemon"])
    assert sd.returncode == 0, sd.stderr

    nft = (chroot / "etc/nftables.d/dicom-gateway.nft").read_text()
    assert "192.0.2.0/24, 198.51.100.0/25" in nft and "tcp dport 104 drop" in nft
    assert 'include "/etc/nftables.d/*.nft"' in (chroot / "etc/nftables.conf").read_text()
    # nftables accepts the table (check mode, inside the box: the role installed nft).
    parsed = _run(["chroot", str(chroot), "nft", "-c", "-f", "/etc/nftables.d/dicom-gateway.nft"])
    assert parsed.returncode == 0, parsed.stderr
