"""The gateway's HTTPS client side: the TLS context from the config, and hints for failures.

Every HTTPS request the gateway makes (STOW-RS to the archive, the UPS-RS worklist, the
heartbeat, the field tools' checks) goes out with :func:`ssl_context`: verified TLS
1.2 or later against ``upload.ca_file`` (or the system CAs), hostname checked, this
box's client certificate.  There is no unverified mode.  :func:`http_hint` turns a
peer's HTTP error into the one line an operator reads.
"""

from __future__ import annotations

import ssl

from . import auth as auth_module
from .auth import Authenticator
from .config import UploadConfig


def ssl_context(config: UploadConfig) -> ssl.SSLContext:
    """Verified TLS >= 1.2 with our client certificate.  Raises on unreadable files."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_file) if config.ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context already sets these; stated so no edit can loosen them.
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if config.client_cert is not None and config.client_key is not None:
        ctx.load_cert_chain(str(config.client_cert), str(config.client_key))
    return ctx


def http_hint(
    peer: str,
    status: int,
    body: bytes,
    auth: Authenticator | None = None,
    www_authenticate: str = "",
    reason: str = "",
) -> str:
    """One line for an HTTP error from *peer* (the archive, the UPS-RS server).  A
    401/403 with a token method (*auth*) names ``upload.auth`` and the peer's own
    reason (sanitised: no token in it), never the certificate."""
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    if status == 400 and "SSL certificate" in text:
        return (
            f"{peer} refused our client certificate (HTTP 400 'SSL certificate error'): "
            f"check upload.client_cert: {peer} does not trust the CA that signed it"
        )
    if status in (401, 403) and auth is not None and auth.method != "mtls":
        why = auth.sanitise(auth_module.refusal_text(body, www_authenticate), limit=160)
        said = f"HTTP {status} {reason}".rstrip() + (f": {why}" if why else "")
        return f"check upload.auth: {peer} refused the {auth.method} credentials ({said})"
    if status in (401, 403):
        return f"{peer} refused access (HTTP {status}): check this box's certificate/enrolment"
    return f"{peer} answered HTTP {status}: {text[:160]}"
