"""Request authentication for everything that speaks HTTPS to the archive or the cloud.

``[upload.auth]`` picks one method; the upload (STOW-RS), the UPS-RS worklist, the
heartbeat and ``doctor`` all sign their requests through the same
:class:`Authenticator` (one per configuration in a process: :func:`shared`), on top of
the TLS client certificate of ``upload.client_cert`` when that is set.  The
heartbeat only while it goes to the archive's own origin (:func:`for_origin`): to any
other it carries the client certificate alone.  The methods:

* ``mtls``: the client certificate alone (no header);
* ``google``: an OAuth 2.0 access token from the ``google-auth`` library, for a
  service-account key (``key_file``; its ``token_uri`` names the token endpoint) or
  the workload's own credentials (``google.auth.default``), scope ``cloud-healthcare``
  (https://cloud.google.com/healthcare-api/docs/authentication);
* ``azure``: a Microsoft Entra token from ``azure-identity``'s
  ``ClientSecretCredential`` (client credentials; the MSAL library underneath),
  scope ``https://dicom.healthcareapis.azure.com/.default``
  (https://learn.microsoft.com/azure/healthcare-apis/dicom/dicom-get-access-token);
* ``aws-sigv4``: each request signed with ``botocore``'s ``SigV4Auth``, service
  ``medical-imaging``, credentials from botocore's standard chain
  (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv4.html); the
  signature covers the SHA-256 of the exact body sent (``x-amz-content-sha256``);
* ``bearer``: a token file that another agent keeps fresh, read again when it
  changes and after a refusal.

Tokens are fetched before their first use and again ahead of expiry (five minutes,
or a tenth of the lifetime of a short-lived token, before it ends), one refresh at a
time, in a thread: the libraries block.  An archive's HTTP 401 (and 403 for SigV4,
AWS's answer to a bad or expired signature) makes :meth:`Authenticator.send` drop
the credentials, sign again with fresh ones and send the request once more; a
second refusal is the caller's to report (see ``gateway.https.http_hint``).

Secrets: the files that hold them (service-account key, client secret, bearer token,
AWS shared credentials) are refused when group- or world-writable or
world-readable (:func:`read_secret`).  No secret reaches a log line, an exception
message, a repr, the status page or the heartbeat: the objects that hold one have
redacting reprs, and what a token endpoint or archive says is passed through
:meth:`Authenticator.sanitise` (known secrets and anything token-shaped removed)
before it is shown.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import errno
import hashlib
import json
import logging
import os
import re
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.payload
import yarl

from .config import AuthConfig, Config, ConfigError, UploadConfig

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

log = logging.getLogger(__name__)

#: A token is refreshed this long before it expires at the latest ...
REFRESH_BEFORE_S = 300.0
#: ... or this share of its lifetime before, when that is shorter (short-lived tokens).
REFRESH_SHARE = 0.1

GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
AZURE_SCOPE = "https://dicom.healthcareapis.azure.com/.default"
#: SHA-256 of an empty body (SigV4 signs the body's hash, even of none).
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

#: What may stand for a token in a text from a peer: a long run of token characters
#: with upper case, lower case and digits (paths, UIDs and words have not all three).
_TOKENISH = re.compile(r"[A-Za-z0-9_\-.~+/=]{24,}")


class AuthError(Exception):
    """No credentials for a request.  ``str()`` is one line that names the file,
    key or endpoint at fault and never contains a secret; ``fix`` says what to do."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


class SecretFileError(AuthError):
    """A secret file is missing, unreadable, empty, or open to others."""


# -- secret files ------------------------------------------------------------------------


def _too_open(mode: int) -> str | None:
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by others"
    if mode & stat.S_IROTH:
        return "readable by everyone"
    return None


