"""Test doubles of the clouds' authentication: a Google OAuth 2.0 token endpoint, a
Microsoft Entra tenant, and an AWS SigV4 verifier.

These are hand-written doubles, not the real services: no real cloud is reachable
from this machine.  They exist so that the gateway's authentication (gateway.auth)
runs each vendor library's real token flow -- google-auth's service-account
JWT-bearer grant, azure-identity/MSAL's client-credentials grant -- against a local
endpoint, over TLS with a trustme CA (never an unverified connection; the site is
tests/support/tls_site.py's), and so that
SigV4 signatures are checked by botocore's own canonical-request and signature code.
Each double checks what the vendor documents and answers the way the vendor
documents, errors included:

* :class:`GoogleTokenEndpoint`, after "Using OAuth 2.0 for Server to Server
  Applications", https://developers.google.com/identity/protocols/oauth2/service-account
  (the JWT header/claim set, the token request and response, the error answers), and
  RFC 7523 (JWT Profile for OAuth 2.0 Authorization Grants),
  https://www.rfc-editor.org/rfc/rfc7523 : it verifies the assertion's RS256 signature
  with the test service account's public key, and its ``iss``, ``aud`` (Google's
  token URI), ``scope``, ``iat`` and ``exp`` (at most one hour), and issues random
  short-lived access tokens.  The service-account key file follows the JSON that the
  Cloud console downloads (https://cloud.google.com/iam/docs/keys-create-delete).
* :class:`EntraTenant`, after "Microsoft identity platform and the OAuth 2.0 client
  credentials flow",
  https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow
  (request fields, the success answer, the ``AADSTS`` errors) and the OpenID Connect
  discovery document, https://learn.microsoft.com/entra/identity-platform/v2-protocols-oidc
  (``/{tenant}/v2.0/.well-known/openid-configuration``, which MSAL reads first:
  https://github.com/AzureAD/microsoft-authentication-library-for-python/blob/dev/msal/authority.py).
* :class:`SigV4Verifier`, after "Create a signed AWS API request",
  https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html , with
  the canonical request, string to sign and signature computed by botocore's
  ``SigV4Auth`` (https://github.com/boto/botocore/blob/develop/botocore/auth.py) from
  the request as received; ``x-amz-content-sha256`` must be the body's SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .tls_site import TlsSite

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class _IssuedTokens:
    """Access tokens handed out, until they expire or are revoked."""

    def __init__(self) -> None:
        self.issued: dict[str, float] = {}  # token -> time.time() it expires
        self.revoked: set[str] = set()
        self._lock = threading.Lock()

    def issue(self, lifetime: float) -> str:
        token = "tok-" + secrets.token_urlsafe(32)
        with self._lock:
            self.issued[token] = time.time() + lifetime
        return token

    def valid(self, token: str) -> bool:
        with self._lock:
            expires = self.issued.get(token)
            return expires is not None and time.time() < expires and token not in self.revoked

    def revoke_all(self) -> None:
        with self._lock:
            self.revoked.update(self.issued)

    def bearer_valid(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.valid(token.strip())


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GoogleTokenEndpoint(TlsSite):
    """Google's OAuth 2.0 token endpoint for a service account (see the module
    docstring), and the service account's JSON key file."""

    EMAIL = "dicom-gateway@gw-test-project.iam.gserviceaccount.com"
    SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
    #: The assertion's audience: "always https://oauth2.googleapis.com/token" (Google's
    #: document), whatever URL the request is sent to.
    AUDIENCE = "https://oauth2.googleapis.com/token"

    def __init__(self, work: Path, expires_in: int = 3600) -> None:
        super().__init__(work, "google")
        self.expires_in = expires_in
        self.tokens = _IssuedTokens()
        self.grants = 0
        self.refusals: list[str] = []
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = key.public_key()
        self.key_id = secrets.token_hex(20)
        self.private_key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.key_file = work / "service-account.json"
        self.app.router.add_post("/token", self._token)

    def start(self) -> GoogleTokenEndpoint:
        super().start()
        self.write_key_file(self.key_file)
        return self

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def write_key_file(self, path: Path, private_key_pem: str | None = None) -> Path:
        """The service account's key, as the console downloads it, mode 0600."""
        key = {
            "type": "service_account",
            "project_id": "gw-test-project",
            "private_key_id": self.key_id,
            "private_key": private_key_pem or self.private_key_pem,
            "client_email": self.EMAIL,
            "client_id": "104242424242424242424",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(key, f)
        return path

    def _error(self, status: int, error: str, description: str) -> web.Response:
        self.refusals.append(f"{error}: {description}")
        return web.json_response({"error": error, "error_description": description}, status=status)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return self._error(400, "unsupported_grant_type", "Invalid grant_type.")
        assertion = str(form.get("assertion", ""))
        try:
            head_b64, claims_b64, sig_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(head_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(sig_b64)
        except ValueError:
            return self._error(
                400, "invalid_grant", "Invalid JWT: Token must be a short-lived token"
            )
        if header.get("alg") != "RS256":
            return self._error(400, "invalid_grant", "Invalid JWT: algorithm must be RS256")
        try:
            self.public_key.verify(
                signature, f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return self._error(400, "invalid_grant", "Invalid JWT Signature.")
        now = time.time()
        if claims.get("iss") != self.EMAIL:
            return self._error(400, "invalid_grant", "Invalid issuer: unknown service account")
        if claims.get("aud") != self.AUDIENCE:
            return self._error(400, "invalid_grant", "Invalid JWT: audience is not the token URI")
        if self.SCOPE not in str(claims.get("scope", "")).split():
            return self._error(400, "invalid_scope", "The cloud-healthcare scope was not asked")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            return self._error(400, "invalid_grant", "Invalid JWT: iat and exp are required")
        if iat > now + 60 or exp <= now or exp - iat > 3600:
            return self._error(
                400, "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a"
                " reasonable timeframe. Check your iat and exp values",
            )  # fmt: skip
        with self._lock:
            self.grants += 1
        token = self.tokens.issue(self.expires_in)
        return web.json_response(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )


class EntraTenant(TlsSite):
    """A Microsoft Entra tenant with one app registration (client credentials)."""

    def __init__(self, work: Path, expires_in: int = 3599) -> None:
        super().__init__(work, "entra")
        self.tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47"
        self.client_id = "6731de76-14a6-49ae-97bc-6eba6914391e"
        self.client_secret = "Q~" + secrets.token_urlsafe(30)
        self.scope = "https://dicom.healthcareapis.azure.com/.default"
        self.expires_in = expires_in
        self.tokens = _IssuedTokens()
        self.grants = 0
        self.discoveries = 0
        self.refusals: list[str] = []
        self.app.router.add_get(
            "/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration
        )
        self.app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)

    @property
    def authority_host(self) -> str:
        return f"localhost:{self.port}"

    def write_secret_file(self, path: Path, secret: str | None = None) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((secret or self.client_secret) + "\n")
        return path

    def _error(self, status: int, error: str, code: int, description: str) -> web.Response:
        self.refusals.append(f"{error}: AADSTS{code}")
        trace = secrets.token_hex(16)
        return web.json_response(
            {
                "error": error,
                "error_description": f"AADSTS{code}: {description}"
                f" Trace ID: {trace} Correlation ID: {secrets.token_hex(16)}"
                f" Timestamp: {datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}",
                "error_codes": [code],
                "trace_id": trace,
            },
            status=status,
        )

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if tenant != self.tenant_id:
            return self._error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        with self._lock:
            self.discoveries += 1
        base = f"{self.base_url}/{tenant}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{self.base_url}/{tenant}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post", "private_key_jwt", "client_secret_basic"
                ],
                "response_types_supported": ["code", "id_token", "code id_token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "tenant_region_scope": "EU",
            }
        )  # fmt: skip

    async def _token(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        form = await request.post()
        if tenant != self.tenant_id:
            return self._error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return self._error(
                400, "unsupported_grant_type", 70003, "The grant type is not supported."
            )
        if form.get("client_id") != self.client_id:
            return self._error(
                400, "unauthorized_client", 700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the"
                " directory.",
            )  # fmt: skip
        secret = str(form.get("client_secret", ""))
        if not hmac.compare_digest(secret.encode(), self.client_secret.encode()):
            return self._error(
                401, "invalid_client", 7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request"
                " is the client secret value, not the client secret ID.",
            )  # fmt: skip
        if str(form.get("scope", "")).split() != [self.scope]:
            return self._error(
                400, "invalid_scope", 1002012, "The provided value for scope is not valid."
            )
        with self._lock:
            self.grants += 1
        token = self.tokens.issue(self.expires_in)
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in,
                "access_token": token,
            }
        )


