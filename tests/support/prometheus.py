"""A real Prometheus for the tests (Debian package ``prometheus``; ``make test`` installs
it), on a free loopback port with its own data directory, scraping the targets it is
given and evaluating the mixin's rules (monitoring/).

:func:`rules_for_tests` writes the copy of a rule file that such a test loads: the
same rules with every ``for:`` cut to a few seconds, so an alert of "15 minutes"
fires within a test.  The shipped files are never changed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .peers import free_port

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
MONITORING = Path(__file__).resolve().parent.parent.parent / "monitoring"


def rules_for_tests(source: Path, target: Path, for_seconds: int) -> Path:
    """*source* with every alert's ``for:`` set to *for_seconds* (the rest unchanged)."""
    doc = yaml.safe_load(source.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = f"{for_seconds}s"
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


class PrometheusProcess:
    """One Prometheus; :meth:`start` it, and :meth:`stop` it even on failure."""

    def __init__(
        self,
        workdir: Path,
        rule_files: list[Path],
        jobs: dict[str, list[str]],
        interval_seconds: int = 1,
    ) -> None:
        self.work = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config = {
            "global": {
                "scrape_interval": f"{interval_seconds}s",
                "scrape_timeout": f"{interval_seconds}s",
                "evaluation_interval": f"{interval_seconds}s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in jobs.items()
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusProcess:
        check = subprocess.run(
            [PROMTOOL, "check", "config", str(self.config_path)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.work / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params: str) -> Any:
        """``data`` of an HTTP API answer (``/api/v1/...``), which must be a success."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """The alerts named *name* that are pending or firing now (``/api/v1/alerts``:
        a resolved alert is no longer listed)."""
        return [a for a in self.api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("/api/v1/query", query=expr)["result"]
        return result
