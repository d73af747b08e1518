"""Field tools for the technician at the box: ``doctor``, ``enroll`` and ``send``.

``doctor`` checks a configured gateway from the outside, one line per check, each
saying PASS, FAIL (with what to fix) or SKIP (not configured); ``enroll`` makes the
box's key and a certificate signing request for the archive's CA; ``send`` C-STOREs
files to a peer to prove a DICOM link.  Each returns an exit status and prints; the
CLI (cli.py) only registers them.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import stat
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .config import Config

#: A client certificate that expires sooner than this fails the doctor.
CERT_RENEW_BEFORE = timedelta(days=30)
_TIMEOUT_S = 10.0
DOCTOR_AE = "DGW-DOCTOR"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped (not configured)
    detail: str
    fix: str = ""
    warn: bool = False  # works, but is a risk worth fixing (does not fail the doctor)

    def line(self) -> str:
        mark = "WARN" if self.warn else {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        text = f"{mark}  {self.name:<16} {self.detail}"
        return f"{text}\n      fix: {self.fix}" if self.fix else text


# -- doctor ------------------------------------------------------------------------------
def doctor(config: Config, out: TextIO = sys.stdout) -> int:
    """Run every check, print one line each; 0 when none failed, else 1."""
    failed = False
    for check in _checks(config):
        print(check.line(), file=out, flush=True)
        failed |= check.ok is False
    return 1 if failed else 0


def _checks(config: Config) -> Iterator[Check]:
    yield Check("config", True, f"{config.source} is valid")
    yield check_spool(config)
    yield check_database(config)
    yield check_dimse(config)
    yield check_certificate(config)
    yield check_archive(config)
    yield check_auth(config)
    yield check_worklist_upstream(config)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_spool(config: Config) -> Check:
    spool = config.spool.dir
    where = _existing(spool)
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".doctor-") as probe:
            probe.write(b"doctor")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return Check(
            "spool",
            False,
            f"cannot write in {where}: {exc.strerror}",
            f"make {spool} writable by the gateway's user, or free its disk",
        )
    free = shutil.disk_usage(where).free
    need = config.spool.min_free_bytes
    if free < need:
        return Check(
            "spool",
            False,
            f"{spool}: {_mb(free)} free, below spool.min_free_bytes ({_mb(need)}); "
            "C-STOREs are being refused",
            "free space on that disk (is the archive reachable? `dicom-gateway queue ls`)"
            " or move spool.dir to a larger disk",
        )
    return Check("spool", True, f"{spool} writable, {_mb(free)} free (minimum {_mb(need)})")


def check_database(config: Config) -> Check:
    """The queue database should share the spool's file system (see database.path)."""
    from .upgrade import database_in_use

    db = database_in_use(config)
    try:
        spool_dev = os.stat(_existing(config.spool.dir)).st_dev
        db_dev = os.stat(_existing(db.parent)).st_dev
    except OSError as exc:
        return Check("database", False, f"cannot look at {db}: {exc.strerror}", "see the log")
    if db_dev != spool_dev:
        return Check(
            "database",
            True,
            f"{db} is on another file system than the spool {config.spool.dir}: a backup,"
            " restore or lost mount of one without the other loses acknowledged images",
            "unset database.path (the queue then lives in spool.dir; stop the gateway and"
            " move the file with its -wal and -shm first), or back both up together",
            warn=True,
        )
    state = "exists" if db.exists() else "is created at the first start"
    return Check("database", True, f"{db} {state}, on the spool's file system")


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.0f} MB"


def check_dimse(config: Config) -> Check:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    c = config.dimse
    host = "127.0.0.1" if c.bind in ("0.0.0.0", "::") else c.bind
    try:
        with socket.create_connection((host, c.port), timeout=_TIMEOUT_S):
            pass
    except OSError as exc:
        return Check(
            "dimse port",
            False,
            f"nothing listening on {host}:{c.port} ({exc.strerror or exc})",
            "start the gateway: `systemctl start dicom-gateway`; see `journalctl -u dicom-gateway`",
        )
    # Ask as a modality would; with allowed_aets set, as the first one allowed.
    calling = c.allowed_aets[0] if c.allowed_aets else DOCTOR_AE
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_S
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, c.port, ae_title=c.ae_title)
    if not assoc.is_established:
        return Check(
            "dimse port",
            False,
            f"{host}:{c.port} is open but refused an association to AE {c.ae_title!r}",
            "another program holds the port, or dimse.ae_title differs from the running "
            "gateway's: restart it after config changes",
        )
    status = assoc.send_c_echo()
    assoc.release()
    if not status or status.Status != 0:
        return Check("dimse port", False, f"C-ECHO to {host}:{c.port} failed", "see the log")
    return Check("dimse port", True, f"AE {c.ae_title!r} answers C-ECHO on {host}:{c.port}")


