"""Gateway configuration: one TOML file loaded and validated once into a frozen object.

Every key has an embedded default, so ``dicom-gateway run`` with no file starts a
working gateway (state under ``./var``).  Unknown keys and wrong types are refused
with one line naming the file, the key and the problem (:class:`ConfigError`).
Relative paths are taken relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pipeline.archives import PROFILES
from .pipeline.bandwidth import WindowError, parse_window

#: Exit status for a configuration error (sysexits.h EX_CONFIG).  The systemd unit
#: lists it in ``RestartPreventExitStatus=`` so a broken file is not restarted in a loop.
EXIT_CONFIG = 78

AE_TITLE_MAX = 16


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` is the one-line message."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


#: upload.compression values: "none" and the codecs of gateway.pipeline.transcode.CODECS (not
#: imported here: that would load the codecs into every process that reads config).
_COMPRESSION = ("j2k-lossless", "htj2k-lossless", "htj2k-lossless-rpcl", "none")
#: upload.compress_when values (see gateway.pipeline.iffaster).
_COMPRESS_WHEN = ("always", "if-faster")


@dataclass(frozen=True)
class RemoteAE:
    """``[[dimse.remote]]``: a DICOM application entity the gateway knows by AE title and
    associates with itself (Storage Commitment reports go to the requester's entry)."""

    ae_title: str = ""
    host: str = ""
    port: int = 104


@dataclass(frozen=True)
class DimseConfig:
    ae_title: str = "DICOMGW"
    bind: str = "0.0.0.0"
    port: int = 11112
    allowed_aets: tuple[str, ...] = ()
    max_associations: int = 16
    max_pdu_size: int = 0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    drain_seconds: float = 20.0
    storage_sop_classes: tuple[str, ...] = ()
    # 0: one receiver process per usable core (gateway/dicom/receivers.py).
    receiver_processes: int = 0
    #: The remote AEs the gateway knows (``[[dimse.remote]]``), by AE title.
    remote: tuple[RemoteAE, ...] = ()

    def remote_ae(self, ae_title: str) -> RemoteAE | None:
        """The ``[[dimse.remote]]`` entry of *ae_title* (trailing spaces do not count)."""
        wanted = ae_title.strip()
        return next((r for r in self.remote if r.ae_title.strip() == wanted), None)


@dataclass(frozen=True)
class SpoolConfig:
    dir: Path = Path("var/spool")
    min_free_bytes: int = 512 * 1024 * 1024


#: The queue database's file name inside ``spool.dir`` when ``database.path`` is not set.
DATABASE_NAME = "gateway.sqlite3"


@dataclass(frozen=True)
class DatabaseConfig:
    # None: inside the spool directory (Config.database_path), so that the queue and
    # the files it refers to share one file system, one backup and one mount.
    path: Path | None = None


#: upload.auth.method values (see gateway.auth).
AUTH_METHODS = ("mtls", "google", "azure", "aws-sigv4", "bearer")


@dataclass(frozen=True)
class AuthConfig:
    """``[upload.auth]``: how requests to the archive (and the UPS-RS worklist, and the
    heartbeat when it goes to the archive's origin) are authenticated, on top of
    ``upload.client_cert`` when that is set.
    Only paths to secrets live here, never a secret itself (gateway.auth)."""

    method: str = "mtls"
    #: CA bundle for the token endpoints (google, azure); None: the system CAs.
    ca_file: Path | None = None
    #: Scopes asked for (google, azure); empty: the method's default.
    scopes: tuple[str, ...] = ()
    # google: a service-account JSON key; None: workload credentials (google.auth.default).
    key_file: Path | None = None
    # azure: Microsoft Entra client credentials.
    tenant_id: str = ""
    client_id: str = ""
    client_secret_file: Path | None = None
    authority_host: str = "login.microsoftonline.com"
    # aws-sigv4: botocore's standard credential chain, optionally a profile or file.
    region: str = ""
    service: str = "medical-imaging"
    profile: str = ""
    credentials_file: Path | None = None
    # bearer: a token another agent keeps fresh.
    token_file: Path | None = None


#: Which upload.auth keys belong to which method (others must stay at their default).
AUTH_KEYS: dict[str, tuple[str, ...]] = {
    "mtls": (),
    "google": ("ca_file", "scopes", "key_file"),
    "azure": ("ca_file", "scopes", "tenant_id", "client_id", "client_secret_file",
              "authority_host"),
    "aws-sigv4": ("region", "service", "profile", "credentials_file"),
    "bearer": ("token_file",),
}  # fmt: skip


@dataclass(frozen=True)
class UploadConfig:
    dicomweb_url: str = ""
    #: Which archive's STOW-RS semantics apply (gateway/pipeline/archives.py).
    archive: str = "generic"
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    compression: str = "j2k-lossless"
    compress_workers: int = 0  # 0: one per CPU core (encoder_processes)
    compress_when: str = "always"
    batch_max_instances: int = 50
    batch_max_bytes: int = 64 * 1024 * 1024
    concurrent_requests: int = 2
    request_timeout_seconds: float = 300.0
    min_bytes_per_second: int = 125_000
    compress_timeout_seconds: float = 60.0
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 900.0
    max_attempts: int = 500
    give_up_after_hours: float = 72.0
    max_bytes_per_second: int = 0
    windows: tuple[str, ...] = ()
    priority_aets: tuple[str, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def encoder_processes(self) -> int:
        """J2K encoder processes: ``compress_workers``, or one per usable CPU core."""
        if self.compress_workers:
            return self.compress_workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RetentionConfig:
    keep_bytes: int = 0
    keep_hours: float = 0.0


@dataclass(frozen=True)
class WorklistConfig:
    upstream_host: str = ""
    upstream_port: int = 104
    upstream_ae: str = ""
    refresh_seconds: int = 300
    expire_after_days: int = 1
    ups_url: str = ""
    drop_folder: Path | None = None
    drop_scan_seconds: int = 10


@dataclass(frozen=True)
class MppsConfig:
    upstream_host: str = ""
    upstream_port: int = 104
    upstream_ae: str = ""
    timeout_seconds: float = 30.0
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 300.0


#: commitment.verify values: what counts as the archive's confirmation of an instance.
COMMITMENT_VERIFY = ("stow", "qido")


@dataclass(frozen=True)
class CommitmentConfig:
    """``[commitment]``: the Storage Commitment SCP (gateway/commitment/)."""

    #: "stow": the archive's STOW-RS success confirms an instance; "qido": a QIDO-RS
    #: lookup after it must also find it (archives that acknowledge before they index).
    verify: str = "stow"
    #: An instance not confirmed this long after the N-ACTION is reported failed.
    timeout_hours: float = 24.0
    #: Association, DIMSE and network timeout of the N-EVENT-REPORT to the modality.
    report_timeout_seconds: float = 30.0
    report_backoff_initial_seconds: float = 5.0
    report_backoff_max_seconds: float = 300.0


@dataclass(frozen=True)
class StudyConfig:
    """``[study]``: per-study proof of delivery (gateway/studies.py)."""

    #: A study is complete once no new instance arrived for this long.
    quiet_seconds: float = 300.0


@dataclass(frozen=True)
class WebConfig:
    bind: str = "127.0.0.1"
    port: int = 8080
    password_hash: str = ""
    token_sha256: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca_file: Path | None = None
    refresh_seconds: int = 5


@dataclass(frozen=True)
class HeartbeatConfig:
    url: str = ""
    interval_seconds: float = 60.0
    #: The CA that signs the heartbeat endpoint's certificate; None: upload.ca_file.
    ca_file: Path | None = None


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    dimse: DimseConfig = field(default_factory=DimseConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    worklist: WorklistConfig = field(default_factory=WorklistConfig)
    mpps: MppsConfig = field(default_factory=MppsConfig)
    commitment: CommitmentConfig = field(default_factory=CommitmentConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    web: WebConfig = field(default_factory=WebConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def database_path(self) -> Path:
        """``database.path``, or when it is not set ``<spool.dir>/gateway.sqlite3``."""
        if self.database.path is not None:
            return self.database.path
        return self.spool.dir / DATABASE_NAME


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


def documented_keys(sections: dict[str, type] | None = None) -> list[str]:
    """Every ``section.key`` the file accepts (the README must document each one);
    a sub-table such as ``[upload.auth]`` gives ``upload.auth.key``.  *sections*:
    another file's sections (the fleet receiver's), else the gateway's."""

    def keys(prefix: str, cls: type) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            table = _table_of(hints[f.name])
            if table is not None:
                out += keys(f"{prefix}.{f.name}", table)
            else:
                out.append(f"{prefix}.{f.name}")
        return out

    chosen = SECTIONS if sections is None else sections
    return [key for name, cls in chosen.items() for key in keys(name, cls)]


def _table_of(hint: Any) -> type | None:
    """The dataclass of a sub-table (``[upload.auth]``) or of an array of tables
    (``[[dimse.remote]]``, a ``tuple[RemoteAE, ...]``); None for a plain value."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
        return typing.cast(type, args[0])
    return None


def load(path: str | Path | None) -> Config:
    """Read and validate *path*, or return the embedded defaults when it is None."""
    if path is None:
        return Config()
    return from_dict(read_toml(path), str(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file *path* as a dict; a missing, unreadable or invalid file is a
    :class:`ConfigError` (also for the fleet receiver's file, gateway/fleet/config.py)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "-", "file not found") from None
    except OSError as exc:
        raise ConfigError(source, "-", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"not valid TOML: {exc}") from None


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(source, name, f"unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(source, name, "must be a table, e.g. [" + name + "]")
        sections[name] = build_section(SECTIONS[name], name, value, source)
    config = Config(source=source, **sections)
    _check(config)
    return config


def build_section(cls: type, section: str, raw: dict[str, Any], source: str) -> Any:
    """The frozen dataclass *cls* from the TOML table *raw* of *section*: unknown keys
    and wrong types are refused (:class:`ConfigError`), missing keys keep defaults."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                source, f"{section}.{key}", f"unknown key (known: {', '.join(sorted(known))})"
            )
        values[key] = _coerce(hints[key], value, source, f"{section}.{key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(source, key, f"expected {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"must be a table, e.g. [{key}]")
        return build_section(hint, key, value, source)
    if origin in (typing.Union, types.UnionType):
        # Only ``X | None`` is used: an empty string means "not set".
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        if value == "":
            return None
        return _coerce(inner, value, source, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise wrong("a path string")
        return Path(value)
    table = _table_of(hint) if origin is tuple else None
    if table is not None:
        # An array of tables: [[dimse.remote]], each entry named by its index.
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(source, key, f"must be an array of tables, e.g. [[{key}]]")
        return tuple(build_section(table, f"{key}[{i}]", v, source) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return tuple(value)
    raise AssertionError(f"unsupported config type {hint!r} for {key}")


def _valid_ae_title(title: str) -> bool:
    # PS3.5 6.2: AE is 16 chars of the default repertoire, no backslash or control
    # characters; leading/trailing spaces are not significant, all-space is invalid.
    return (
        0 < len(title.strip()) <= AE_TITLE_MAX
        and title.isascii()
        and all(ch.isprintable() and ch != "\\" for ch in title)
    )


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros in a component, at most 64 chars."""
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def check_port(source: str, key: str, port: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(source, key, f"must be between {low} and 65535, got {port}")


def check_bind(source: str, key: str, bind: str) -> None:
    if bind == "localhost":
        return
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise ConfigError(source, key, f"must be an IP address, got {bind!r}") from None


#: logging.level values (the gateway's file and the fleet receiver's).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def check_logging(source: str, section: LoggingConfig) -> None:
    if section.level.upper() not in LOG_LEVELS:
        raise ConfigError(
            source, "logging.level", f"must be DEBUG, INFO, WARNING or ERROR, got {section.level!r}"
        )


def is_loopback(bind: str) -> bool:
    return bind == "localhost" or ipaddress.ip_address(bind).is_loopback


def _check_web(c: Config) -> None:
    s, w = c.source, c.web
    check_bind(s, "web.bind", w.bind)
    check_port(s, "web.port", w.port, allow_zero=True)
    if w.password_hash and not _valid_password_hash(w.password_hash):
        raise ConfigError(
            s, "web.password_hash", "not a hash from `dicom-gateway hash-password` (scrypt$...)"
        )
    if w.token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", w.token_sha256):
        raise ConfigError(s, "web.token_sha256", "must be 64 lowercase hex digits (a SHA-256)")
    if (w.tls_cert is None) != (w.tls_key is None):
        raise ConfigError(s, "web.tls_key", "tls_cert and tls_key go together")
    if w.client_ca_file is not None and w.tls_cert is None:
        raise ConfigError(s, "web.client_ca_file", "needs web.tls_cert and web.tls_key (HTTPS)")
    if w.refresh_seconds < 1:
        raise ConfigError(s, "web.refresh_seconds", "must be at least 1")
    # Beyond loopback the page and its actions are reachable from the network: no
    # start without a way to tell the operator from anybody else.
    authenticated = bool(w.password_hash or w.token_sha256 or w.client_ca_file)
    if not is_loopback(w.bind) and not authenticated:
        raise ConfigError(
            s,
            "web.bind",
            f"{w.bind} is not a loopback address: set web.password_hash, web.token_sha256"
            " or web.client_ca_file first",
        )


_TENANT_RE = re.compile(r"[A-Za-z0-9.-]+")
_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]+")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?")


def _check_auth(s: str, a: AuthConfig) -> None:
    if a.method not in AUTH_METHODS:
        raise ConfigError(
            s, "upload.auth.method",
            f"must be one of {', '.join(map(repr, AUTH_METHODS))}, got {a.method!r}",
        )  # fmt: skip
    default = AuthConfig()
    for f in dataclasses.fields(AuthConfig):
        if f.name == "method" or f.name in AUTH_KEYS[a.method]:
            continue
        if getattr(a, f.name) != getattr(default, f.name):
            users = [m for m, keys in AUTH_KEYS.items() if f.name in keys]
            raise ConfigError(
                s, f"upload.auth.{f.name}",
                f"not used by method {a.method!r} (only by {', '.join(map(repr, users))})",
            )  # fmt: skip
    for scope in a.scopes:
        if not scope or any(ch.isspace() for ch in scope):
            raise ConfigError(s, "upload.auth.scopes", f"not a scope: {scope!r}")
    if a.method == "azure":
        for key in ("tenant_id", "client_id", "client_secret_file"):
            if not getattr(a, key):
                raise ConfigError(s, f"upload.auth.{key}", "required with method 'azure'")
        if not _TENANT_RE.fullmatch(a.tenant_id):
            raise ConfigError(s, "upload.auth.tenant_id", f"not a tenant ID: {a.tenant_id!r}")
        host = a.authority_host.removeprefix("https://").rstrip("/")
        if not _HOST_RE.fullmatch(host):
            # There is no plaintext mode for token endpoints either.
            raise ConfigError(
                s, "upload.auth.authority_host",
                f"must be a host name (https is implied), got {a.authority_host!r}",
            )  # fmt: skip
        if len(a.scopes) > 1:
            raise ConfigError(
                s, "upload.auth.scopes", "client credentials take one scope ('<resource>/.default')"
            )
    if a.method == "aws-sigv4":
        if not _REGION_RE.fullmatch(a.region):
            raise ConfigError(
                s,
                "upload.auth.region",
                f"required: an AWS region, e.g. 'us-east-1', got {a.region!r}",
            )
        if not re.fullmatch(r"[a-z0-9-]+", a.service):
            raise ConfigError(s, "upload.auth.service", f"not an AWS service name: {a.service!r}")
    if a.method == "bearer" and a.token_file is None:
        raise ConfigError(s, "upload.auth.token_file", "required with method 'bearer'")


_HOSTNAME_RE = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _check_remote(s: str, remotes: tuple[RemoteAE, ...]) -> None:
    seen: set[str] = set()
    for i, r in enumerate(remotes):
        key = f"dimse.remote[{i}]"
        if not _valid_ae_title(r.ae_title):
            raise ConfigError(s, f"{key}.ae_title", f"required, a valid AE title: {r.ae_title!r}")
        if r.ae_title.strip() in seen:
            raise ConfigError(
                s, f"{key}.ae_title", f"{r.ae_title.strip()!r} is listed twice in [[dimse.remote]]"
            )
        seen.add(r.ae_title.strip())
        try:
            ipaddress.ip_address(r.host)
        except ValueError:
            if len(r.host) > 253 or not _HOSTNAME_RE.fullmatch(r.host):
                raise ConfigError(
                    s, f"{key}.host", f"required, an IP address or host name: {r.host!r}"
                ) from None
        check_port(s, f"{key}.port", r.port)


def _check_commitment(s: str, c: CommitmentConfig) -> None:
    if c.verify not in COMMITMENT_VERIFY:
        raise ConfigError(
            s, "commitment.verify",
            f"must be one of {', '.join(map(repr, COMMITMENT_VERIFY))}, got {c.verify!r}",
        )  # fmt: skip
    for key in (
        "timeout_hours",
        "report_timeout_seconds",
        "report_backoff_initial_seconds",
        "report_backoff_max_seconds",
    ):
        if getattr(c, key) <= 0:
            raise ConfigError(s, f"commitment.{key}", "must be a positive number")
    if c.report_backoff_max_seconds < c.report_backoff_initial_seconds:
        raise ConfigError(
            s,
            "commitment.report_backoff_max_seconds",
            "must not be less than report_backoff_initial_seconds",
        )


def _valid_password_hash(value: str) -> bool:
    parts = value.split("$")
    return (
        len(parts) == 6
        and parts[0] == "scrypt"
        and all(p.isdigit() for p in parts[1:4])
        and all(parts[4:])
    )


def _check(c: Config) -> None:
    s = c.source
    if not _valid_ae_title(c.dimse.ae_title):
        raise ConfigError(s, "dimse.ae_title", f"not a valid AE title: {c.dimse.ae_title!r}")
    for aet in c.dimse.allowed_aets:
        if not _valid_ae_title(aet):
            raise ConfigError(s, "dimse.allowed_aets", f"not a valid AE title: {aet!r}")
    check_bind(s, "dimse.bind", c.dimse.bind)
    # Port 0 lets the OS pick (tests); the chosen port is logged at start.
    check_port(s, "dimse.port", c.dimse.port, allow_zero=True)
    if c.dimse.max_associations < 1:
        raise ConfigError(s, "dimse.max_associations", "must be at least 1")
    if not 0 <= c.dimse.receiver_processes <= 64:
        raise ConfigError(
            s, "dimse.receiver_processes", "must be 0 (one per core) or between 1 and 64"
        )
    if c.dimse.max_pdu_size != 0 and not 4096 <= c.dimse.max_pdu_size <= 2**32 - 1:
        raise ConfigError(
            s, "dimse.max_pdu_size", "must be 0 (unlimited) or between 4096 and 4294967295"
        )
    for uid in c.dimse.storage_sop_classes:
        if not is_valid_uid(uid):
            raise ConfigError(s, "dimse.storage_sop_classes", f"not a valid UID: {uid!r}")
    for key in ("acse_timeout", "dimse_timeout", "network_timeout", "drain_seconds"):
        if getattr(c.dimse, key) <= 0:
            raise ConfigError(s, f"dimse.{key}", "must be a positive number of seconds")
    _check_remote(s, c.dimse.remote)
    if c.spool.min_free_bytes < 0:
        raise ConfigError(s, "spool.min_free_bytes", "must not be negative")
    db = Path(os.path.abspath(c.database_path))
    for sub in ("tmp", "objects"):
        # The start-up sweep empties tmp/ and removes unreferenced files from objects/.
        if db.is_relative_to(os.path.abspath(c.spool.dir / sub)):
            raise ConfigError(s, "database.path", f"must not be inside spool.dir's {sub}/")
    url = c.upload.dicomweb_url
    if url and not url.startswith("https://"):
        # There is no plaintext mode: patient data only leaves the box over verified TLS.
        raise ConfigError(s, "upload.dicomweb_url", f"must be an https:// URL, got {url!r}")
    if url and (c.upload.client_cert is None) != (c.upload.client_key is None):
        raise ConfigError(s, "upload.client_key", "client_cert and client_key go together")
    if c.upload.archive not in PROFILES:
        raise ConfigError(
            s,
            "upload.archive",
            f"must be one of {', '.join(map(repr, PROFILES))}, got {c.upload.archive!r}",
        )
    if c.upload.compression not in _COMPRESSION:
        raise ConfigError(
            s,
            "upload.compression",
            f"must be one of {', '.join(map(repr, _COMPRESSION))}, got {c.upload.compression!r}",
        )
    if c.upload.compress_workers < 0:
        raise ConfigError(s, "upload.compress_workers", "must be 0 (one per core) or more")
    if c.upload.compress_when not in _COMPRESS_WHEN:
        raise ConfigError(
            s,
            "upload.compress_when",
            f"must be one of {', '.join(map(repr, _COMPRESS_WHEN))},"
            f" got {c.upload.compress_when!r}",
        )
    for key in (
        "batch_max_instances",
        "batch_max_bytes",
        "concurrent_requests",
        "min_bytes_per_second",
        "max_attempts",
    ):
        if getattr(c.upload, key) < 1:
            raise ConfigError(s, f"upload.{key}", "must be at least 1")
    for key in (
        "request_timeout_seconds",
        "compress_timeout_seconds",
        "backoff_initial_seconds",
        "backoff_max_seconds",
        "give_up_after_hours",
    ):
        if getattr(c.upload, key) <= 0:
            raise ConfigError(s, f"upload.{key}", "must be a positive number of seconds")
    if c.upload.backoff_max_seconds < c.upload.backoff_initial_seconds:
        raise ConfigError(
            s, "upload.backoff_max_seconds", "must not be less than backoff_initial_seconds"
        )
    if c.upload.max_bytes_per_second < 0:
        raise ConfigError(s, "upload.max_bytes_per_second", "must not be negative (0: unlimited)")
    for text in c.upload.windows:
        try:
            parse_window(text)
        except WindowError as exc:
            raise ConfigError(s, "upload.windows", f"{text!r}: {exc}") from None
    for aet in c.upload.priority_aets:
        if not _valid_ae_title(aet):
            raise ConfigError(s, "upload.priority_aets", f"not a valid AE title: {aet!r}")
    for key in ("keep_bytes", "keep_hours"):
        if getattr(c.retention, key) < 0:
            raise ConfigError(s, f"retention.{key}", "must not be negative")
    if c.worklist.upstream_host:
        check_port(s, "worklist.upstream_port", c.worklist.upstream_port)
        if not _valid_ae_title(c.worklist.upstream_ae):
            raise ConfigError(
                s, "worklist.upstream_ae", "required (a valid AE title) when upstream_host is set"
            )
    if c.worklist.expire_after_days < 0:
        raise ConfigError(s, "worklist.expire_after_days", "must not be negative")
    if c.worklist.refresh_seconds < 1:
        raise ConfigError(s, "worklist.refresh_seconds", "must be at least 1")
    if c.mpps.upstream_host:
        check_port(s, "mpps.upstream_port", c.mpps.upstream_port)
        if not _valid_ae_title(c.mpps.upstream_ae):
            raise ConfigError(
                s, "mpps.upstream_ae", "required (a valid AE title) when upstream_host is set"
            )
    for key in ("timeout_seconds", "backoff_initial_seconds", "backoff_max_seconds"):
        if getattr(c.mpps, key) <= 0:
            raise ConfigError(s, f"mpps.{key}", "must be a positive number of seconds")
    if c.mpps.backoff_max_seconds < c.mpps.backoff_initial_seconds:
        raise ConfigError(
            s, "mpps.backoff_max_seconds", "must not be less than backoff_initial_seconds"
        )
    _check_commitment(s, c.commitment)
    if c.study.quiet_seconds <= 0:
        raise ConfigError(s, "study.quiet_seconds", "must be a positive number of seconds")
    _check_auth(s, c.upload.auth)
    _check_web(c)
    if c.heartbeat.url and not c.heartbeat.url.startswith("https://"):
        raise ConfigError(s, "heartbeat.url", f"must be an https:// URL, got {c.heartbeat.url!r}")
    if c.heartbeat.interval_seconds <= 0:
        raise ConfigError(s, "heartbeat.interval_seconds", "must be a positive number of seconds")
    ups = c.worklist.ups_url
    if ups and not ups.startswith("https://"):
        # The same rule as the upload: worklist entries are patient data too.
        raise ConfigError(s, "worklist.ups_url", f"must be an https:// URL, got {ups!r}")
    if ups and (c.upload.client_cert is None) != (c.upload.client_key is None):
        raise ConfigError(s, "upload.client_key", "client_cert and client_key go together")
    if c.worklist.drop_scan_seconds < 1:
        raise ConfigError(s, "worklist.drop_scan_seconds", "must be at least 1")
    check_logging(s, c.logging)
