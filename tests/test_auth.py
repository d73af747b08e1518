"""Request authentication against the clouds (issue 14), through test doubles.

No real cloud is reachable from this machine: the token endpoints are the doubles of
tests/support/cloud_auth.py (Google's OAuth 2.0 service-account grant, a Microsoft Entra
tenant, an AWS SigV4 verifier built on botocore's own signer), each written from the
vendor's documents (cited there), over TLS with a trustme CA.  The tokens come from
each library's real flow (google-auth, azure-identity/MSAL, botocore), and the
archive is the scripted STOW-RS double (tests/support/scripted_archive.py) checking every
request's credentials.  The upload runs through the real pipeline on a real spool
and database (test_isolation.Bench), or the real gateway process.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import auth as auth_module
from gateway import field
from gateway.config import AuthConfig, ConfigError, UploadConfig, from_dict
from gateway.https import http_hint, ssl_context
from gateway.instances import QueueState
from gateway.pipeline import archives
from gateway.web.status_doc import StatusDoc

from .conftest import GatewayFactory
from .support import corpus
from .support.cloud_auth import EntraTenant, GoogleTokenEndpoint, SigV4Verifier
from .support.gateway_proc import write_config
from .support.peers import free_port
from .support.scripted_archive import ScriptedArchive, json_answer
from .support.status_sample import sample_doc
from .support.tls_site import TlsSite
from .support.web_client import WebClient, web_port
from .test_config import _cli
from .test_isolation import Bench, _all

METHODS = ["google", "azure", "aws-sigv4", "bearer"]


def aws_refusal() -> web.Response:
    """AWS's answer to a signature it cannot match (HTTP 403, JSON ``message``)."""
    return web.json_response(
        {
            "message": "The request signature we calculated does not match the signature"
            " you provided. Check your AWS Secret Access Key and signing method."
        },
        status=403,
        headers={"x-amzn-ErrorType": "InvalidSignatureException"},
    )


class Clouds:
    """The doubles one test needs, started on first use and stopped at the end, and
    every secret they handed out (for the no-leak checks)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.sites: list[TlsSite] = []
        self._google: GoogleTokenEndpoint | None = None
        self._entra: EntraTenant | None = None
        self.aws = SigV4Verifier()
        self.bearer_file = root / "bearer-token"
        self.bearer_tokens: list[str] = []

    def google(self, expires_in: int = 3600) -> GoogleTokenEndpoint:
        if self._google is None:
            self._google = GoogleTokenEndpoint(self.root / "google", expires_in).start()
            self.sites.append(self._google)
        return self._google

    def entra(self, expires_in: int = 3599) -> EntraTenant:
        if self._entra is None:
            self._entra = EntraTenant(self.root / "entra", expires_in)
            self._entra.start()
            self.sites.append(self._entra)
        return self._entra

    def write_bearer(self, token: str | None = None) -> str:
        """A new token in the bearer file (written beside it, then renamed over it)."""
        token = token or "bt-" + os.urandom(24).hex() + "Zz9"
        tmp = self.bearer_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, self.bearer_file)
        self.bearer_tokens.append(token)
        return token

    def auth(self, method: str, **overrides: Any) -> dict[str, Any]:
        """``[upload.auth]`` for *method* against its double."""
        if method == "google":
            g = self.google()
            keys: dict[str, Any] = {"key_file": str(g.key_file), "ca_file": str(g.ca_file)}
        elif method == "azure":
            e = self.entra()
            secret = e.write_secret_file(self.root / "azure-client-secret")
            keys = {
                "tenant_id": e.tenant_id, "client_id": e.client_id,
                "client_secret_file": str(secret), "authority_host": e.authority_host,
                "ca_file": str(e.ca_file),
            }  # fmt: skip
        elif method == "aws-sigv4":
            creds = self.aws.write_credentials_file(self.root / "aws-credentials")
            keys = {"region": self.aws.region, "credentials_file": str(creds)}
        else:
            if not self.bearer_tokens:
                self.write_bearer()
            keys = {"token_file": str(self.bearer_file)}
        return {"method": method, **keys, **overrides}

    def accept(self, method: str, archive: ScriptedArchive) -> None:
        """Make *archive* take exactly the credentials *method*'s double issues."""
        if method == "google":
            tokens = self.google().tokens
            archive.require_auth = lambda r, b: tokens.bearer_valid(_authz(r))
        elif method == "azure":
            tokens = self.entra().tokens
            archive.require_auth = lambda r, b: tokens.bearer_valid(_authz(r))
        elif method == "aws-sigv4":
            archive.require_auth = lambda r, b: self.aws.check_request(r, b) is None
            archive.refusal = aws_refusal
        else:
            archive.require_auth = lambda r, b: _authz(r) == f"Bearer {self.bearer_tokens[-1]}"

    def secrets(self) -> list[str]:
        """Every secret value in play: keys, client secret, AWS secret, every token."""
        out = [self.aws.secret_key, self.aws.session_token, *self.bearer_tokens]
        if self._google is not None:
            pem = self._google.private_key_pem
            out += [line for line in pem.splitlines() if line and not line.startswith("-----")]
            out += list(self._google.tokens.issued)
        if self._entra is not None:
            out += [self._entra.client_secret, *self._entra.tokens.issued]
        return out

    def close(self) -> None:
        for site in self.sites:
            site.stop()