def check_certificate(config: Config) -> Check:
    u = config.upload
    if u.client_cert is None or u.client_key is None:
        if u.dicomweb_url and u.auth.method != "mtls":
            return Check(
                "certificate", None,
                f"no client certificate (upload.auth.method = {u.auth.method} authenticates)",
            )  # fmt: skip
        if u.dicomweb_url:
            return Check(
                "certificate",
                False,
                "no upload.client_cert/client_key: the archive requires one",
                "run `dicom-gateway enroll`, have the CSR signed, set both keys",
            )
        return Check("certificate", None, "no client certificate configured")
    try:
        cert = x509.load_pem_x509_certificate(u.client_cert.read_bytes())
    except (OSError, ValueError) as exc:
        return Check(
            "certificate",
            False,
            f"cannot read {u.client_cert}: {exc}",
            "install the PEM certificate the archive's CA signed",
        )
    try:
        key = serialization.load_pem_private_key(u.client_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return Check(
            "certificate",
            False,
            f"cannot read {u.client_key}: {exc}",
            "point upload.client_key at the unencrypted PEM key made by `dicom-gateway enroll`",
        )
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        return Check(
            "certificate",
            False,
            f"{u.client_cert} does not belong to the key {u.client_key}",
            "install the certificate signed for this box's CSR (or enroll again)",
        )
    subject = cert.subject.rfc4514_string()
    left = cert.not_valid_after_utc - datetime.now(UTC)
    if left <= timedelta(0):
        return Check(
            "certificate",
            False,
            f"{subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            "`dicom-gateway enroll --force`, have the CSR signed, install the certificate",
        )
    if left < CERT_RENEW_BEFORE:
        return Check(
            "certificate",
            False,
            f"{subject} expires in {left.days} days ({cert.not_valid_after_utc:%Y-%m-%d})",
            "renew now: `dicom-gateway enroll --force` and have the CSR signed",
        )
    mode = stat.S_IMODE(u.client_key.stat().st_mode)
    if mode & 0o077:
        return Check(
            "certificate",
            False,
            f"key {u.client_key} is readable by others (mode {mode:04o})",
            f"chmod 600 {u.client_key}",
        )
    return Check(
        "certificate",
        True,
        f"{subject}, key matches, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
        f" ({left.days} days)",
    )


def check_archive(config: Config) -> Check:
    """A real HTTPS request with the client certificate: a TLS 1.3 server refuses a
    certificate only after the handshake, so the answer is what tells."""
    from .https import ssl_context

    u = config.upload
    if not u.dicomweb_url:
        return Check("archive", None, "no upload.dicomweb_url configured")
    url = urllib.parse.urlsplit(u.dicomweb_url)
    host, port = url.hostname or "", url.port or 443
    try:
        ctx = ssl_context(u)
    except (OSError, ssl.SSLError) as exc:
        return Check(
            "archive",
            False,
            f"cannot load the TLS files: {exc}",
            "check upload.ca_file, client_cert and client_key",
        )
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=_TIMEOUT_S)
    path = url.path.rstrip("/") + "/studies?limit=1"
    try:
        conn.request("GET", path, headers={"Accept": "application/dicom+json"})
        resp = conn.getresponse()
        body = resp.read(4096)
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "archive",
            False,
            f"{host}:{port} presented a certificate we do not trust: {exc.verify_message}",
            "upload.ca_file must be the CA that signs the archive's certificate, and "
            "the URL's host name must be in it",
        )
    except ssl.SSLError as exc:
        return Check(
            "archive",
            False,
            f"TLS with {host}:{port} failed: {exc.reason or exc}",
            "the archive refused our client certificate: install the one its CA signed",
        )
    except (OSError, http.client.HTTPException) as exc:
        return Check(
            "archive",
            False,
            f"cannot reach {host}:{port}: {getattr(exc, 'strerror', None) or exc}",
            "check the uplink, DNS, firewall/proxy, and upload.dicomweb_url",
        )
    finally:
        conn.close()
    if resp.status == 400 and b"SSL certificate" in body:
        return Check(
            "archive",
            False,
            f"{host}:{port} refused our client certificate (HTTP 400)",
            "install a certificate signed by the archive's CA (`dicom-gateway enroll`)",
        )
    if resp.status in (401, 403) and u.auth.method != "mtls":
        # Asked without a token on purpose: the auth line asks with one.
        return Check(
            "archive",
            True,
            f"TLS to {host}:{port}; it asks for credentials (HTTP {resp.status}): see auth",
        )
    if resp.status in (401, 403):
        return Check(
            "archive",
            False,
            f"{host}:{port} denied access (HTTP {resp.status})",
            "ask the archive's operators to allow this box's certificate",
        )
    if resp.status >= 300:
        return Check(
            "archive",
            False,
            f"{u.dicomweb_url} answered HTTP {resp.status} {resp.reason}",
            "check upload.dicomweb_url (the DICOMweb base, e.g. https://host/dicom-web)",
        )
    return Check("archive", True, f"TLS with client certificate to {host}:{port}, QIDO answered")


