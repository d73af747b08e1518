"""The role's meta/argument_specs.yml refuses bad settings before any task runs.

Runs ansible-playbook from .venv-ansible (made by `make lint`/`make test`) against
localhost in check mode, without gathering facts: validation is the role's first
step, and should it let something through, the next tasks are only simulated.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / ".venv-ansible" / "bin" / "ansible-playbook"


def run_play(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    if not PLAYBOOK.exists():
        pytest.fail("no .venv-ansible: run `make .venv-ansible/.installed`")
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "gateways:\n  hosts:\n    box:\n"
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
        [str(PLAYBOOK), "--check", "-i", str(inventory), "site.yml", *extra],
        cwd=ROOT / "ansible",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


WHEEL = {"dicom_gateway_wheel": "/nonexistent/dicom_gateway-0-py3-none-any.whl"}


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({}, "dicom_gateway_wheel"),  # required
        ({**WHEEL, "dicom_gateway_dimse_port": "http"}, "dicom_gateway_dimse_port"),
        ({**WHEEL, "dicom_gateway_compression": "zip"}, "dicom_gateway_compression"),
        ({**WHEEL, "dicom_gateway_firewall": "perhaps"}, "dicom_gateway_firewall"),
    ],
)
def test_bad_settings_are_refused_before_any_task(
    tmp_path: Path, settings: dict[str, str], complaint: str
) -> None:
    args = [arg for key, value in settings.items() for arg in ("-e", f"{key}={value}")]
    proc = run_play(tmp_path, *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Validating arguments against arg spec" in output, output[-3000:]
    assert complaint in output, output[-3000:]
    assert "Install the OS packages" not in output  # stopped before the first real task
