"""The role's meta/argument_specs.yml refuses bad settings before any task runs, its
[upload.auth] part (tasks/auth.yml and the gateway.toml template) writes what the
gateway accepts for each cloud, and its [[dimse.remote]], [commitment] and [study]
variables reach gateway.toml (none of the three at the defaults).

Runs ansible-playbook from .venv-ansible (made by `make lint`/`make test`) against
localhost without gathering facts: in check mode for the refusals (validation is the
role's first step, and should it let something through, the next tasks are only
simulated); for real for the secrets and gateway.toml, into a temporary directory,
owned by the user running the tests instead of the service user.
"""

from __future__ import annotations

import dataclasses
import getpass
import grp
import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.auth import check_secret_files, read_secret
from gateway.config import (
    AUTH_METHODS,
    COMMITMENT_VERIFY,
    AuthConfig,
    CommitmentConfig,
    RemoteAE,
    StudyConfig,
    load,
)
from gateway.pipeline.archives import PROFILES

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / ".venv-ansible" / "bin" / "ansible-playbook"
ROLE = ROOT / "ansible" / "roles" / "dicom_gateway"


def run_play(
    tmp_path: Path,
    *extra: str,
    playbook: str = "site.yml",
    check: bool = True,
    group: str = "gateways",
) -> subprocess.CompletedProcess[str]:
    if not PLAYBOOK.exists():
        pytest.fail("no .venv-ansible: run `make .venv-ansible/.installed`")
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        f"{group}:\n  hosts:\n    box:\n"
        "      ansible_connection: local\n"
        f"      ansible_python_interpreter: {PLAYBOOK.parent / 'python'}\n"
    )
    env = dict(
        os.environ,
        PATH=f"{PLAYBOOK.parent}:{os.environ['PATH']}",
        ANSIBLE_CONFIG=str(ROOT / "ansible" / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_GATHERING="explicit",
    )
    return subprocess.run(
        [str(PLAYBOOK), *(["--check"] if check else []), "-i", str(inventory), playbook, *extra],
        cwd=ROOT / "ansible",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


WHEEL = {"dicom_gateway_wheel": "/nonexistent/dicom_gateway-0-py3-none-any.whl"}


def _remote(**entry: Any) -> dict[str, Any]:
    return {**WHEEL, "dicom_gateway_remote_aes": [entry]}


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({}, "dicom_gateway_wheel"),  # required
        ({**WHEEL, "dicom_gateway_dimse_port": "http"}, "dicom_gateway_dimse_port"),
        ({**WHEEL, "dicom_gateway_compression": "zip"}, "dicom_gateway_compression"),
        ({**WHEEL, "dicom_gateway_firewall": "perhaps"}, "dicom_gateway_firewall"),
        (
            {**WHEEL, "dicom_gateway_auth_method": "oauth"},
            "dicom_gateway_auth_method must be one of: mtls, google, azure, aws-sigv4, bearer",
        ),
        (
            {**WHEEL, "dicom_gateway_archive_profile": "pacs"},
            "dicom_gateway_archive_profile must be one of: generic, orthanc, dcm4chee",
        ),
        # A secret given twice (its text and a path): the role's own check, still before
        # anything is installed, and without the secret in what it says.
        (
            {
                **WHEEL,
                "dicom_gateway_auth_method": "azure",
                "dicom_gateway_auth_client_secret": "entra-secret-value-not-to-show",
                "dicom_gateway_auth_client_secret_file": "/etc/dicom-gateway/secrets/entra",
            },
            "give each upload auth secret as text or as a path, not both",
        ),
        (
            {**WHEEL, "dicom_gateway_auth_method": "aws-sigv4"},
            "aws-sigv4 needs dicom_gateway_auth_region",
        ),
        # [[dimse.remote]], [commitment], [study]: the argument spec's types ...
        (
            _remote(ae_title="CT_ROOM1", port=104),
            "missing required arguments: host found in dicom_gateway_remote_aes",
        ),
        (
            _remote(ae_title="CT", host="ct", port="dicom"),
            "argument 'port' is of type str found in 'dicom_gateway_remote_aes'",
        ),
        (
            {**WHEEL, "dicom_gateway_remote_aes": "CT_ROOM1@10.20.0.11:104"},
            "dicom_gateway_remote_aes",
        ),
        (
            {**WHEEL, "dicom_gateway_commitment_verify": "md5"},
            "dicom_gateway_commitment_verify must be one of: stow, qido",
        ),
        (
            {**WHEEL, "dicom_gateway_commitment_timeout_hours": "a day"},
            "argument 'dicom_gateway_commitment_timeout_hours' is of type str",
        ),
        (
            {**WHEEL, "dicom_gateway_study_quiet_seconds": "soon"},
            "argument 'dicom_gateway_study_quiet_seconds' is of type str",
        ),
        # ... and the role's own checks of what a type cannot say.
        (
            _remote(ae_title="CT_ROOM1_EAST_WING", host="ct"),
            "reject('in', range(1, 17))",
        ),
        (
            {
                **WHEEL,
                "dicom_gateway_remote_aes": [
                    {"ae_title": "CT_ROOM1", "host": "ct1"},
                    {"ae_title": "CT_ROOM1 ", "host": "ct2"},
                ],
            },
            "unique",
        ),
        (
            _remote(ae_title="CT", host="ct", port=70000),
            "reject('in', range(1, 65536))",
        ),
        (
            {**WHEEL, "dicom_gateway_commitment_timeout_hours": 0},
            "dicom_gateway_commitment_timeout_hours | float > 0",
        ),
        (
            {**WHEEL, "dicom_gateway_study_quiet_seconds": -5},
            "dicom_gateway_study_quiet_seconds | float > 0",
        ),
    ],
)
def test_bad_settings_are_refused_before_any_task(
    tmp_path: Path, settings: dict[str, Any], complaint: str
) -> None:
    proc = run_play(tmp_path, "-e", json.dumps(settings))  # JSON keeps lists and numbers
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Validating arguments against arg spec" in output, output[-3000:]
    assert complaint in output, output[-3000:]
    assert "Install the OS packages" not in output  # stopped before the first real task
    assert "not-to-show" not in output