def read_secret(path: Path, key: str) -> bytes:
    """The contents of the secret file *path* (config key *key*), after checking it is
    not group/world-writable nor world-readable (group-readable is allowed: a group
    the gateway's user is in).  The check is on the file that is read (fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretFileError(
            f"{key} {path} does not exist", f"install it, or correct {key}"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW: a symbolic link
            raise SecretFileError(
                f"{key} {path} is a symbolic link", f"point {key} at the file itself"
            ) from None
        raise SecretFileError(
            f"cannot read {key} {path}: {exc.strerror}",
            f"make {path} readable by the gateway's user (mode 0600 or 0640)",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{key} {path} is not a file", f"point {key} at the file")
        mode = stat.S_IMODE(st.st_mode)
        if (why := _too_open(mode)) is not None:
            raise SecretFileError(
                f"{key} {path} is {why} (mode {mode:04o}): refused",
                f"chmod 600 {path} (owned by the gateway's user)",
            )
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data.strip():
        raise SecretFileError(f"{key} {path} is empty", f"write the secret into {path}")
    return data


def secret_files(auth: AuthConfig) -> list[tuple[str, Path]]:
    """``(config key, path)`` of each secret file the method reads."""
    keys = {
        "google": ("key_file",),
        "azure": ("client_secret_file",),
        "aws-sigv4": ("credentials_file",),
        "bearer": ("token_file",),
    }.get(auth.method, ())
    out = []
    for key in keys:
        path = getattr(auth, key)
        if path is not None:
            out.append((f"upload.auth.{key}", path))
    return out


def check_secret_files(config: Config) -> None:
    """Refuse to start with a secret file that others can read or write.  A missing
    file is not refused here (the agent that writes it may come later): each request
    and ``doctor`` say so."""
    for key, path in secret_files(config.upload.auth):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if (why := _too_open(mode)) is not None:
            raise ConfigError(
                config.source, key, f"{path} is {why} (mode {mode:04o}): chmod 600 {path}"
            )


# -- what a request carries ----------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Token:
    """An access token; its repr never shows the value."""

    value: str
    #: time.time() when it expires; None: not known (a bearer token file).
    expires_at: float | None
    obtained_at: float = field(default_factory=time.time)
    #: What the token was read from (a bearer file's identity), to see it change.
    source: tuple[int, ...] = ()

    @property
    def refresh_at(self) -> float | None:
        if self.expires_at is None:
            return None
        lifetime = max(0.0, self.expires_at - self.obtained_at)
        return self.expires_at - min(REFRESH_BEFORE_S, REFRESH_SHARE * lifetime)

    def fresh(self, now: float | None = None) -> bool:
        at = self.refresh_at
        return at is None or (now if now is not None else time.time()) < at

    def __repr__(self) -> str:
        left = "unknown" if self.expires_at is None else f"{self.expires_at - time.time():.0f} s"
        return f"Token(<redacted>, expires in {left})"


@dataclass(frozen=True, repr=False)
class Signature:
    """The headers one request carries, and which credentials made them (so that a
    refusal drops those, not newer ones another request already fetched)."""

    headers: Mapping[str, str]
    generation: int

    def __repr__(self) -> str:
        return f"Signature(headers={sorted(self.headers)}, generation={self.generation})"


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read in full."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes


#: A request body: bytes, or a callable that builds a fresh aiohttp payload for each
#: attempt (a file payload is consumed by sending it).
Body = bytes | Callable[[], aiohttp.payload.Payload] | None


def _host_header(url: str) -> str:
    """The Host header aiohttp sends for *url* (the port only when not the default)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def query_url(base: str, params: Mapping[str, str]) -> str:
    """*base* with *params* percent-encoded as SigV4's canonical form expects
    (RFC 3986 unreserved characters kept, everything else ``%XX``), so that the URL
    sent is the URL signed.  Send it as ``yarl.URL(url, encoded=True)``."""
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="")
    return f"{base}?{query}" if query else base


