"""The status page in a real browser: Debian's chromium, driven by Playwright.

The gateway receives a study from storescu while the archive (nginx + Orthanc, mutual
TLS) is down; the page must show the pending count rising and the archive
unreachable; pause, resume and retry are clicked on the page; once the archive is
back and the queue drains the page shows zero pending.  Screenshots are kept in
``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.peers import storescu
from .support.web_client import WebClient, web_port
from .test_upload import _upload_config, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_MS = 30_000


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} missing: install Debian's chromium (make test does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    assert path.stat().st_size > 10_000
    return path


def _study(tmp_path: Path, count: int, study: str) -> list[Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = tmp_path / f"{study[-6:]}-{i}.dcm"
        corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path, study=study)
        paths.append(path)
    return paths


def test_page_follows_an_outage_and_its_recovery(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, browser: Browser, tmp_path: Path
) -> None:
    archive_lab.stop_nginx()
    gw = gateway_factory(
        upload=_upload_config(archive_lab), web={"refresh_seconds": 1}, study={"quiet_seconds": 2}
    )
    api = WebClient(web_port(gw))
    page = browser.new_page(viewport={"width": 412, "height": 915})  # a phone
    page.goto(f"http://127.0.0.1:{api.port}/")
    expect(page.locator("#q-pending")).to_have_text("0")
    expect(page.locator("#health")).to_contain_text("OK")

    study = pydicom.uid.generate_uid()
    first = storescu(gw.port, _study(tmp_path / "a", 2, study), calling="CT_ROOM1")
    assert first.acknowledged == 2, first.output
    # The page reloads itself (web.refresh_seconds): no reload from the test.
    expect(page.locator("#q-pending")).to_have_text("2", timeout=WAIT_MS)
    expect(page.locator("#archive-state")).to_have_text("unreachable", timeout=WAIT_MS)
    second = storescu(gw.port, _study(tmp_path / "b", 3, study), calling="CT_ROOM1")
    assert second.acknowledged == 3, second.output
    expect(page.locator("#q-pending")).to_have_text("5", timeout=WAIT_MS)
    expect(page.locator("#health")).to_contain_text("DEGRADED")
    expect(page.locator("#health")).to_contain_text("archive unreachable")
    expect(page.locator("#modalities")).to_contain_text("CT_ROOM1")
    expect(page.locator("#errors")).to_contain_text("cannot connect to the archive")
    _screenshot(page, tmp_path, "status-archive-down.png")

    # Pause from the page; with the archive back nothing goes while paused.
    page.get_by_role("button", name="Pause uploads").click()
    expect(page.locator("#uploads-state")).to_have_text("paused", timeout=WAIT_MS)
    assert api.status()["uploads"]["paused"] is True
    archive_lab.start_nginx()
    expect(page.locator("#q-pending")).to_have_text("5")
    page.get_by_role("button", name="Resume uploads").click()
    expect(page.locator("#uploads-state")).to_have_text("running", timeout=WAIT_MS)

    expect(page.locator("#q-pending")).to_have_text("0", timeout=WAIT_MS * 2)
    expect(page.locator("#archive-state")).to_have_text("reachable", timeout=WAIT_MS)
    expect(page.locator("#q-done-today")).to_have_text("5")
    # The study sent during the outage: every instance confirmed by the archive.
    stage = page.locator(f'#studies tr[data-study="{study}"] .stage')
    expect(stage).to_have_text("confirmed", timeout=WAIT_MS)
    expect(page.locator("#health")).to_contain_text("OK", timeout=WAIT_MS)
    assert archive_lab.instance_count() == 5
    _screenshot(page, tmp_path, "status-drained.png")


def test_retry_a_failed_instance_from_the_page(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, browser: Browser, tmp_path: Path
) -> None:
    gw = gateway_factory(
        start=False, upload=_upload_config(archive_lab), web={"refresh_seconds": 1}
    )
    # No Series Instance UID: the archive refuses it for good (0xC000).  The gateway's
    # own C-STORE check refuses such an instance, so it is queued directly.
    path = tmp_path / "no-series.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path)
    del ds.SeriesInstanceUID
    ds.save_as(path)
    gw.enqueue_unchecked(path)
    gw.start()
    api = WebClient(web_port(gw))
    wait_until("failed", lambda: api.status()["queue"]["failed"] == 1)

    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{api.port}/")
    expect(page.locator("#failed")).to_contain_text(str(ds.SOPInstanceUID))
    expect(page.locator("#failed")).to_contain_text("0xC000")
    _screenshot(page, tmp_path, "status-failed.png")
    page.locator("#failed").get_by_role("button", name="Retry").click()
    wait_until("retried from the page", lambda: "1 failed instance(s) queued again" in gw.log)
    # Sent again, refused again: attempts count from zero after the retry.
    wait_until("failed again", lambda: api.status()["queue"]["failed"] == 1)
    assert gw.rows("SELECT attempts FROM instances")[0]["attempts"] == 1