class SigV4Verifier:
    """Checks a request's ``Authorization: AWS4-HMAC-SHA256 ...`` the way AWS does, with
    botocore's own canonical request, string to sign and signature: the request as
    received is rebuilt as a botocore ``AWSRequest`` with just the headers named in
    SignedHeaders and the request's X-Amz-Date, and signed again with the same
    credentials.  :meth:`check` returns None when it holds, else why not."""

    def __init__(self, region: str = "us-east-1", service: str = "medical-imaging") -> None:
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        #: Temporary credentials, as STS hands out: the token travels, signed.
        self.session_token = "IQoJb3JpZ2luX2Vj" + secrets.token_urlsafe(48)
        self.region = region
        self.service = service
        self.checked = 0

    def write_credentials_file(self, path: Path, secret_key: str | None = None) -> Path:
        """A shared credentials file (https://docs.aws.amazon.com/sdkref/latest/guide/file-format.html)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                f"[default]\naws_access_key_id = {self.access_key}\n"
                f"aws_secret_access_key = {secret_key or self.secret_key}\n"
                f"aws_session_token = {self.session_token}\n"
            )
        return path

    def check(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> str | None:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        lower = {k.lower(): v for k, v in headers.items()}
        auth = lower.get("authorization", "")
        algorithm, _, rest = auth.partition(" ")
        if algorithm != "AWS4-HMAC-SHA256":
            return "not a SigV4 Authorization header"
        fields = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
        try:
            key, date, region, service, terminal = fields["Credential"].split("/")
            signed = fields["SignedHeaders"].split(";")
            signature = fields["Signature"]
        except (KeyError, ValueError):
            return "malformed Authorization header"
        if key != self.access_key:
            return "InvalidClientTokenId: the access key is not known"
        if (region, service, terminal) != (self.region, self.service, "aws4_request"):
            return f"credential scope {region}/{service}/{terminal} is not ours"
        amz_date = lower.get("x-amz-date", "")
        if not amz_date.startswith(date):
            return "X-Amz-Date does not match the credential scope's date"
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if abs((datetime.now(UTC) - when).total_seconds()) > 300:
            return "Signature expired: the request time is too far from now"
        for required in ("host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"):
            if required not in signed:
                return f"{required} is not signed"
        missing = [name for name in signed if name not in lower]
        if missing:
            return f"signed headers not in the request: {missing}"
        if lower["x-amz-content-sha256"] != hashlib.sha256(body).hexdigest():
            return "x-amz-content-sha256 is not the SHA-256 of the body received"
        if not hmac.compare_digest(lower["x-amz-security-token"], self.session_token):
            return "InvalidClientTokenId: the security token included in the request is invalid"
        request = AWSRequest(method=method, url=url, headers={n: lower[n] for n in signed})
        request.context["timestamp"] = amz_date
        credentials = Credentials(self.access_key, self.secret_key, self.session_token)
        signer = SigV4Auth(credentials, service, region)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        self.checked += 1
        if not hmac.compare_digest(expected, signature):
            return (
                "SignatureDoesNotMatch: The request signature we calculated does not match"
                " the signature you provided."
            )
        return None

    def check_request(self, request: web.Request, body: bytes) -> str | None:
        """:meth:`check` for an aiohttp server request (its URL as sent, raw)."""
        url = f"https://{request.host}{request.raw_path}"
        return self.check(request.method, url, request.headers, body)