def system_ca_bundle() -> str | bool:
    """The system's CA bundle for ``requests`` (which would otherwise use certifi's),
    so token endpoints are trusted like the archive is by ``gateway.https.ssl_context``."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, paths.capath, paths.openssl_capath):
        if candidate and os.path.exists(candidate):
            return candidate
    return True


def verified_session(ca_file: Path | None) -> Any:
    """A ``requests`` session that verifies TLS against *ca_file* or the system CAs,
    whatever the environment says (requests lets ``REQUESTS_CA_BUNDLE`` replace a
    session's ``verify``: https://github.com/psf/requests/issues/3829), and refuses
    plain http (a key file's ``token_uri`` could name one)."""
    import requests
    import requests.adapters

    verify: str | bool = str(ca_file) if ca_file else system_ca_bundle()

    class Verifying(requests.adapters.HTTPAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = verify
            return super().send(request, *args, **kwargs)

    class Plaintext(requests.adapters.BaseAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            raise requests.exceptions.InvalidURL(f"not https: {request.url}")

        def close(self) -> None:
            pass

    session = requests.Session()
    session.mount("https://", Verifying())
    session.mount("http://", Plaintext())
    return session


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _is_tls_untrusted(exc: BaseException) -> bool:
    return any(
        isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
        for e in _chain(exc)
    )


def _is_unreachable(exc: BaseException) -> bool:
    names = {"ConnectionError", "ServiceRequestError", "ConnectTimeout", "ReadTimeout"}
    return any(
        isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in names
        for e in _chain(exc)
    )


# -- the methods ------------------------------------------------------------------------------


class Authenticator:
    """How requests are authenticated; this base is ``mtls`` (no header: the TLS
    client certificate is the credential)."""

    method = "mtls"
    #: SigV4 signs the body's SHA-256: :meth:`sign` needs ``payload_sha256``.
    signs_payload = False
    #: Answers after which fresh credentials may get the request through.
    retry_statuses: frozenset[int] = frozenset()

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # one refresh at a time, whichever loop asks
        self._generation = 0
        #: Secret values this object has seen, removed from any text it shows: the
        #: long-lived ones (keys, client secrets) and the last tokens.
        self._lasting: set[str] = set()
        self._tokens: collections.deque[str] = collections.deque(maxlen=16)

    def __repr__(self) -> str:
        files = ", ".join(f"{k}={p}" for k, p in secret_files(self.config))
        return f"{type(self).__name__}(method={self.method!r}{', ' if files else ''}{files})"

    async def sign(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        payload_sha256: str | None = None,
    ) -> Signature:
        """The headers to add to a request of *method* to *url* with *headers*.
        Raises :class:`AuthError`."""
        return Signature({}, self._generation)

    async def refused(self, signature: Signature) -> None:
        """The peer refused *signature*: its credentials are not used again."""

    def describe(self) -> str:
        """One line on the credentials in hand (never their value), for ``doctor``."""
        return "the TLS client certificate authenticates"

    def sanitise(self, text: str, limit: int = 200) -> str:
        """*text* from a peer or a library, fit to log and show: the secrets this
        object knows and anything token-shaped replaced, on one line, at most *limit*
        characters."""
        for secret in sorted({*self._lasting, *tuple(self._tokens)}, key=len, reverse=True):
            if len(secret) >= 6:
                text = text.replace(secret, "[redacted]")
        text = _TOKENISH.sub(_redact_tokenish, text)
        text = " ".join(text.split())
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _remember(self, secret: str, lasting: bool = False) -> None:
        """Keep *secret* out of every text this object shows (a PEM key line by line)."""
        if not lasting:
            self._tokens.append(secret)
            return
        for part in (secret, *secret.splitlines()):
            if part.strip() and not part.startswith("-----"):
                self._lasting.add(part.strip())

    async def send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Body = None,
        payload_sha256: str | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Reply:
        """Send one request with this method's credentials and read the answer; on a
        refusal (:attr:`retry_statuses`) drop the credentials and send it once more
        with fresh ones (the body built again).  aiohttp's errors and
        :class:`AuthError` are the caller's.  *url* must be encoded already
        (:func:`query_url`): it is sent as it was signed."""
        for attempt in (1, 2):
            data = body() if callable(body) else body
            sent = dict(headers or {})
            if isinstance(data, aiohttp.payload.Payload):
                sent.setdefault("Content-Type", data.content_type)
            digest = payload_sha256
            if self.signs_payload and digest is None:
                assert not isinstance(data, aiohttp.payload.Payload), "payload_sha256 needed"
                digest = hashlib.sha256(data or b"").hexdigest()
            signature = await self.sign(method, url, sent, digest)
            extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
            async with session.request(
                method,
                yarl.URL(url, encoded=True),
                data=data,
                headers={**sent, **signature.headers},
                **extra,
            ) as resp:
                reply = Reply(resp.status, resp.reason or "", resp.headers, await resp.read())
            if attempt == 1 and reply.status in self.retry_statuses:
                log.warning(
                    "%s refused the %s credentials (HTTP %d): fetching new ones and sending again",
                    _host_header(url), self.method, reply.status,
                )  # fmt: skip
                await self.refused(signature)
                continue
            return reply
        raise AssertionError("unreachable")  # pragma: no cover


def _redact_tokenish(match: re.Match[str]) -> str:
    s = match.group(0)
    mixed = any(c.isupper() for c in s) and any(c.islower() for c in s)
    return "[redacted]" if mixed and any(c.isdigit() for c in s) else s


class _TokenAuth(Authenticator, abc.ABC):
    """A bearer token fetched by a library (in a thread) and refreshed ahead of expiry."""

    retry_statuses = frozenset({401})

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config)
        #: The token in use and its generation (one tuple: read without the lock).
        self._held: tuple[Token, int] | None = None

    async def sign(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        payload_sha256: str | None = None,
    ) -> Signature:
        held = self._held
        if held is None or not self._usable(held[0]):
            held = await asyncio.to_thread(self._refresh, held)
        token, generation = held
        return Signature({"Authorization": f"Bearer {token.value}"}, generation)

    def _usable(self, token: Token) -> bool:
        return token.fresh()

    def _refresh(self, seen: tuple[Token, int] | None) -> tuple[Token, int]:
        with self._lock:
            held = self._held
            if held is not None and held is not seen and self._usable(held[0]):
                return held  # another request refreshed it meanwhile
            token = self._fetch()
            self._remember(token.value)
            self._generation += 1
            self._held = (token, self._generation)
            left = "" if token.expires_at is None else (
                f", valid for {token.expires_at - token.obtained_at:.0f} s"
            )  # fmt: skip
            log.info("upload.auth: new %s token%s", self.method, left)
            return self._held

    async def refused(self, signature: Signature) -> None:
        await asyncio.to_thread(self._drop, signature.generation)

    def _drop(self, generation: int) -> None:
        with self._lock:
            if self._held is not None and self._held[1] == generation:
                self._held = None
                self._reset()

    def describe(self) -> str:
        if self._held is None:
            return f"no {self.method} token yet"
        token = self._held[0]
        if token.expires_at is None:
            return f"{self.method} token in hand"
        return f"{self.method} token valid for {token.expires_at - time.time():.0f} s"

    @abc.abstractmethod
    def _fetch(self) -> Token:
        """Get a new token (blocking; called in a thread, one at a time)."""

    def _reset(self) -> None:
        """After a refusal: forget what the library cached, so the next fetch asks anew."""


class GoogleAuth(_TokenAuth):
    """OAuth 2.0 access tokens from google-auth: a service-account key's JWT-bearer
    grant (RFC 7523) at the key's ``token_uri``, or the workload's credentials.  The
    token endpoint is reached through a ``requests`` session that verifies TLS
    against ``upload.auth.ca_file`` or the system CAs."""

    method = "google"

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config)
        self._http = verified_session(config.ca_file)
        self._default: Any = None  # workload credentials, kept: they cache their own state

    def _fetch(self) -> Token:
        import google.auth
        import google.auth.exceptions
        import google.auth.transport.requests
        from google.oauth2 import service_account

        scopes = list(self.config.scopes) or [GOOGLE_SCOPE]
        key_file = self.config.key_file
        where = "the token endpoint"
        if key_file is not None:
            raw = read_secret(key_file, "upload.auth.key_file")
            try:
                info = json.loads(raw)
                self._remember(str(info.get("private_key", "")), lasting=True)
                where = _host_header(str(info.get("token_uri", ""))) or where
                creds: Any = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                    info, scopes=scopes
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                # The library's message may quote the key: not shown.
                raise AuthError(
                    f"upload.auth.key_file {key_file} is not a service-account JSON key",
                    "download a new JSON key for the service account and install it (0600)",
                ) from None
        else:
            try:
                if self._default is None:
                    self._default, _ = google.auth.default(scopes=scopes)
            except google.auth.exceptions.DefaultCredentialsError as exc:
                raise AuthError(
                    f"no Google workload credentials: {self.sanitise(str(exc))}",
                    "set upload.auth.key_file, or run on a workload with a service account",
                ) from None
            creds = self._default
        try:
            creds.refresh(google.auth.transport.requests.Request(self._http))
        except google.auth.exceptions.RefreshError as exc:
            raise self._refused_error(exc, where) from None
        except google.auth.exceptions.TransportError as exc:
            raise _endpoint_error(self, exc, where) from None
        except google.auth.exceptions.GoogleAuthError as exc:
            raise AuthError(
                f"google-auth: {self.sanitise(str(exc))}", "see the token endpoint's answer"
            ) from None
        finally:
            # The next refresh is most of an hour away: no idle connection kept.
            self._http.close()
        if not creds.token:
            raise AuthError(f"{where} gave no access token", "see the token endpoint's log")
        expiry = creds.expiry
        expires_at = None if expiry is None else expiry.replace(tzinfo=UTC).timestamp()
        return Token(str(creds.token), expires_at)

    def _refused_error(self, exc: BaseException, where: str) -> AuthError:
        if _is_tls_untrusted(exc) or _is_unreachable(exc):
            return _endpoint_error(self, exc, where)
        # RefreshError's first argument is "error: error_description" (or a body).
        text = self.sanitise(str(exc.args[0]) if exc.args else "")
        return AuthError(
            f"{where} refused the service account's credentials: {text}",
            "the key may be deleted or disabled, or the clock wrong: create a new key"
            " for the service account and install it as upload.auth.key_file",
        )


class AzureAuth(_TokenAuth):
    """Microsoft Entra tokens from azure-identity's ``ClientSecretCredential`` (client
    credentials).  ``disable_instance_discovery`` is always set: the authority is the
    configured ``authority_host`` (as trusted as the config itself), and MSAL would
    otherwise ask login.microsoftonline.com to vouch for any other host.  TLS to the
    authority is verified against ``upload.auth.ca_file`` or the system CAs
    (azure-core's ``connection_verify``).  Each fetch builds the credential anew: a
    closed one cannot be used again, and after a refusal MSAL would hand back its
    cached token."""

    method = "azure"

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config)
        self._credential: Any = None

    def _fetch(self) -> Token:
        from azure.core.exceptions import AzureError
        from azure.identity import ClientSecretCredential

        c = self.config
        assert c.client_secret_file is not None  # config checked
        authority = "https://" + c.authority_host.removeprefix("https://").rstrip("/")
        where = _host_header(authority)
        if self._credential is None:
            secret = read_secret(c.client_secret_file, "upload.auth.client_secret_file")
            value = secret.decode("utf-8", "replace").strip()
            self._remember(value, lasting=True)
            verify: str | bool = str(c.ca_file) if c.ca_file else system_ca_bundle()
            try:
                self._credential = ClientSecretCredential(
                    c.tenant_id, c.client_id, value,
                    authority=authority, disable_instance_discovery=True,
                    connection_verify=verify,
                )  # fmt: skip
            except ValueError as exc:
                raise AuthError(
                    f"azure: {self.sanitise(str(exc))}", "check upload.auth.authority_host"
                ) from None
        scope = (c.scopes or (AZURE_SCOPE,))[0]
        try:
            token = self._credential.get_token(scope)
        except AzureError as exc:
            self._reset()
            if _is_tls_untrusted(exc) or _is_unreachable(exc):
                raise _endpoint_error(self, exc, where) from None
            text = self.sanitise(str(getattr(exc, "message", "") or exc))
            raise AuthError(
                f"Microsoft Entra ({where}) refused the client credentials: {text}",
                "check upload.auth.tenant_id and client_id, and that client_secret_file holds"
                " the secret's value (not its ID) and it has not expired",
            ) from None
        # The next fetch is most of an hour away: no idle connection kept.  A closed
        # credential cannot open its transport again ("HTTP transport has already been
        # closed"), so the next fetch builds a new one, reading the secret file again
        # (a rotated secret is picked up); the token itself is cached here.
        self._reset()
        return Token(str(token.token), float(token.expires_on))

    def _reset(self) -> None:
        if self._credential is not None:
            self._credential.close()
        self._credential = None


class BearerAuth(_TokenAuth):
    """A token file kept fresh by another agent: read again when it changes (inode,
    size or mtime) and after a refusal.  Its expiry is not known here."""

    method = "bearer"

    def _file(self) -> Path:
        path = self.config.token_file
        assert path is not None  # config checked
        return path

    def _identity(self) -> tuple[int, ...]:
        try:
            st = os.stat(self._file())
        except OSError:
            return ()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _usable(self, token: Token) -> bool:
        return token.source == self._identity() != ()

    def _fetch(self) -> Token:
        identity = self._identity()
        raw = read_secret(self._file(), "upload.auth.token_file")
        value = raw.decode("utf-8", "replace").strip()
        if value.lower().startswith("bearer "):
            value = value[7:].strip()
        if not value or any(c.isspace() or not c.isprintable() for c in value):
            raise SecretFileError(
                f"upload.auth.token_file {self._file()} does not hold one token",
                "the file must hold the access token alone, on one line",
            )
        return Token(value, None, source=identity)


class AwsSigV4Auth(Authenticator):
    """Each request signed with botocore's ``SigV4Auth``: credentials from botocore's
    standard chain (environment, shared credentials file, ``profile``, container or
    instance roles), which refreshes temporary ones itself; with ``credentials_file``
    set, from that file alone (its ``profile``, or ``default``).  The signed headers are
    Host, the caller's (Accept, Content-Type) and ``x-amz-date``,
    ``x-amz-content-sha256`` (the body's SHA-256) and ``x-amz-security-token``: all
    sent as signed.  After a refusal (401/403) the chain is read again."""

    method = "aws-sigv4"
    signs_payload = True
    retry_statuses = frozenset({401, 403})

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config)
        self._credentials: Any = None
        # botocore.auth logs each canonical request at DEBUG, with the session
        # token in it: kept at INFO so a DEBUG gateway log holds no secret.
        logging.getLogger("botocore.auth").setLevel(logging.INFO)

    def _frozen(self) -> tuple[Any, int]:
        import botocore.credentials
        import botocore.exceptions
        import botocore.session

        with self._lock:
            try:
                if self._credentials is None:
                    c = self.config
                    if c.credentials_file is not None:
                        # A file named in the config is what the operator means: it
                        # alone, not the environment first as the chain would.
                        read_secret(c.credentials_file, "upload.auth.credentials_file")
                        self._credentials = botocore.credentials.SharedCredentialProvider(
                            str(c.credentials_file), c.profile or "default"
                        ).load()
                    else:
                        session = botocore.session.Session(profile=c.profile or None)
                        self._credentials = session.get_credentials()
                    self._generation += 1
                if self._credentials is None:
                    raise AuthError(
                        "no AWS credentials found (environment, shared credentials file,"
                        " profile, container or instance role)",
                        "set upload.auth.credentials_file or profile, or give the box a role",
                    )
                frozen = self._credentials.get_frozen_credentials()
            except botocore.exceptions.BotoCoreError as exc:
                self._credentials = None
                raise AuthError(
                    f"AWS credentials: {self.sanitise(str(exc))}",
                    "check upload.auth.profile, credentials_file and the environment",
                ) from None
            self._remember(frozen.secret_key, lasting=True)
            if frozen.token:
                self._remember(frozen.token)
            return frozen, self._generation

    async def sign(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        payload_sha256: str | None = None,
    ) -> Signature:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        frozen, generation = await asyncio.to_thread(self._frozen)
        request = AWSRequest(
            method=method,
            url=url,
            headers={
                **headers,
                "Host": _host_header(url),
                "X-Amz-Content-SHA256": payload_sha256 or EMPTY_SHA256,
            },
        )
        SigV4Auth(frozen, self.config.service, self.config.region).add_auth(request)
        added = ("Host", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token",
                 "Authorization")  # fmt: skip
        return Signature(
            {name: request.headers[name] for name in added if name in request.headers},
            generation,
        )

    async def refused(self, signature: Signature) -> None:
        await asyncio.to_thread(self._drop, signature.generation)

    def _drop(self, generation: int) -> None:
        with self._lock:  # held by a credential refresh in a thread: not on the loop
            if generation == self._generation:
                self._credentials = None

    def describe(self) -> str:
        return f"SigV4 for {self.config.service} in {self.config.region}"