#: What to do when the archive refuses credentials it was given: its side's grant.
_ARCHIVE_GRANT = {
    "mtls": "ask the archive's operators to allow this box's certificate",
    "google": "grant the service account a Healthcare DICOM role on the DICOM store (e.g."
    " roles/healthcare.dicomEditor), and check upload.dicomweb_url's project, location,"
    " dataset and store",
    "azure": "assign the app registration the 'DICOM Data Owner' role on the DICOM service"
    " (its Access control (IAM)); the scope must be https://dicom.healthcareapis.azure.com"
    "/.default",
    "aws-sigv4": "allow the HealthImaging DICOMweb actions on the data store in the IAM"
    " policy of these credentials (medical-imaging:StoreDICOM, StoreDICOMStudy,"
    " SearchDICOMStudies), and check upload.auth.region and service",
    "bearer": "the token in upload.auth.token_file was refused: check the agent that"
    " refreshes it, and the archive's access rules",
}


def check_auth(config: Config) -> Check:
    """``upload.auth`` end to end: a token fetched (or a request signed) the way the
    upload does it, and a harmless QIDO-RS request, ``GET {dicomweb_url}/studies?limit=1``,
    answered 200 or 204 with it (for ``mtls``, with the client certificate alone)."""
    import asyncio

    from .auth import SecretFileError, read_secret, secret_files
    from .https import ssl_context

    u = config.upload
    if not u.dicomweb_url:
        return Check("auth", None, "no upload.dicomweb_url configured")
    for key, path in secret_files(u.auth):
        try:
            read_secret(path, key)
        except SecretFileError as exc:
            return Check("auth", False, f"{u.auth.method}: {exc}", exc.fix)
    try:
        ctx = ssl_context(u)
    except (OSError, ssl.SSLError) as exc:
        return Check(
            "auth", False, f"cannot load the TLS files: {exc}",
            "check upload.ca_file, client_cert and client_key",
        )  # fmt: skip
    return asyncio.run(_probe_auth(config, ctx))