# -- [upload.auth] -------------------------------------------------------------------------

# Made-up secrets: each must end up in its file, and nowhere in Ansible's output.
SERVICE_ACCOUNT_KEY = json.dumps(
    {
        "type": "service_account",
        "client_email": "gw@clinic-7.iam.gserviceaccount.com",
        "private_key": "-----BEGIN PRIVATE KEY-----\\nsa-key-3f9c1d\\n-----END PRIVATE KEY-----\\n",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
)
CLIENT_SECRET = "entra-secret-8b2e47"
AWS_CREDENTIALS = (
    "[default]\naws_access_key_id = AKIAEXAMPLE0CLINIC7\n"
    "aws_secret_access_key = aws-secret-5d0a66\n"
)
BEARER_TOKEN = "bearer-token-c41f9e"
SECRET_MARKERS = ("sa-key-3f9c1d", CLIENT_SECRET, "aws-secret-5d0a66", BEARER_TOKEN)

AZURE_CLIENT_ID = "6731de76-14a6-49ae-97bc-6eba6914391e"
AWS_URL = "https://dicom-medical-imaging.eu-central-1.amazonaws.com/datastore/0123456789abcdef0123456789abcdef"

# Settings of a site per cloud (the role's variables), and what the gateway must read.
SITES: dict[str, dict[str, Any]] = {
    "default": {},
    "google": {
        "dicom_gateway_archive_url": "https://healthcare.googleapis.com/v1/projects/p"
        "/locations/europe-west4/datasets/d/dicomStores/s/dicomWeb",
        "dicom_gateway_archive_profile": "google",
        "dicom_gateway_auth_method": "google",
        "dicom_gateway_auth_service_account_key": SERVICE_ACCOUNT_KEY,
        "dicom_gateway_auth_ca_file": "/etc/ssl/certs/site-proxy.pem",
    },
    "azure": {
        "dicom_gateway_archive_url": "https://ws-dicom.dicom.azurehealthcareapis.com/v2",
        "dicom_gateway_archive_profile": "azure",
        "dicom_gateway_auth_method": "azure",
        "dicom_gateway_auth_tenant_id": "contoso.onmicrosoft.com",
        "dicom_gateway_auth_client_id": AZURE_CLIENT_ID,
        "dicom_gateway_auth_client_secret": CLIENT_SECRET,
        "dicom_gateway_auth_authority_host": "login.microsoftonline.us",
    },
    "aws": {
        "dicom_gateway_archive_url": AWS_URL,
        "dicom_gateway_archive_profile": "aws",
        "dicom_gateway_auth_method": "aws-sigv4",
        "dicom_gateway_auth_region": "eu-central-1",
        "dicom_gateway_auth_aws_credentials": AWS_CREDENTIALS,
    },
    # A token on top of the client certificate (a dcm4chee behind Keycloak).
    "bearer": {
        "dicom_gateway_archive_url": "https://pacs.example.org/dcm4chee-arc/aets/DCM4CHEE/rs",
        "dicom_gateway_archive_profile": "dcm4chee",
        "dicom_gateway_client_certificate": "(certificate)",
        "dicom_gateway_client_key": "(key)",
        "dicom_gateway_auth_method": "bearer",
        "dicom_gateway_auth_bearer_token": BEARER_TOKEN,
    },
    # mtls with an aws-sigv4 key set: written out, so that check-config refuses it
    # instead of the role dropping it unseen.
    "stray": {"dicom_gateway_auth_region": "eu-central-1"},
    # A token file another agent keeps fresh: only its path.
    "agent": {
        "dicom_gateway_archive_url": "https://archive.example.org/dicom-web",
        "dicom_gateway_auth_method": "bearer",
        "dicom_gateway_auth_token_file": "/run/token-agent/token",
    },
}


def expected_auth(name: str, secrets: Path) -> dict[str, Any] | None:
    return {
        "default": None,
        "google": {
            "method": "google",
            "ca_file": "/etc/ssl/certs/site-proxy.pem",
            "key_file": f"{secrets}/service-account.json",
        },
        "azure": {
            "method": "azure",
            "tenant_id": "contoso.onmicrosoft.com",
            "client_id": AZURE_CLIENT_ID,
            "client_secret_file": f"{secrets}/client-secret",
            "authority_host": "login.microsoftonline.us",
        },
        "aws": {
            "method": "aws-sigv4",
            "region": "eu-central-1",
            "credentials_file": f"{secrets}/aws-credentials",
        },
        "bearer": {"method": "bearer", "token_file": f"{secrets}/bearer-token"},
        "stray": {"method": "mtls", "region": "eu-central-1"},
        "agent": {"method": "bearer", "token_file": "/run/token-agent/token"},
    }[name]


SECRET_FILES = {  # site: (upload.auth key, the text the role must have written)
    "google": ("key_file", SERVICE_ACCOUNT_KEY),
    "azure": ("client_secret_file", CLIENT_SECRET),
    "aws": ("credentials_file", AWS_CREDENTIALS),
    "bearer": ("token_file", BEARER_TOKEN),
}

# The [upload] table as the role wrote it before [upload.auth] existed.
DEFAULT_UPLOAD = (
    '[upload]\ndicomweb_url = ""\nca_file = ""\nclient_cert = ""\nclient_key = ""\n'
    'compression = "j2k-lossless"\n\n[worklist]\n'
)


def test_each_cloud_gets_secret_files_and_an_auth_table_check_config_accepts(
    tmp_path: Path,
) -> None:
    """One play per site: the role's tasks/auth.yml (the secrets given as text) and
    its gateway.toml template, then `dicom-gateway check-config` and the gateway's
    own secret-file checks on the result."""
    user = getpass.getuser()
    group = grp.getgrgid(os.getgid()).gr_name
    plays = []
    for name, settings in SITES.items():
        (tmp_path / name / "secrets").mkdir(parents=True, mode=0o750)
        plays.append(
            {
                "name": f"Site {name}",
                "hosts": "gateways",
                "gather_facts": False,
                "vars": {
                    **settings,
                    "dicom_gateway_secrets_dir": str(tmp_path / name / "secrets"),
                    "dicom_gateway_start": False,
                },
                "tasks": [
                    {
                        "name": "The role's upload.auth secrets",
                        "ansible.builtin.include_role": {
                            "name": "dicom_gateway",
                            "tasks_from": "auth.yml",
                            "public": True,
                        },
                        # The service user of a box is not on this machine.
                        "vars": {"dicom_gateway_user": user, "dicom_gateway_group": group},
                    },
                    {
                        "name": "The role's gateway.toml",
                        "ansible.builtin.template": {
                            "src": str(ROLE / "templates" / "gateway.toml.j2"),
                            "dest": str(tmp_path / name / "gateway.toml"),
                            "mode": "0640",
                        },
                    },
                ],
            }
        )
    playbook = tmp_path / "auth.yml"
    playbook.write_text(json.dumps(plays, indent=1))  # JSON is YAML
    proc = run_play(tmp_path, "-v", playbook=str(playbook), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # no_log: the loop over the secrets shows no item, even with -v.
    for marker in SECRET_MARKERS:
        assert marker not in output
    assert "censored" in output

    for name in SITES:
        toml_path = tmp_path / name / "gateway.toml"
        text = toml_path.read_text()
        upload = tomllib.loads(text)["upload"]
        secrets = tmp_path / name / "secrets"
        assert upload.get("auth") == expected_auth(name, secrets), text
        profile = SITES[name].get("dicom_gateway_archive_profile")
        assert upload.get("archive") == profile, text
        check = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", str(toml_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if name == "stray":
            assert check.returncode == 78, check.stdout + check.stderr
            assert "upload.auth.region" in check.stderr and "not used by method 'mtls'" in (
                check.stderr
            )
            continue
        assert check.returncode == 0, check.stdout + check.stderr
        config = load(toml_path)
        check_secret_files(config)  # refuses a file others may read or write
        if name in SECRET_FILES:
            key, secret = SECRET_FILES[name]
            path = getattr(config.upload.auth, key)
            assert path == secrets / path.name and path.parent == secrets
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
            assert read_secret(path, f"upload.auth.{key}").decode() == secret
        else:
            assert list(secrets.iterdir()) == []

    # The default adds nothing: the [upload] table stays as it was.
    default = (tmp_path / "default" / "gateway.toml").read_text()
    assert "[upload.auth]" not in default and "archive" not in default.split("[upload]")[1]
    assert DEFAULT_UPLOAD in default


def _yaml(path: Path) -> Any:
    """A YAML file as JSON, read with .venv-ansible's PyYAML (not in the test venv)."""
    proc = subprocess.run(
        [
            str(PLAYBOOK.parent / "python"),
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_role_variables_cover_every_upload_auth_key_with_the_gateways_defaults() -> None:
    if not PLAYBOOK.exists():
        pytest.fail("no .venv-ansible: run `make .venv-ansible/.installed`")
    options = _yaml(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    defaults = _yaml(ROLE / "defaults" / "main.yml")
    table = _yaml(ROLE / "vars" / "main.yml")["dicom_gateway_auth_table"]
    assert options["dicom_gateway_auth_method"]["choices"] == list(AUTH_METHODS)
    assert options["dicom_gateway_archive_profile"]["choices"] == list(PROFILES)
    assert defaults["dicom_gateway_archive_profile"] == "generic"
    gateway_default = AuthConfig()
    fields = [f.name for f in dataclasses.fields(AuthConfig)]
    assert list(table) == [f for f in fields if f != "method"]  # the template's order
    for field in fields:
        var = f"dicom_gateway_auth_{field}"
        expected = getattr(gateway_default, field)
        expected = "" if expected is None else list(expected) if expected == () else expected
        assert defaults[var] == expected, var
        assert options[var].get("default") == expected, var
        assert options[var]["description"], var
    # The secrets' text variables are hidden from Ansible's output.
    for var in (
        "service_account_key",
        "client_secret",
        "aws_credentials",
        "bearer_token",
    ):
        assert options[f"dicom_gateway_auth_{var}"]["no_log"] is True
        assert defaults[f"dicom_gateway_auth_{var}"] == ""


# -- [[dimse.remote]], [commitment], [study] ----------------------------------------------


def render_gateway_toml(tmp_path: Path, sites: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """The role's gateway.toml template, once per site, with the role's defaults and
    vars under each site's settings (as the role would have them)."""
    plays = [
        {
            "name": f"Site {name}",
            "hosts": "gateways",
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
            "tasks": [
                {
                    "name": "The role's gateway.toml",
                    "vars": settings,  # above the role's files
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "gateway.toml.j2"),
                        "dest": str(tmp_path / f"{name}.toml"),
                        "mode": "0640",
                    },
                }
            ],
        }
        for name, settings in sites.items()
    ]
    playbook = tmp_path / "render.yml"
    playbook.write_text(json.dumps(plays, indent=1))  # JSON is YAML
    proc = run_play(tmp_path, playbook=str(playbook), check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {name: tmp_path / f"{name}.toml" for name in sites}


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_remote_aes_commitment_and_study_settings_reach_gateway_toml(tmp_path: Path) -> None:
    """Set, the role's variables become [[dimse.remote]], [commitment] and [study] as
    `dicom-gateway check-config` and the gateway's loader read them; at the gateway's
    defaults (left out, or given explicitly) gateway.toml gets none of the three."""
    sites: dict[str, dict[str, Any]] = {
        "default": {},
        "explicit": {
            "dicom_gateway_remote_aes": [],
            "dicom_gateway_commitment_verify": "stow",
            "dicom_gateway_commitment_timeout_hours": 24,
            "dicom_gateway_study_quiet_seconds": 300,
        },
        "clinic": {
            "dicom_gateway_allowed_aets": ["CT_ROOM1", "US_ROOM2"],
            "dicom_gateway_remote_aes": [
                {"ae_title": "CT_ROOM1", "host": "10.20.0.11"},  # port: 104
                {"ae_title": "US_ROOM2", "host": "us2.clinic.local", "port": 11112},
            ],
            "dicom_gateway_commitment_verify": "qido",
            "dicom_gateway_commitment_timeout_hours": 2.5,
            "dicom_gateway_study_quiet_seconds": 90,
        },
        # Only one of the settings away from its default: its table alone.
        "slow-modality": {"dicom_gateway_commitment_timeout_hours": 48},
        # A value the role's checks let through and the gateway refuses (a host name
        # with a space): check-config, the template task's validate on a box, names
        # the key.
        "typo": {"dicom_gateway_remote_aes": [{"ae_title": "MR1", "host": "mr 1.clinic"}]},
    }
    paths = render_gateway_toml(tmp_path, sites)
    for name, path in paths.items():
        check = check_config(path)
        if name == "typo":
            assert check.returncode == 78, check.stdout + check.stderr
            assert "dimse.remote[0].host" in check.stderr, check.stderr
            continue
        assert check.returncode == 0, (name, check.stdout + check.stderr, path.read_text())

    for name in ("default", "explicit"):
        text = paths[name].read_text()
        for table in ("[[dimse.remote]]", "[commitment]", "[study]"):
            assert table not in text, (name, text)
    # The rest of the file is what the role wrote before these variables existed.
    assert paths["explicit"].read_text() == paths["default"].read_text()
    assert DEFAULT_UPLOAD in paths["default"].read_text()

    clinic = load(paths["clinic"])
    assert clinic.dimse.remote == (
        RemoteAE(ae_title="CT_ROOM1", host="10.20.0.11", port=104),
        RemoteAE(ae_title="US_ROOM2", host="us2.clinic.local", port=11112),
    )
    assert clinic.dimse.allowed_aets == ("CT_ROOM1", "US_ROOM2")  # [dimse] still one table
    assert clinic.commitment == CommitmentConfig(verify="qido", timeout_hours=2.5)
    assert clinic.study == StudyConfig(quiet_seconds=90.0)

    slow = paths["slow-modality"].read_text()
    assert "[study]" not in slow and "[[dimse.remote]]" not in slow
    assert tomllib.loads(slow)["commitment"] == {"verify": "stow", "timeout_hours": 48.0}


def test_role_commitment_defaults_are_the_gateways() -> None:
    if not PLAYBOOK.exists():
        pytest.fail("no .venv-ansible: run `make .venv-ansible/.installed`")
    options = _yaml(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    defaults = _yaml(ROLE / "defaults" / "main.yml")
    commitment, study, remote = CommitmentConfig(), StudyConfig(), RemoteAE()
    pairs = {
        "dicom_gateway_remote_aes": [],
        "dicom_gateway_commitment_verify": commitment.verify,
        "dicom_gateway_commitment_timeout_hours": commitment.timeout_hours,
        "dicom_gateway_study_quiet_seconds": study.quiet_seconds,
    }
    for var, value in pairs.items():
        assert defaults[var] == value, var
        assert options[var]["default"] == value, var
        assert options[var]["description"], var
    assert options["dicom_gateway_commitment_verify"]["choices"] == list(COMMITMENT_VERIFY)
    entry = options["dicom_gateway_remote_aes"]["options"]
    assert list(entry) == [f.name for f in dataclasses.fields(RemoteAE)]
    assert entry["port"]["default"] == remote.port
    assert entry["ae_title"]["required"] and entry["host"]["required"]