def _endpoint_error(auth: Authenticator, exc: BaseException, where: str) -> AuthError:
    text = auth.sanitise(str(exc))
    if _is_tls_untrusted(exc):
        return AuthError(
            f"TLS: {where}'s certificate is not trusted ({text})",
            "set upload.auth.ca_file to the CA that signs the token endpoint's certificate"
            " (empty: the system CAs)",
        )
    return AuthError(
        f"cannot reach the token endpoint {where}: {text}",
        f"check the uplink, DNS and firewall/proxy towards {where}",
    )


_METHODS: dict[str, type[Authenticator]] = {
    "mtls": Authenticator,
    "google": GoogleAuth,
    "azure": AzureAuth,
    "aws-sigv4": AwsSigV4Auth,
    "bearer": BearerAuth,
}
_shared: dict[AuthConfig, Authenticator] = {}
_shared_lock = threading.Lock()


def authenticator(config: AuthConfig) -> Authenticator:
    """A new authenticator for *config* (its own token cache)."""
    return _METHODS[config.method](config)


def shared(upload: UploadConfig) -> Authenticator:
    """The process's authenticator for ``upload.auth``: the upload, the worklist and
    the heartbeat share one token and one refresh."""
    with _shared_lock:
        auth = _shared.get(upload.auth)
        if auth is None:
            auth = _shared[upload.auth] = authenticator(upload.auth)
        return auth


