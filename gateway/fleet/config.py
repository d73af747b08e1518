"""The fleet receiver's configuration (``fleet.toml``): loaded and validated once into
a frozen :class:`FleetConfig`, with the same rules and one-line errors as the
gateway's own file (gateway/config.py): unknown keys and wrong types are refused,
naming the file and the key.

There is no embedded default for the certificates: the receiver only ever listens
with mutual TLS, so ``receiver.tls_cert``, ``receiver.tls_key`` and
``receiver.client_ca_file`` are required.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    ConfigError,
    LoggingConfig,
    build_section,
    check_bind,
    check_logging,
    check_port,
    is_loopback,
    read_toml,
)


@dataclass(frozen=True)
class ReceiverConfig:
    """``[receiver]``: where the boxes' heartbeats arrive (HTTPS, mutual TLS)."""

    bind: str = "0.0.0.0"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The CA that signs the boxes' client certificates: only they get in.
    client_ca_file: Path | None = None
    max_body_bytes: int = 65536
    max_clock_skew_seconds: float = 300.0


@dataclass(frozen=True)
class ViewConfig:
    """``[view]``: the fleet page and ``/metrics`` (for people and Prometheus)."""

    bind: str = "127.0.0.1"
    port: int = 9480
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca_file: Path | None = None
    refresh_seconds: int = 10


@dataclass(frozen=True)
class BoxesConfig:
    stale_after_seconds: float = 180.0


@dataclass(frozen=True)
class DatabaseConfig:
    path: Path = Path("var/fleet/fleet.sqlite3")


@dataclass(frozen=True)
class FleetConfig:
    source: str = "<defaults>"
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    boxes: BoxesConfig = field(default_factory=BoxesConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(FleetConfig)[f.name]
    for f in dataclasses.fields(FleetConfig)
    if f.name != "source"
}


def load(path: str | Path) -> FleetConfig:
    return from_dict(read_toml(path), str(path))


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> FleetConfig:
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(source, name, f"unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(source, name, "must be a table, e.g. [" + name + "]")
        sections[name] = build_section(SECTIONS[name], name, value, source)
    config = FleetConfig(source=source, **sections)
    _check(config)
    return config


def _check(c: FleetConfig) -> None:
    s, r, v = c.source, c.receiver, c.view
    check_bind(s, "receiver.bind", r.bind)
    check_port(s, "receiver.port", r.port, allow_zero=True)
    for key in ("tls_cert", "tls_key", "client_ca_file"):
        if getattr(r, key) is None:
            # No plaintext and no unauthenticated mode: a box is its client certificate.
            raise ConfigError(
                s, f"receiver.{key}", "required (the receiver speaks mutual TLS only)"
            )
    if not 1024 <= r.max_body_bytes <= 16 * 1024 * 1024:
        raise ConfigError(s, "receiver.max_body_bytes", "must be between 1024 and 16777216")
    if r.max_clock_skew_seconds <= 0:
        raise ConfigError(s, "receiver.max_clock_skew_seconds", "must be a positive number")
    check_bind(s, "view.bind", v.bind)
    check_port(s, "view.port", v.port, allow_zero=True)
    if (v.tls_cert is None) != (v.tls_key is None):
        raise ConfigError(s, "view.tls_key", "tls_cert and tls_key go together")
    if v.client_ca_file is not None and v.tls_cert is None:
        raise ConfigError(s, "view.client_ca_file", "needs view.tls_cert and view.tls_key (HTTPS)")
    if not is_loopback(v.bind) and v.client_ca_file is None:
        # The page names every clinic's box: beyond loopback only with client certificates.
        raise ConfigError(
            s, "view.bind", f"{v.bind} is not a loopback address: set view.client_ca_file first"
        )
    if v.refresh_seconds < 1:
        raise ConfigError(s, "view.refresh_seconds", "must be at least 1")
    if c.boxes.stale_after_seconds <= 0:
        raise ConfigError(s, "boxes.stale_after_seconds", "must be a positive number of seconds")
    check_logging(s, c.logging)