def _authz(request: web.Request) -> str:
    return request.headers.get("Authorization", "")


def assert_no_secret(secrets: list[str], **texts: str) -> None:
    for where, text in texts.items():
        leaked = [s[:6] + "..." for s in secrets if s and s in text]
        assert not leaked, f"secrets {leaked} in {where}"


@pytest.fixture
def clouds(tmp_path: Path) -> Iterator[Clouds]:
    c = Clouds(tmp_path / "clouds")
    yield c
    c.close()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[ScriptedArchive]:
    """The scripted archive as the clouds are: a token, no client certificate."""
    a = ScriptedArchive(tmp_path / "archive", client_cert_required=False).start()
    yield a
    a.stop()


@pytest.fixture
def mtls_archive(tmp_path: Path) -> Iterator[ScriptedArchive]:
    a = ScriptedArchive(tmp_path / "mtls-archive").start()
    yield a
    a.stop()


@pytest.fixture(autouse=True)
def _no_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The credentials are the test's, never the environment's.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def _bench(tmp_path: Path, archive: ScriptedArchive, auth: dict[str, Any], **upload: Any) -> Bench:
    return Bench(tmp_path / "bench", **archive.upload_config(auth=auth, **upload))


# -- each method, end to end through the pipeline ---------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("method", METHODS)
async def test_each_method_uploads_through_the_pipeline(
    method: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    clouds.accept(method, archive)
    bench = _bench(tmp_path, archive, clouds.auth(method), batch_max_instances=3)
    uids = [bench.add() for _ in range(3)]
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert archive.stored == set(uids)
    assert [len(r) for r in archive.requests] == [3]
    assert archive.refused == 0 and all(r["attempts"] == 1 for r in rows.values())
    (authorization,) = set(archive.authorizations)
    scheme = "AWS4-HMAC-SHA256" if method == "aws-sigv4" else "Bearer"
    assert authorization.startswith(scheme + " ")
    if method == "google":
        assert clouds.google().grants == 1
    if method == "azure":
        assert clouds.entra().grants == 1 and clouds.entra().discoveries == 1
    if method == "aws-sigv4":
        assert clouds.aws.checked == 1
    assert_no_secret(clouds.secrets(), log=caplog.text)


@pytest.mark.asyncio
async def test_google_token_with_mutual_tls_combined(
    clouds: Clouds, mtls_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """The archive asks for a client certificate and a token: both are sent."""
    clouds.accept("google", mtls_archive)
    bench = _bench(tmp_path, mtls_archive, clouds.auth("google"))
    uid = bench.add()
    async with bench.running() as task:
        await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert mtls_archive.stored == {uid} and mtls_archive.refused == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("paced", [False, True], ids=["unpaced", "paced"])
async def test_sigv4_signature_is_verified_by_botocore(
    paced: bool, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    """The SHA-256 signed is the multipart body's, however it is sent (a paced body is
    another payload type): the verifier recomputes both from what it received."""
    clouds.accept("aws-sigv4", archive)
    upload = {"max_bytes_per_second": 50_000_000} if paced else {}
    bench = _bench(tmp_path, archive, clouds.auth("aws-sigv4"), batch_max_instances=2, **upload)
    uids = [bench.add(), bench.add("MR_small.dcm")]
    async with bench.running() as task:
        await bench.in_one_batch(task)
        await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert archive.stored == set(uids) and archive.refused == 0
    assert clouds.aws.checked == 1


@pytest.mark.asyncio
async def test_the_sigv4_verifier_refuses_what_was_not_signed(clouds: Clouds) -> None:
    """The verifier is not a rubber stamp: a changed body, header, URL or secret fails."""
    v = clouds.aws
    config = from_dict({"upload": {"auth": clouds.auth("aws-sigv4")}}).upload.auth
    signer = auth_module.authenticator(config)
    url = "https://localhost:8443/dicom-web/studies"
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--b--\r\n"
    base = {"Accept": "application/dicom+json", "Content-Type": "multipart/related; boundary=b"}
    import hashlib

    sig = await signer.sign("POST", url, base, hashlib.sha256(body).hexdigest())
    sent = {**base, **sig.headers}
    assert v.check("POST", url, sent, body) is None
    assert "SHA-256 of the body" in (v.check("POST", url, sent, body + b"x") or "")
    changed = {**sent, "Content-Type": "multipart/related; boundary=c"}
    assert "SignatureDoesNotMatch" in (v.check("POST", url, changed, body) or "")
    assert "SignatureDoesNotMatch" in (v.check("POST", url + "?x=1", sent, body) or "")
    other = SigV4Verifier()
    other.access_key, other.session_token = v.access_key, v.session_token
    assert "SignatureDoesNotMatch" in (other.check("POST", url, sent, body) or "")
    no_host = {k: x for k, x in sent.items() if k != "Host"}
    assert "signed headers not in the request: ['host']" in (
        v.check("POST", url, no_host, body) or ""
    )


# -- expiry, revocation, refusal -------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_token_is_refreshed_before_it_expires(
    clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    """Google tokens of 5 s, refreshed a tenth of their lifetime (0.5 s) before the end:
    a request made in that last half second, while the old token would still be
    accepted, goes out with a new one fetched first (the archive refuses nothing)."""
    google = clouds.google(expires_in=5)
    clouds.accept("google", archive)
    bench = _bench(tmp_path, archive, clouds.auth("google"))
    first = bench.add()
    async with bench.running() as task:
        await bench.until(
            "first uploaded", task, lambda rows: rows[first]["state"] == QueueState.UPLOADED
        )
    (expires,) = google.tokens.issued.values()
    await asyncio.sleep(max(0.0, expires - 0.35 - time.time()))
    # The pipeline's own authenticator (one per configuration), asked as it would be.
    auth = auth_module.shared(bench.config.upload)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context(bench.config.upload))
    ) as session:
        url = auth_module.query_url(archive.dicomweb_url + "/studies", {"limit": "1"})
        reply = await auth.send(session, "GET", url)
    assert reply.status == 200 and google.grants == 2 and archive.refused == 0
    assert len(set(archive.authorizations)) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["google", "azure"])