def origin(url: str) -> tuple[str, str, int | None]:
    """*url*'s origin (RFC 6454): scheme, host and port (the scheme's default when
    not written), lower-cased, the host as sent (IDNA-encoded)."""
    u = yarl.URL(url)
    return (u.scheme.lower(), (u.raw_host or "").lower(), u.port)


def same_origin(url: str, other: str) -> bool:
    """*url* and *other* have one origin (and a host: an empty URL is no origin)."""
    try:
        mine, theirs = origin(url), origin(other)
    except ValueError:  # not a URL: no origin to share
        return False
    return bool(mine[1]) and mine == theirs


def for_origin(upload: UploadConfig, url: str) -> Authenticator:
    """The authenticator for requests to *url* that is not necessarily the archive
    (the heartbeat): ``upload.auth``'s (:func:`shared`) when *url* has the archive's
    origin (``upload.dicomweb_url``), else the TLS client certificate alone.  An
    endpoint run by someone else (a fleet receiver) must never receive the archive's
    token or a SigV4 signature made with its keys."""
    if same_origin(url, upload.dicomweb_url):
        return shared(upload)
    return Authenticator(AuthConfig())


# -- what a refusal says ----------------------------------------------------------------------


def refusal_text(body: bytes, www_authenticate: str = "") -> str:
    """The reason in a 401/403 answer: a JSON body's ``error_description``,
    ``error.message`` (Google), ``message``/``Message`` (AWS) or ``error``; else the
    ``error_description`` or ``error`` of ``WWW-Authenticate`` (RFC 6750 3); else ""."""
    try:
        value: Any = json.loads(body) if body.strip() else None
    except ValueError:
        value = None
    if isinstance(value, dict):
        err = value.get("error")
        for candidate in (
            value.get("error_description"),
            err.get("message") if isinstance(err, dict) else None,
            value.get("message"),
            value.get("Message"),
            err if isinstance(err, str) else None,
        ):
            if isinstance(candidate, str) and candidate.strip():
                return candidate
    for name in ("error_description", "error"):
        m = re.search(rf'{name}="([^"]*)"', www_authenticate)
        if m and m.group(1).strip():
            return m.group(1)
    return ""