async def _probe_auth(config: Config, ctx: ssl.SSLContext) -> Check:
    import aiohttp

    from .auth import AuthError, authenticator, query_url
    from .https import http_hint

    u = config.upload
    method = u.auth.method
    auth = authenticator(u.auth)
    url = query_url(u.dicomweb_url.rstrip("/") + "/studies", {"limit": "1"})
    connector = aiohttp.TCPConnector(ssl=ctx, limit=1)
    timeout = aiohttp.ClientTimeout(total=3 * _TIMEOUT_S, sock_connect=_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            reply = await auth.send(
                session, "GET", url, headers={"Accept": "application/dicom+json"}
            )
        except AuthError as exc:
            return Check("auth", False, f"{method}: {exc}", exc.fix)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Check(
                "auth", False, f"{method}: the QIDO-RS request failed: {auth.sanitise(repr(exc))}",
                "see the archive line: TLS and the network come first",
            )  # fmt: skip
    path = urllib.parse.urlsplit(url).path
    if reply.status in (200, 204):
        return Check(
            "auth", True,
            f"{method}: {auth.describe()}; QIDO-RS GET {path}?limit=1 answered HTTP {reply.status}",
        )  # fmt: skip
    if reply.status in (401, 403):
        hint = http_hint(
            "the archive", reply.status, reply.body, auth,
            reply.headers.get("WWW-Authenticate", ""), reply.reason,
        )  # fmt: skip
        return Check("auth", False, f"{method}: credentials obtained, but {hint}",
                     _ARCHIVE_GRANT[method])  # fmt: skip
    return Check(
        "auth", False,
        f"{method}: credentials obtained, but QIDO-RS GET {path}?limit=1 answered HTTP"
        f" {reply.status} {reply.reason}",
        "check upload.dicomweb_url (the DICOMweb base, e.g. https://host/dicom-web)",
    )  # fmt: skip


def check_worklist_upstream(config: Config) -> Check:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    w = config.worklist
    if not w.upstream_host:
        return Check("worklist", None, "no worklist.upstream_host configured")
    where = f"{w.upstream_ae!r} at {w.upstream_host}:{w.upstream_port}"
    ae = AE(ae_title=config.dimse.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_S
    ae.add_requested_context(Verification)
    assoc = ae.associate(w.upstream_host, w.upstream_port, ae_title=w.upstream_ae)
    if not assoc.is_established:
        return Check(
            "worklist",
            False,
            f"RIS {where} did not accept an association from {config.dimse.ae_title!r}",
            "check worklist.upstream_host/port/upstream_ae, and that the RIS knows our AE",
        )
    status = assoc.send_c_echo()
    assoc.release()
    if not status or status.Status != 0:
        return Check("worklist", False, f"RIS {where} did not answer C-ECHO", "ask the RIS team")
    return Check("worklist", True, f"RIS {where} answers C-ECHO")


# -- enroll ------------------------------------------------------------------------------
def enroll(key_path: Path, csr_path: Path, common_name: str, force: bool = False) -> str:
    """Write a new EC P-256 key (mode 0600) and a CSR for it; return the CSR's subject.

    Raises FileExistsError when the key exists and *force* is not set: a key in use
    is not replaced by accident.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key_pem, force)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return csr.subject.rfc4514_string()


def _write_private(path: Path, data: bytes, force: bool) -> None:
    """Write *data* to a file that is 0600 from its first byte, then rename into place."""
    if path.exists() and not force:
        raise FileExistsError(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- send --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendResult:
    path: Path
    ok: bool
    detail: str


def send(
    files: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    report: Callable[[SendResult], None],
) -> int:
    """C-STORE *files* over one association; *report* each outcome; 0 if all stored."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    datasets = []
    failed = False
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            sop_class = str(ds.SOPClassUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except (OSError, InvalidDicomError, AttributeError) as exc:
            report(SendResult(path, False, f"not sent: not a readable DICOM file ({exc})"))
            failed = True
            continue
        datasets.append((path, ds, sop_class, ts))
    if not datasets:
        return 1
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30.0
    contexts = sorted({(sop_class, ts) for _, _, sop_class, ts in datasets})
    if len(contexts) > 128:
        report(SendResult(datasets[0][0], False, "too many kinds of file for one association"))
        return 1
    ae.requested_contexts = [build_context(sop_class, [ts]) for sop_class, ts in contexts]
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "could not be opened"
        for path, *_ in datasets:
            report(
                SendResult(
                    path,
                    False,
                    f"not sent: association to {called_ae!r} at {host}:{port} {why}"
                    " (check host, port, AE titles, and that the peer allows our AE)",
                )
            )
        return 1
    try:
        for path, ds, _, _ in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else None
            if code == 0:
                report(SendResult(path, True, f"stored (0x0000), {ds.SOPInstanceUID}"))
                continue
            if code is not None and (0xB000 <= code <= 0xBFFF or code in (0x0107, 0x0116)):
                report(SendResult(path, True, f"stored with warning 0x{code:04X}"))
                continue
            failed = True
            if code is None:
                report(SendResult(path, False, "no answer (association aborted or timed out)"))
                if not assoc.is_established:
                    break
                continue
            comment = str(status.get("ErrorComment", "")) if status else ""
            detail = f"status 0x{code:04X}" + (f": {comment}" if comment else "")
            report(SendResult(path, False, detail))
    finally:
        if assoc.is_established:
            assoc.release()
    return 1 if failed else 0