async def test_a_revoked_token_gets_one_refresh_and_the_request_is_sent_again(
    method: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    """401 -> the token is dropped (azure: MSAL's cache too), a new one fetched, the
    request built and sent again, within the same attempt."""
    clouds.accept(method, archive)
    bench = _bench(tmp_path, archive, clouds.auth(method))
    first = bench.add()
    async with bench.running() as task:
        await bench.until(
            "first uploaded", task, lambda rows: rows[first]["state"] == QueueState.UPLOADED
        )
        archive.revoke(archive.authorizations[-1])
        second = bench.add()
        rows = await bench.until(
            "second uploaded", task, lambda rows: rows[second]["state"] == QueueState.UPLOADED
        )
    issuer = clouds.google() if method == "google" else clouds.entra()
    assert issuer.grants == 2
    assert archive.refused == 1 and rows[second]["attempts"] == 1
    assert archive.stored == {first, second}


@pytest.mark.asyncio
@pytest.mark.parametrize("method", METHODS)
async def test_a_refused_token_fails_the_request_with_an_auth_hint(
    method: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    """The archive refuses every credential: one refresh, one resend, then the batch
    is retried later with a reason that names upload.auth, not the certificate."""
    clouds.accept(method, archive)
    archive.require_auth = lambda r, b: False
    bench = _bench(tmp_path, archive, clouds.auth(method))
    uid = bench.add()
    async with bench.running() as task:
        rows = await bench.until("refused", task, lambda rows: rows[uid]["attempts"] >= 1)
    row = rows[uid]
    assert row["state"] == QueueState.COMPRESSED  # still to be retried
    reason = row["last_error"]
    assert reason.startswith(f"check upload.auth: archive refused the {method} credentials")
    if method == "aws-sigv4":
        assert "(HTTP 403 Forbidden: The request signature we calculated" in reason
    else:
        assert "(HTTP 401 Unauthorized: The access token is invalid or has expired)" in reason
    assert "certificate" not in reason
    assert len(archive.authorizations) >= 2 and archive.stored == set()
    assert_no_secret(clouds.secrets(), reason=reason)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [401, 403])
async def test_a_401_or_403_with_a_dicom_json_body_is_not_a_stow_answer(
    status: int, mtls_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """A refusal whose body looks like a Store Instances Response says nothing about
    the instances: the batch is retried, nothing is failed for good."""
    failed = json_answer(status, lambda uids: {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [0x0122]}}
        for u in uids
    ]}})  # fmt: skip
    mtls_archive.script(failed)
    bench = _bench(tmp_path, mtls_archive, {"method": "mtls"})
    uid = bench.add()
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert rows[uid]["attempts"] == 2


