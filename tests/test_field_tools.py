"""Field tools against the real lab: `doctor` with the gateway, Orthanc behind nginx
mutual TLS (tests/support/archive.py) and DCMTK wlmscpfs as the RIS; `enroll` with the lab's
CA signing the CSR; `send` to DCMTK storescp and to the gateway.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.gateway_proc import write_config
from .support.peers import Storescp, free_port
from .test_config import _cli
from .test_disk_full import _fill, small_fs
from .test_worklist import Ris

__all__ = ["small_fs"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # doctor may wait out network timeouts towards an unreachable archive or RIS.
    return _cli(*args, timeout=120)


def doctor(config: Path) -> tuple[int, dict[str, str]]:
    """Exit status and ``{check: "PASS ..."|"FAIL ... fix: ..."|"WARN ... fix: ..."}``."""
    proc = run_cli("doctor", "--config", str(config))
    lines: dict[str, str] = {}
    name = ""
    for line in proc.stdout.splitlines():
        if line.startswith(("PASS", "FAIL", "SKIP", "WARN")):
            name = line.split()[1]
            lines[name] = line
        elif line.strip().startswith("fix:"):
            lines[name] += " " + line.strip()
    assert lines, proc.stdout + proc.stderr
    return proc.returncode, lines


def upload_section(lab: ArchiveLab, cert: Path | None = None, key: Path | None = None) -> dict:
    return {
        "dicomweb_url": lab.dicomweb_url,
        "ca_file": str(lab.ca_file),
        "client_cert": str(cert or lab.client_cert),
        "client_key": str(key or lab.client_key),
    }


@pytest.fixture
def ris(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Ris(tmp_path / "wlroot")
    r.start()
    yield r
    r.stop()


def test_doctor_good_setup_passes_every_line(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, ris: Ris
) -> None:
    worklist = {"upstream_host": "127.0.0.1", "upstream_port": ris.port, "upstream_ae": "RIS"}
    gw = gateway_factory(upload=upload_section(archive_lab), worklist=worklist)
    code, lines = doctor(gw.config_path)
    assert set(lines) == {
        "config", "spool", "database", "dimse", "certificate", "archive", "auth", "worklist"
    }  # fmt: skip
    assert all(line.startswith("PASS") for line in lines.values()), lines
    assert code == 0
    assert "answers C-ECHO" in lines["dimse"] and "QIDO answered" in lines["archive"]
    assert "mtls: the TLS client certificate authenticates" in lines["auth"]
    assert gw.stop() == 0


def _doctor_config(tmp_path: Path, **sections: dict) -> Path:
    root = tmp_path / "doc"
    root.mkdir(exist_ok=True)
    return write_config(root / "gateway.toml", root, free_port(), **sections)


def test_wrong_client_certificate(archive_lab: ArchiveLab, tmp_path: Path) -> None:
    lab = archive_lab
    section = upload_section(lab, lab.untrusted_client_cert, lab.untrusted_client_key)
    code, lines = doctor(_doctor_config(tmp_path, upload=section))
    assert code == 1
    assert lines["certificate"].startswith("PASS")  # a valid pair, just not the archive's
    assert lines["archive"].startswith("FAIL"), lines
    assert "refused our client certificate" in lines["archive"]
    assert "fix: install a certificate signed by the archive's CA" in lines["archive"]


def test_certificate_of_another_key(archive_lab: ArchiveLab, tmp_path: Path) -> None:
    lab = archive_lab
    section = upload_section(lab, lab.client_cert, lab.untrusted_client_key)
    code, lines = doctor(_doctor_config(tmp_path, upload=section))
    assert code == 1
    assert "does not belong to the key" in lines["certificate"], lines
    assert "fix: install the certificate signed for this box's CSR" in lines["certificate"]
    assert lines["archive"].startswith("FAIL")  # the TLS files cannot even be loaded


def test_certificate_about_to_expire(archive_lab: ArchiveLab, tmp_path: Path) -> None:
    soon = archive_lab.ca.issue_cert(
        "gateway-test-box", not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    )
    cert, key = tmp_path / "soon.pem", tmp_path / "soon.key"
    soon.cert_chain_pems[0].write_to_path(str(cert))
    soon.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    code, lines = doctor(_doctor_config(tmp_path, upload=upload_section(archive_lab, cert, key)))
    assert code == 1
    assert lines["certificate"].startswith("FAIL") and "expires in" in lines["certificate"]
    assert "fix: renew now" in lines["certificate"]
    assert lines["archive"].startswith("PASS")  # still accepted today


def test_archive_unreachable(archive_lab: ArchiveLab, tmp_path: Path) -> None:
    archive_lab.stop_nginx()
    code, lines = doctor(_doctor_config(tmp_path, upload=upload_section(archive_lab)))
    assert code == 1
    assert lines["archive"].startswith("FAIL") and "cannot reach" in lines["archive"], lines
    assert "fix: check the uplink, DNS, firewall" in lines["archive"]
    assert lines["certificate"].startswith("PASS")


def test_spool_disk_full(small_fs: Path, tmp_path: Path) -> None:
    spool = {"dir": str(small_fs / "spool"), "min_free_bytes": 4 * 1024 * 1024}
    (small_fs / "spool").mkdir()
    config = _doctor_config(tmp_path, spool=spool)
    _fill(small_fs, leave_bytes=1024 * 1024)
    code, lines = doctor(config)
    assert code == 1
    assert lines["spool"].startswith("FAIL") and "below spool.min_free_bytes" in lines["spool"]
    assert "fix: free space on that disk" in lines["spool"]

    # Completely full: not even the probe file fits.
    _fill(small_fs, leave_bytes=0)
    try:
        with open(small_fs / "top-off", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    code, lines = doctor(config)
    assert code == 1
    assert lines["spool"].startswith("FAIL") and "cannot write" in lines["spool"], lines
    assert "fix: make" in lines["spool"] and "free its disk" in lines["spool"]


def test_database_on_another_file_system_warns(small_fs: Path, tmp_path: Path) -> None:
    spool = {"dir": str(small_fs / "spool")}
    # write_config puts the database beside the config, on tmp_path's file system.
    _, lines = doctor(_doctor_config(tmp_path, spool=spool))
    assert lines["database"].startswith("WARN"), lines
    assert "on another file system than the spool" in lines["database"]
    assert "fix: unset database.path" in lines["database"]

    # Unset: the queue lives in the spool, so the two cannot be apart.
    _, lines = doctor(_doctor_config(tmp_path, spool=spool, database={"path": ""}))
    assert lines["database"].startswith("PASS"), lines
    assert (
        f"{small_fs / 'spool' / 'gateway.sqlite3'} is created at the first start"
        in lines["database"]
    )


def test_dimse_port_not_bound(tmp_path: Path) -> None:
    code, lines = doctor(_doctor_config(tmp_path))
    assert code == 1
    assert lines["dimse"].startswith("FAIL") and "nothing listening" in lines["dimse"]
    assert "fix: start the gateway" in lines["dimse"]
    assert lines["archive"].startswith("SKIP") and lines["worklist"].startswith("SKIP")


def test_worklist_upstream_down(tmp_path: Path) -> None:
    worklist = {"upstream_host": "127.0.0.1", "upstream_port": free_port(), "upstream_ae": "RIS"}
    code, lines = doctor(_doctor_config(tmp_path, worklist=worklist))
    assert code == 1
    assert lines["worklist"].startswith("FAIL") and "fix: check worklist." in lines["worklist"]


def test_bad_config_fails_the_first_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[dimse]\nport = 70000\n")
    code, lines = doctor(config)
    assert code == 1
    assert lines["config"].startswith("FAIL") and "dimse.port" in lines["config"]


def _sign(lab: ArchiveLab, csr_path: Path, cert_path: Path) -> None:
    """The archive's CA signs the box's CSR (what the operators do by hand)."""
    ca_key = serialization.load_pem_private_key(lab.ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(lab.ca.cert_pem.bytes())
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_enroll_and_the_signed_certificate_works(archive_lab: ArchiveLab, tmp_path: Path) -> None:
    key, csr, cert = tmp_path / "box.key", tmp_path / "box.csr", tmp_path / "box.pem"
    proc = run_cli("enroll", "--key", str(key), "--csr", str(csr), "--common-name", "clinic-7")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    assert loaded.key_size == 256 and loaded.curve.name == "secp256r1"  # type: ignore[union-attr]
    request = x509.load_pem_x509_csr(csr.read_bytes())
    assert request.subject.rfc4514_string() == "CN=clinic-7"

    before = key.read_bytes()
    again = run_cli("enroll", "--key", str(key), "--csr", str(csr))
    assert again.returncode == 1 and "--force" in again.stderr
    assert key.read_bytes() == before

    _sign(archive_lab, csr, cert)
    _, lines = doctor(_doctor_config(tmp_path, upload=upload_section(archive_lab, cert, key)))
    assert lines["certificate"].startswith("PASS") and "CN=clinic-7" in lines["certificate"]
    assert lines["archive"].startswith("PASS"), lines

    assert run_cli("enroll", "--key", str(key), "--csr", str(csr), "--force").returncode == 0
    assert key.read_bytes() != before and stat.S_IMODE(key.stat().st_mode) == 0o600


def test_send_to_storescp(tmp_path: Path) -> None:
    peer = Storescp(tmp_path / "received", aet="PACS")
    try:
        ct, mr = tmp_path / "ct.dcm", tmp_path / "mr.dcm"
        corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
        corpus.with_new_uids(corpus.testdata("MR_small.dcm"), mr)
        junk = tmp_path / "junk.dcm"
        junk.write_bytes(b"not dicom at all")
        args = ["--port", str(peer.port), "--called-ae", "PACS"]
        proc = run_cli("send", *args, str(ct), str(junk), str(mr))
    finally:
        peer.stop()
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert [line.split()[0] for line in lines] == ["FAIL", "OK", "OK"], proc.stdout
    assert "not a readable DICOM file" in lines[0]
    assert len(list((tmp_path / "received").iterdir())) == 2


def test_send_to_the_gateway(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway_factory(dimse={"allowed_aets": ["CT_ROOM1"]})
    ct = tmp_path / "ct.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
    ok = run_cli("send", "--config", str(gw.config_path), "--calling-ae", "CT_ROOM1", str(ct))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK") and "stored (0x0000)" in ok.stdout
    assert [r["sop_instance_uid"] for r in gw.rows()] == [str(ds.SOPInstanceUID)]

    refused = run_cli("send", "--config", str(gw.config_path), "--calling-ae", "NOPE", str(ct))
    assert refused.returncode == 1
    assert refused.stdout.startswith("FAIL") and "rejected" in refused.stdout
    assert "allows our AE" in refused.stdout
    assert gw.stop() == 0


def test_send_to_nobody(tmp_path: Path) -> None:
    ct = tmp_path / "ct.dcm"
    corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
    proc = run_cli("send", "--port", str(free_port()), str(ct))
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAIL") and "could not be opened" in proc.stdout
    assert os.path.exists(ct)
