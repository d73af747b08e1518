"""Config: embedded defaults, strict validation, one-line errors, documented keys."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.config import EXIT_CONFIG, ConfigError

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``dicom-gateway ARGS...`` as a child process (``python -m gateway``)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_defaults_match_the_documented_contract() -> None:
    c = config.load(None)
    assert c.dimse.port == 11112
    assert c.web.bind == "127.0.0.1" and c.web.port == 8080
    assert c.spool.dir == Path("var/spool")
    assert c.database.path is None
    assert c.database_path == Path("var/spool/gateway.sqlite3")
    assert c.dimse.allowed_aets == ()
    assert c.upload.compression == "j2k-lossless"
    assert c.dimse.storage_sop_classes == ()  # every storage SOP class


@pytest.mark.parametrize("codec", ["j2k-lossless", "htj2k-lossless", "htj2k-lossless-rpcl", "none"])
def test_compression_codecs(codec: str) -> None:
    assert config.from_dict({"upload": {"compression": codec}}).upload.compression == codec


def test_compress_when() -> None:
    assert config.load(None).upload.compress_when == "always"
    c = config.from_dict({"upload": {"compress_when": "if-faster"}})
    assert c.upload.compress_when == "if-faster"
    with pytest.raises(config.ConfigError, match=r"upload\.compress_when"):
        config.from_dict({"upload": {"compress_when": "sometimes"}})


def test_every_codec_of_the_compress_stage_is_configurable() -> None:
    from gateway.pipeline.transcode import CODECS

    assert set(config._COMPRESSION) == {*CODECS, "none"}


def test_database_lives_in_the_spool_unless_set() -> None:
    only_spool = config.from_dict({"spool": {"dir": "/data/spool"}})
    assert only_spool.database_path == Path("/data/spool/gateway.sqlite3")
    explicit = config.from_dict({"spool": {"dir": "/data/spool"}, "database": {"path": "/x.db"}})
    assert explicit.database_path == Path("/x.db")
    # An empty string means "not set", as for every optional path.
    assert config.from_dict({"database": {"path": ""}}).database.path is None


@pytest.mark.parametrize("sub", ["tmp", "objects"])
def test_database_inside_the_swept_spool_dirs_is_refused(sub: str) -> None:
    raw = {"spool": {"dir": "/data/spool"}, "database": {"path": f"/data/spool/{sub}/q.db"}}
    with pytest.raises(ConfigError, match=f"database.path: must not be inside spool.dir's {sub}/"):
        config.from_dict(raw)


def test_public_keys_exist() -> None:
    keys = set(config.documented_keys())
    required = {
        "dimse.ae_title", "dimse.bind", "dimse.port", "dimse.allowed_aets",
        "dimse.max_associations", "spool.dir", "spool.min_free_bytes",
        "upload.dicomweb_url", "upload.ca_file", "upload.client_cert", "upload.client_key",
        "upload.compression", "worklist.upstream_host", "worklist.upstream_port",
        "worklist.upstream_ae", "worklist.refresh_seconds", "web.bind", "web.port",
    }  # fmt: skip
    assert required <= keys


def test_every_key_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    undocumented = [k for k in config.documented_keys() if f"`{k}`" not in readme]
    assert not undocumented, f"keys missing from README.md's config table: {undocumented}"


def test_every_cli_command_is_documented_in_the_readme() -> None:
    from gateway.cli import build_parser

    readme = (REPO / "README.md").read_text()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"dicom-gateway {name}" in readme, f"`dicom-gateway {name}` not in README"


def test_full_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        """
[dimse]
ae_title = "EDGE1"
port = 104
allowed_aets = ["CT1", "MR_2"]
max_associations = 4
[spool]
dir = "/srv/spool"
min_free_bytes = 1000
[upload]
dicomweb_url = "https://archive.example/dicomweb"
ca_file = "/etc/gw/ca.pem"
client_cert = "/etc/gw/box.pem"
client_key = "/etc/gw/box.key"
compression = "none"
[worklist]
upstream_host = "ris.local"
upstream_port = 4242
upstream_ae = "RIS"
refresh_seconds = 60
[web]
bind = "0.0.0.0"
port = 9000
token_sha256 = "499dad94eb79868b9cb5331ea2dd3f395657702182d25a9c58d99d4f4a218b0f"
[heartbeat]
url = "https://monitor.example/beat"
interval_seconds = 30
"""
    )
    c = config.load(path)
    assert c.dimse.allowed_aets == ("CT1", "MR_2")
    assert c.upload.client_key == Path("/etc/gw/box.key")
    assert c.worklist.upstream_port == 4242
    assert c.source == str(path)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[dimse]\nport = 'abc'\n", "dimse.port", "expected an integer"),
        ("[dimse]\nport = true\n", "dimse.port", "expected an integer"),
        ("[dimse]\nport = 70000\n", "dimse.port", "between"),
        ("[dimse]\nprot = 104\n", "dimse.prot", "unknown key"),
        ("[dimze]\nport = 104\n", "dimze", "unknown section"),
        ("dimse = 3\n", "dimse", "must be a table"),
        ("[dimse]\nae_title = 'A_TITLE_THAT_IS_TOO_LONG'\n", "dimse.ae_title", "AE title"),
        ("[dimse]\nallowed_aets = 'CT1'\n", "dimse.allowed_aets", "list of strings"),
        ("[dimse]\nbind = 'my host'\n", "dimse.bind", "IP address"),
        (
            "[dimse]\nstorage_sop_classes = ['1.2.840.10008.5.1.4.1.1.2', '1.02.3']\n",
            "dimse.storage_sop_classes",
            "not a valid UID",
        ),
        ("[dimse]\nstorage_sop_classes = '1.2.3'\n", "dimse.storage_sop_classes", "list of"),
        ("[spool]\nmin_free_bytes = -1\n", "spool.min_free_bytes", "negative"),
        ("[upload]\ncompression = 'jpeg'\n", "upload.compression", "htj2k-lossless"),
        ("[upload]\ndicomweb_url = 'http://x'\n", "upload.dicomweb_url", "https://"),
        ("[upload]\nmax_attempts = 0\n", "upload.max_attempts", "at least 1"),
        ("[upload]\ngive_up_after_hours = 0\n", "upload.give_up_after_hours", "positive"),
        ("[upload]\nmin_bytes_per_second = 0\n", "upload.min_bytes_per_second", "at least 1"),
        (
            "[upload]\ncompress_timeout_seconds = -1\n",
            "upload.compress_timeout_seconds",
            "positive",
        ),
        ("[worklist]\nupstream_host = 'ris'\n", "worklist.upstream_ae", "required"),
        ("[logging]\nlevel = 'LOUD'\n", "logging.level", "DEBUG"),
        ("[web]\nbind = '0.0.0.0'\n", "web.bind", "not a loopback address"),
        ("[web]\nbind = '192.168.1.5'\n", "web.bind", "web.password_hash"),
        ("[web]\npassword_hash = 'secret'\n", "web.password_hash", "hash-password"),
        ("[web]\ntoken_sha256 = 'abc'\n", "web.token_sha256", "64 lowercase hex"),
        ("[web]\nclient_ca_file = '/ca.pem'\n", "web.client_ca_file", "tls_cert"),
        ("[web]\ntls_cert = '/c.pem'\n", "web.tls_key", "go together"),
        ("[heartbeat]\nurl = 'http://x'\n", "heartbeat.url", "https://"),
        ("[heartbeat]\ninterval_seconds = 0\n", "heartbeat.interval_seconds", "positive"),
        ("[dimse]\nremote = 'CT1'\n", "dimse.remote", "array of tables"),
        ("[[dimse.remote]]\nhost = 'ct1'\n", "dimse.remote[0].ae_title", "required"),
        (
            "[[dimse.remote]]\nae_title = 'CT1'\nhost = 'ct1'\n[[dimse.remote]]\n"
            "ae_title = 'CT2'\nhost = 'ct 2'\n",
            "dimse.remote[1].host",
            "IP address or host name",
        ),
        ("[[dimse.remote]]\nae_title = 'CT1'\n", "dimse.remote[0].host", "required"),
        (
            "[[dimse.remote]]\nae_title = 'CT1'\nhost = 'ct1'\nport = 0\n",
            "dimse.remote[0].port",
            "between 1 and 65535",
        ),
        (
            "[[dimse.remote]]\nae_title = 'CT1'\nhost = 'ct1'\ntls = true\n",
            "dimse.remote[0].tls",
            "unknown key",
        ),
        (
            "[[dimse.remote]]\nae_title = 'CT1'\nhost = 'a'\n"
            "[[dimse.remote]]\nae_title = 'CT1 '\nhost = 'b'\n",
            "dimse.remote[1].ae_title",
            "listed twice",
        ),
        ("[commitment]\nverify = 'wado'\n", "commitment.verify", "'qido'"),
        ("[commitment]\ntimeout_hours = 0\n", "commitment.timeout_hours", "positive"),
        (
            "[commitment]\nreport_backoff_max_seconds = 1\n",
            "commitment.report_backoff_max_seconds",
            "not be less than",
        ),
        ("[study]\nquiet_seconds = -5\n", "study.quiet_seconds", "positive"),
        ("[dimse\nport = 1\n", "-", "not valid TOML"),
        ("[upload]\nauth = 'google'\n", "upload.auth", "must be a table"),
        ("[upload.auth]\nmethod = 'oauth'\n", "upload.auth.method", "'aws-sigv4'"),
        ("[upload.auth]\nmethod = 'google'\nkey = 'x'\n", "upload.auth.key", "unknown key"),
        ("[upload.auth]\nmethod = 'bearer'\n", "upload.auth.token_file", "required"),
        ("[upload.auth]\nmethod = 'azure'\n", "upload.auth.tenant_id", "required"),
        (
            "[upload.auth]\nmethod = 'google'\ntoken_file = '/t'\n",
            "upload.auth.token_file",
            "not used by method 'google' (only by 'bearer')",
        ),
        (
            "[upload.auth]\ntoken_file = '/t'\n",
            "upload.auth.token_file",
            "not used by method 'mtls'",
        ),
        ("[upload.auth]\nmethod = 'aws-sigv4'\n", "upload.auth.region", "AWS region"),
        (
            "[upload.auth]\nmethod = 'aws-sigv4'\nregion = 'us-east-1'\n"
            "service = 'Medical Imaging'\n",
            "upload.auth.service",
            "not an AWS service",
        ),
        (
            "[upload.auth]\nmethod = 'azure'\ntenant_id = 't'\nclient_id = 'c'\n"
            "client_secret_file = '/s'\nauthority_host = 'http://login.example'\n",
            "upload.auth.authority_host",
            "https is implied",
        ),
        (
            "[upload.auth]\nmethod = 'azure'\ntenant_id = 't'\nclient_id = 'c'\n"
            "client_secret_file = '/s'\nscopes = ['a/.default', 'b/.default']\n",
            "upload.auth.scopes",
            "one scope",
        ),
        (
            "[upload.auth]\nmethod = 'google'\nscopes = ['a b']\n",
            "upload.auth.scopes",
            "not a scope",
        ),
    ],
)
def test_bad_values_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_upload_auth_is_a_sub_table(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        "[upload]\ndicomweb_url = 'https://archive.example/dicomweb'\n"
        "[upload.auth]\nmethod = 'azure'\ntenant_id = 'contoso.onmicrosoft.com'\n"
        "client_id = '6731de76-14a6-49ae-97bc-6eba6914391e'\n"
        "client_secret_file = '/etc/dicom-gateway/secrets/entra'\n"
    )
    a = config.load(path).upload.auth
    assert a.method == "azure" and a.client_secret_file == Path("/etc/dicom-gateway/secrets/entra")
    assert a.authority_host == "login.microsoftonline.com" and a.scopes == ()
    assert config.load(None).upload.auth.method == "mtls"
    assert "upload.auth.method" in config.documented_keys()
    assert "upload.auth" not in config.documented_keys()


def test_remote_aes_are_an_array_of_tables(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        "[[dimse.remote]]\nae_title = 'CT_ROOM1'\nhost = 'ct1.clinic.local'\nport = 104\n"
        "[[dimse.remote]]\nae_title = 'US2'\nhost = '10.1.2.3'\nport = 11112\n"
        "[commitment]\nverify = 'qido'\ntimeout_hours = 2\n[study]\nquiet_seconds = 60\n"
    )
    c = config.load(path)
    assert c.dimse.remote == (
        config.RemoteAE("CT_ROOM1", "ct1.clinic.local", 104),
        config.RemoteAE("US2", "10.1.2.3", 11112),
    )
    # Trailing spaces of an AE title are not significant (PS3.5 6.2).
    assert c.dimse.remote_ae("US2  ") == config.RemoteAE("US2", "10.1.2.3", 11112)
    assert c.dimse.remote_ae("MR1") is None
    assert c.commitment.verify == "qido" and c.commitment.timeout_hours == 2.0
    assert c.study.quiet_seconds == 60.0
    defaults = config.load(None)
    assert defaults.dimse.remote == () and defaults.commitment.verify == "stow"
    keys = config.documented_keys()
    assert {"dimse.remote.ae_title", "dimse.remote.host", "dimse.remote.port"} <= set(keys)
    assert "dimse.remote" not in keys


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[dimse]\nport = 11113\n")
    ok = _cli("check-config", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[dimse]\nport = 'eleven'\n")
    result = _cli("check-config", str(bad))
    assert result.returncode == EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0] and "dimse.port" in lines[0]

    missing = _cli("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == EXIT_CONFIG
    assert "file not found" in missing.stderr


def test_run_refuses_a_broken_config_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool]\ndirectory = '/tmp/x'\n")
    result = _cli("run", "--config", str(bad))
    assert result.returncode == EXIT_CONFIG
    assert re.fullmatch(
        rf"dicom-gateway: config error: {re.escape(str(bad))}: spool\.directory: unknown key.*\n",
        result.stderr,
    ), result.stderr


def test_version() -> None:
    from gateway import __version__

    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"dicom-gateway {__version__}"