def test_http_hint_names_upload_auth_for_tokens_and_the_certificate_for_mtls() -> None:
    config = from_dict({"upload": {"auth": {"method": "bearer", "token_file": "/t"}}})
    bearer = auth_module.authenticator(config.upload.auth)
    challenge = 'Bearer error="invalid_token", error_description="The token expired"'
    hint = http_hint("archive", 401, b"", bearer, challenge, "Unauthorized")
    assert hint == (
        "check upload.auth: archive refused the bearer credentials"
        " (HTTP 401 Unauthorized: The token expired)"
    )
    google_body = json.dumps({"error": {"code": 403, "status": "PERMISSION_DENIED",
        "message": "Permission healthcare.dicomStores.dicomWebWrite denied"}}).encode()  # fmt: skip
    assert "(HTTP 403 Forbidden: Permission healthcare.dicomStores.dicomWebWrite denied)" in (
        http_hint("archive", 403, google_body, bearer, "", "Forbidden")
    )
    echo = json.dumps({"error_description": "bad token ya29.A0ARrdaM9xYzQ3kLmN0pQrStUvWxYz12"})
    assert "ya29" not in http_hint("archive", 401, echo.encode(), bearer)
    mtls = auth_module.authenticator(from_dict({}).upload.auth)
    assert "certificate" in http_hint("archive", 401, b"{}", mtls)
    assert "check upload.auth" not in http_hint("archive", 401, b"{}", mtls)


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["google", "azure", "aws-sigv4"])
async def test_wrong_credentials_are_a_clear_reason_without_the_secret(
    method: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    clouds.accept(method, archive)
    auth = clouds.auth(method)
    if method == "google":
        # A key the service account does not have: the signature does not verify.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        wrong_pem = rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()  # fmt: skip
        clouds.google().write_key_file(clouds.google().key_file, wrong_pem)
        wrong = [ln for ln in wrong_pem.splitlines() if not ln.startswith("-----")]
        expected = (
            "refused the service account's credentials: invalid_grant: Invalid JWT Signature."
        )
    elif method == "azure":
        wrong = ["Q~wrong-" + os.urandom(12).hex()]
        clouds.entra().write_secret_file(Path(auth["client_secret_file"]), wrong[0])
        expected = (
            "refused the client credentials: Authentication failed: AADSTS7000215:"
            " Invalid client secret"
        )
    else:
        wrong = ["wrong/" + os.urandom(15).hex()]
        clouds.aws.write_credentials_file(Path(auth["credentials_file"]), wrong[0])
        expected = (
            "archive refused the aws-sigv4 credentials (HTTP 403 Forbidden: The request signature"
        )
    bench = _bench(tmp_path, archive, auth)
    uid = bench.add()
    async with bench.running() as task:
        rows = await bench.until("refused", task, lambda rows: rows[uid]["attempts"] >= 1)
    reason = rows[uid]["last_error"]
    assert rows[uid]["state"] == QueueState.COMPRESSED and expected in reason, reason
    assert archive.stored == set()
    assert_no_secret(clouds.secrets() + wrong, reason=reason, log=caplog.text)


# -- secret files ------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", [0o644, 0o620])
async def test_a_secret_file_open_to_others_is_refused(
    method: str, mode: int, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    clouds.accept(method, archive)
    auth = clouds.auth(method)
    key = {"google": "key_file", "azure": "client_secret_file",
           "aws-sigv4": "credentials_file", "bearer": "token_file"}[method]  # fmt: skip
    secret = Path(auth[key])
    secret.chmod(mode)
    why = "readable by everyone" if mode & 0o004 else "writable by others"
    bench = _bench(tmp_path, archive, auth)
    # At start: a config error naming the key and the file (exit 78, see below).
    with pytest.raises(ConfigError, match=f"upload.auth.{key}: {secret} is {why}"):
        auth_module.check_secret_files(bench.config)
    # Changed while running: each request is refused with the reason.
    uid = bench.add()
    async with bench.running() as task:
        rows = await bench.until("refused", task, lambda rows: rows[uid]["attempts"] >= 1)
    assert (
        f"upload.auth.{key} {secret} is {why} (mode {mode:04o}): refused"
        in (rows[uid]["last_error"])
    )
    assert archive.answered == 0 and archive.authorizations == []
    # doctor says so, with the fix.
    out = _doctor(bench.config)
    assert f"FAIL  auth             {method}: upload.auth.{key} {secret} is {why}" in out
    assert f"fix: chmod 600 {secret}" in out
    # Group-readable is fine (a group the gateway's user is in).
    secret.chmod(0o640)
    auth_module.check_secret_files(bench.config)


def test_the_gateway_does_not_start_with_a_secret_file_open_to_others(
    clouds: Clouds, tmp_path: Path
) -> None:
    auth = clouds.auth("bearer")
    clouds.bearer_file.chmod(0o604)
    config = write_config(
        tmp_path / "gw.toml", tmp_path, free_port(),
        upload={"dicomweb_url": "https://archive.example/dicom-web"}, **{"upload.auth": auth},
    )  # fmt: skip
    proc = _cli("run", "--config", str(config))
    assert proc.returncode == 78, proc.stderr
    assert f"upload.auth.token_file: {clouds.bearer_file} is readable by everyone" in proc.stderr
    assert clouds.bearer_tokens[0] not in proc.stderr + proc.stdout


# -- bearer token file ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_rotated_bearer_token_file_is_picked_up(
    clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    clouds.accept("bearer", archive)  # the archive takes the newest token only
    bench = _bench(tmp_path, archive, clouds.auth("bearer"))
    first = bench.add()
    async with bench.running() as task:
        await bench.until("first", task, lambda rows: rows[first]["state"] == QueueState.UPLOADED)
        # The agent rotates the file: the next request reads it (it changed), no 401.
        clouds.write_bearer()
        second = bench.add()
        await bench.until("second", task, lambda rows: rows[second]["state"] == QueueState.UPLOADED)
        assert archive.refused == 0
        # The archive moves on before the agent does: 401, the file read again (the
        # same token), 401 again: retried later with the archive's reason.
        accepted = "bt-accepted-only-by-the-archive-" + os.urandom(8).hex()
        archive.require_auth = lambda r, b: _authz(r) == f"Bearer {accepted}"
        third = bench.add()
        rows = await bench.until("refused", task, lambda rows: rows[third]["attempts"] >= 1)
        assert archive.refused == 2
        assert rows[third]["last_error"] == (
            "check upload.auth: archive refused the bearer credentials (HTTP 401"
            " Unauthorized: The access token is invalid or has expired)"
        )
        # Then the agent catches up: the retry goes through.
        clouds.write_bearer(accepted)
        await bench.until("third", task, lambda rows: rows[third]["state"] == QueueState.UPLOADED)
    tokens = [a.removeprefix("Bearer ") for a in archive.authorizations]
    assert tokens[0] == clouds.bearer_tokens[0] and tokens[1] == clouds.bearer_tokens[1]
    assert tokens[-1] == accepted


# -- the worklist and the heartbeat -----------------------------------------------------------


@pytest.mark.asyncio
async def test_ups_rs_search_is_signed_with_its_query(
    clouds: Clouds, archive: ScriptedArchive
) -> None:
    """The UPS-RS GET carries a query (a date range, ``includefield=all``): the URL
    sent is the one signed, so botocore's verifier agrees."""
    from gateway.worklist.sources import UpsClient

    clouds.accept("aws-sigv4", archive)
    config = from_dict({
        "upload": {"ca_file": str(archive.ca_file), "auth": clouds.auth("aws-sigv4")},
        "worklist": {"ups_url": f"https://localhost:{archive.port}/ups"},
    })  # fmt: skip
    answer = await UpsClient(config).scheduled("20260101")
    assert answer.workitems == [] and archive.refused == 0
    ((_, path),) = archive.other_requests
    assert path.startswith("/ups/workitems?") and "ScheduledProcedureStepStartDateTime" in path
    assert clouds.aws.checked == 1


async def _first_heartbeat(config: Any, site: ScriptedArchive) -> None:
    """Run the heartbeat of *config* until *site* has received one."""
    from gateway.web.heartbeat import run_heartbeat

    class Status:
        async def status(self, fresh: bool = False) -> StatusDoc:
            return _status_doc()

    task = asyncio.create_task(run_heartbeat(config, Status()))  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 30
        while not site.heartbeats:
            assert not task.done(), task
            assert time.monotonic() < deadline, "no heartbeat arrived"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_the_heartbeat_carries_the_credentials(
    clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    """To the archive's own origin (``upload.dicomweb_url``'s scheme, host and port;
    the path differs) the heartbeat is signed like an upload."""
    clouds.accept("azure", archive)
    config = from_dict({
        "upload": {"dicomweb_url": archive.dicomweb_url, "ca_file": str(archive.ca_file),
                   "auth": clouds.auth("azure")},
        "heartbeat": {"url": f"https://localhost:{archive.port}/heartbeat",
                      "interval_seconds": 60},
    })  # fmt: skip
    await _first_heartbeat(config, archive)
    assert archive.refused == 0 and json.loads(archive.heartbeats[0])["ae_title"] == "DICOMGW"
    assert archive.authorizations[-1].startswith("Bearer tok-")


@pytest.fixture
def stranger(tmp_path: Path) -> Iterator[ScriptedArchive]:
    """Another operator's heartbeat endpoint (a fleet receiver): another origin, its
    own CA, and it requires the box's client certificate."""
    s = ScriptedArchive(tmp_path / "stranger", client_cert_required=True).start()
    yield s
    s.stop()


def _credential_headers(headers: dict[str, str]) -> list[str]:
    return [h for h in headers if h.lower() == "authorization" or h.lower().startswith("x-amz-")]


@pytest.mark.asyncio
@pytest.mark.parametrize("method", METHODS)
async def test_a_heartbeat_to_another_origin_carries_the_certificate_alone(
    method: str, clouds: Clouds, archive: ScriptedArchive, stranger: ScriptedArchive
) -> None:
    """A box signing its uploads with *method* heartbeats to an endpoint of another
    origin: the TLS client certificate is all it gets (no Authorization, no SigV4
    headers, no secret anywhere in the request); the same box's heartbeat to the
    archive's origin is signed and accepted."""
    clouds.accept(method, archive)
    upload = {
        "dicomweb_url": archive.dicomweb_url, "ca_file": str(archive.ca_file),
        "client_cert": str(stranger.client_cert), "client_key": str(stranger.client_key),
        "auth": clouds.auth(method),
    }  # fmt: skip
    away = from_dict({
        "upload": upload,
        "heartbeat": {"url": f"https://localhost:{stranger.port}/heartbeat",
                      "interval_seconds": 60, "ca_file": str(stranger.ca_file)},
    })  # fmt: skip
    await _first_heartbeat(away, stranger)
    (headers,) = stranger.heartbeat_headers
    assert _credential_headers(headers) == [], headers
    assert stranger.authorizations == [""]
    sent = json.dumps(headers) + stranger.heartbeats[0].decode()
    assert_no_secret(clouds.secrets(), heartbeat=sent)

    home = from_dict({
        "upload": upload,
        "heartbeat": {"url": f"https://localhost:{archive.port}/heartbeat",
                      "interval_seconds": 60},
    })  # fmt: skip
    await _first_heartbeat(home, archive)
    (headers,) = archive.heartbeat_headers
    assert "Authorization" in _credential_headers(headers)
    assert archive.refused == 0


@pytest.mark.parametrize(
    ("url", "archive_url", "same"),
    [
        ("https://archive.example/heartbeat", "https://archive.example/dicom-web", True),
        ("https://ARCHIVE.example:443/hb", "https://archive.example/dicom-web", True),
        ("https://archive.example:8443/hb", "https://archive.example/dicom-web", False),
        ("https://fleet.example/hb", "https://archive.example/dicom-web", False),
        ("https://archive.example.fleet.example/hb", "https://archive.example/", False),
        ("https://archive.example/hb", "http://archive.example/", False),
        ("https://archive.example/hb", "", False),
    ],
)
def test_same_origin(url: str, archive_url: str, same: bool) -> None:
    assert auth_module.same_origin(url, archive_url) is same
    bearer = AuthConfig(method="bearer", token_file=Path("/nonexistent/token"))
    chosen = auth_module.for_origin(UploadConfig(dicomweb_url=archive_url, auth=bearer), url)
    assert chosen.method == ("bearer" if same else "mtls")


def _status_doc() -> StatusDoc:
    return sample_doc(version="test", boot_id="b", uptime_seconds=1.0)


# -- doctor ------------------------------------------------------------------------------------


def _doctor(config: Any) -> str:
    out = io.StringIO()
    field.doctor(config, out=out)
    return out.getvalue()


def _auth_line(out: str) -> str:
    lines = out.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line[6:].startswith("auth ")]
    fix = lines[i + 1].strip() if i + 1 < len(lines) and "fix:" in lines[i + 1] else ""
    return f"{lines[i]} {fix}".strip()


def _doctor_config(tmp_path: Path, archive: ScriptedArchive, auth: dict[str, Any]) -> Any:
    return from_dict({
        "spool": {"dir": str(tmp_path / "doctor-spool"), "min_free_bytes": 0},
        "dimse": {"port": free_port()},
        "upload": {**archive.upload_config(), "auth": auth},
    })  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_doctor_passes_each_method_end_to_end(
    method: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    clouds.accept(method, archive)
    out = _doctor(_doctor_config(tmp_path, archive, clouds.auth(method)))
    line = _auth_line(out)
    expected = {
        "google": "PASS  auth             google: google token valid for",
        "azure": "PASS  auth             azure: azure token valid for",
        "aws-sigv4": "PASS  auth             aws-sigv4: SigV4 for medical-imaging in us-east-1",
        "bearer": "PASS  auth             bearer: bearer token in hand",
    }[method]
    assert line.startswith(expected), out
    assert line.endswith("QIDO-RS GET /dicom-web/studies?limit=1 answered HTTP 200"), out
    assert ("GET", "/dicom-web/studies?limit=1") in archive.other_requests
    # Without a client certificate the certificate line skips, the archive line passes.
    assert "SKIP  certificate      no client certificate (upload.auth.method =" in out
    assert "PASS  archive          TLS to localhost" in out
    assert_no_secret(clouds.secrets(), doctor=out)


_DOCTOR_FAILURES: dict[
    str, tuple[str, Callable[[Clouds, ScriptedArchive], dict[str, Any]], str, str]
] = {
    "token endpoint TLS-untrusted": (
        "google",
        lambda c, a: c.auth("google", ca_file=str(a.ca_file)),  # another CA
        "google: TLS: localhost:",
        "fix: set upload.auth.ca_file to the CA that signs the token",
    ),
    "token endpoint unreachable": (
        "azure",
        lambda c, a: c.auth("azure", authority_host=f"localhost:{free_port()}"),
        "azure: cannot reach the token endpoint localhost:",
        "fix: check the uplink, DNS and",
    ),
    "invalid credentials": (
        "azure",
        lambda c, a: {**c.auth("azure"), "client_id": "00000000-0000-0000-0000-000000000000"},
        "azure: Microsoft Entra (localhost:",
        "fix: check upload.auth.tenant_id and client_id",
    ),
    "archive refuses the token": (
        "bearer",
        lambda c, a: c.auth("bearer"),
        "bearer: credentials obtained, but check upload.auth: the archive refused the bearer"
        " credentials (HTTP 401 Unauthorized: The access token is invalid or has expired)",
        "fix: the token in upload.auth.token_file was refused",
    ),
    "archive refuses the signature": (
        "aws-sigv4",
        lambda c, a: c.auth("aws-sigv4", region="eu-west-1"),
        "aws-sigv4: credentials obtained, but check upload.auth: the archive refused the"
        " aws-sigv4 credentials (HTTP 403 Forbidden: The request signature",
        "fix: allow the HealthImaging DICOMweb actions",
    ),
    "no credentials": (
        "aws-sigv4",
        lambda c, a: c.auth("aws-sigv4", profile="nobody"),
        "aws-sigv4: no AWS credentials found",
        "fix: set upload.auth.credentials_file or profile",
    ),
}


@pytest.mark.parametrize("case", list(_DOCTOR_FAILURES))
def test_doctor_says_what_is_wrong_with_the_credentials(
    case: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    method, make, detail, fix = _DOCTOR_FAILURES[case]
    clouds.accept(method, archive)
    if case == "archive refuses the token":
        archive.require_auth = lambda r, b: False
    out = _doctor(_doctor_config(tmp_path, archive, make(clouds, archive)))
    line = _auth_line(out)
    assert line.startswith(f"FAIL  auth             {detail}"), out
    assert fix in line, out
    assert_no_secret(clouds.secrets(), doctor=out)


# -- no secret anywhere, the real gateway ------------------------------------------------------


#: Every upload.archive profile, each with an auth method (the clouds with their own).
_PROFILES_AND_METHODS = [
    ("google", "google"), ("azure", "azure"), ("aws", "aws-sigv4"),
    ("dcm4chee", "bearer"), ("orthanc", "bearer"), ("generic", "bearer"),
]  # fmt: skip


@pytest.mark.parametrize(("profile", "method"), _PROFILES_AND_METHODS)
def test_no_secret_in_logs_status_metrics_page_or_heartbeat(
    profile: str, method: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path,
    gateway_factory: GatewayFactory,
) -> None:  # fmt: skip
    """The real gateway at DEBUG, uploading to a *profile* archive with *method*,
    beating its heart through the same credentials, then refused by the archive (its
    reason on the page): no secret in its log, /api/status, /metrics, the page, the
    heartbeats, doctor or the queue (whose last_error holds the exception messages)."""
    assert set(archives.PROFILES) == {p for p, _ in _PROFILES_AND_METHODS}
    clouds.accept(method, archive)
    auth = clouds.auth(method)
    gw = gateway_factory(
        start=False,
        upload={**archive.upload_config(), "archive": profile, "compression": "none",
                "backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5},
        heartbeat={"url": f"https://localhost:{archive.port}/heartbeat", "interval_seconds": 0.5},
        logging={"level": "DEBUG"},
        **{"upload.auth": auth},
    )  # fmt: skip
    good = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), tmp_path / "good.dcm")
    gw.enqueue_unchecked(tmp_path / "good.dcm")
    gw.start()
    web = WebClient(web_port(gw))
    _wait("uploaded", lambda: str(good.SOPInstanceUID) in archive.stored)
    _wait("a heartbeat", lambda: bool(archive.heartbeats))
    # Now the archive refuses everything: the reason reaches the page.
    archive.require_auth = lambda r, b: False
    refused = archive.refused
    gw.stop()
    later = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), tmp_path / "later.dcm")
    gw.enqueue_unchecked(tmp_path / "later.dcm")
    gw.start()
    web = WebClient(web_port(gw))
    _wait("refused", lambda: archive.refused >= refused + 2)
    _wait("the reason shown", lambda: "check upload.auth" in json.dumps(web.status()))
    texts = {
        "status": json.dumps(web.status()),
        "metrics": web.get("/metrics").text,
        "page": web.get("/").text,
        "heartbeats": b"\n".join(archive.heartbeats).decode(),
        "queue": json.dumps([dict(r) for r in gw.rows()]),
    }
    assert str(later.SOPInstanceUID) not in archive.stored
    assert gw.stop() == 0
    proc = _cli("doctor", "--config", str(gw.config_path), timeout=120)
    texts["doctor"] = proc.stdout + proc.stderr
    texts["log"] = gw.log
    assert "auth" in texts["doctor"] and "DEBUG" in texts["log"]
    secrets = clouds.secrets()
    assert len(secrets) >= 2  # the long-lived secret and at least one token
    assert_no_secret(secrets, **texts)


def _wait(what: str, done: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_token_and_signature_reprs_hide_the_secret() -> None:
    token = auth_module.Token("ya29.secret-value-123", time.time() + 60)
    assert "secret-value" not in repr(token) and "redacted" in repr(token)
    sig = auth_module.Signature({"Authorization": "Bearer ya29.secret-value-123"}, 1)
    assert "secret-value" not in repr(sig) and "Authorization" in repr(sig)


def test_sanitise_removes_known_secrets_and_token_shapes_but_keeps_paths() -> None:
    g = auth_module.authenticator(from_dict({"upload": {"auth": {"method": "google"}}}).upload.auth)
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nabc/def+ghi==\n-----END"
    g._remember(pem, lasting=True)
    g._remember("tok-Short1")
    text = (
        "key line MIIEvQIBADANBgkqhkiG9w0BAQEFAASC and abc/def+ghi== and tok-Short1,"
        " bearer ya29.a0AfB_byC3dEfGhIjKlMnOpQrStUvWxYz0123456789 in"
        " /var/lib/dicom-gateway/secrets/service-account.json for 1.2.826.0.1.3680043.8.498.1"
    )
    clean = g.sanitise(text, limit=1000)
    for secret in ("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "abc/def+ghi==", "tok-Short1", "ya29.a0AfB"):
        assert secret not in clean
    assert "/var/lib/dicom-gateway/secrets/service-account.json" in clean
    assert "1.2.826.0.1.3680043.8.498.1" in clean


@pytest.mark.asyncio
async def test_the_wado_rs_check_of_a_duplicate_carries_the_credentials(
    clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    """Verifying an "already stored" answer (WADO-RS metadata) is a request to the
    archive like the upload: signed, and refreshed once after a 401."""
    from gateway.pipeline.upload import StowClient

    clouds.accept("azure", archive)
    config = from_dict({"upload": archive.upload_config(auth=clouds.auth("azure"))})
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), tmp_path / "held.dcm")
    archive.hold(tmp_path / "held.dcm")
    ids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    async with StowClient(config.upload) as client:
        first = await client.instance_metadata(*ids)
        archive.revoke(archive.authorizations[-1])
        second = await client.instance_metadata(*ids)
    assert first is not None and first == second
    assert archive.refused == 1 and clouds.entra().grants == 2
    assert all(a.startswith("Bearer tok-") for a in archive.authorizations)
