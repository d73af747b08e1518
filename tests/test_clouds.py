"""Each cloud profile end to end (issue 14): its authentication and its STOW-RS answers
together, through the real pipeline on a real spool and database.

No cloud is reachable from this machine, so each cloud is two hand-written doubles
working together, both written from the vendor's public documents and open-source
code, which they cite: its token issuer or signature check (tests/support/cloud_auth.py:
Google's OAuth 2.0 service-account grant, a Microsoft Entra tenant, a SigV4 check
built on botocore's own signer) and its archive's answers (tests/support/scripted_archive.py:
``google_answer``, ``azure_answer``, ``aws_answer``).  The tokens come from each
library's real flow (google-auth, azure-identity, botocore).  Everything Orthanc can
show is tested against the real Orthanc behind nginx mTLS (tests/test_upload.py,
tests/test_archives.py).

For each of ``google``, ``azure`` and ``aws``:

* credentials: a token that expires is replaced before it is used again (AWS: there
  is no token; rotated keys are picked up), and a refused one (HTTP 401, AWS 403) is
  refreshed once and the request sent again within the same attempt;
* a duplicate after a simulated crash (the archive stored the batch, the connection
  dropped before its answer) ends ``uploaded``;
* a conflicting duplicate (the archive holds other content under the UIDs) ends
  ``failed`` with the reason;
* warnings are recorded on the instance, which counts as stored;
* the archive's size limit is kept: no request over it, an instance that can never
  fit fails without being sent (Google: no size limit, but a transaction time limit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.instances import QueueState
from gateway.metrics import Metrics
from gateway.pipeline import archives

from .conftest import GatewayFactory
from .support.scripted_archive import (
    Answer,
    ScriptedArchive,
    aws_answer,
    azure_answer,
    google_answer,
    stored_then_dropped,
)
from .test_auth import (
    Clouds,
    _no_aws_environment,
    archive,
    assert_no_secret,
    clouds,
)
from .test_config import _cli
from .test_isolation import Bench, _all

__all__ = ["_no_aws_environment", "archive", "clouds"]

#: Each cloud's upload.archive profile, its upload.auth method, and its archive double.
CLOUDS: dict[str, tuple[str, Callable[..., Answer]]] = {
    "google": ("google", google_answer),
    "azure": ("azure", azure_answer),
    "aws": ("aws-sigv4", aws_answer),
}


def _bench(
    cloud: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path, **upload: Any
) -> Bench:
    method, _ = CLOUDS[cloud]
    clouds.accept(method, archive)
    bench = Bench(
        tmp_path / "bench",
        **archive.upload_config(archive=cloud, auth=clouds.auth(method), **upload),
    )
    bench.pipeline.metrics = Metrics()
    return bench


def _metric(bench: Bench, name: str, labels: dict[str, str]) -> float | None:
    m = bench.pipeline.metrics
    assert m is not None
    return m.registry.get_sample_value(name, labels)


async def _upload_one(bench: Bench, task: asyncio.Task[None], **add: Any) -> dict[str, Any]:
    uid = bench.add(**add)
    bench.pipeline.wake()
    rows = await bench.until(
        f"{uid} uploaded", task, lambda r: r[uid]["state"] == QueueState.UPLOADED
    )
    return dict(rows[uid])


@pytest.mark.asyncio
@pytest.mark.parametrize("cloud", list(CLOUDS))
async def test_credentials_expire_refresh_and_one_retry_after_a_refusal(
    cloud: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    issuer = None
    if cloud == "google":
        issuer = clouds.google(expires_in=3)
    elif cloud == "azure":
        issuer = clouds.entra(expires_in=3)
    archive.default = CLOUDS[cloud][1]()
    bench = _bench(cloud, clouds, archive, tmp_path)
    async with bench.running() as task:
        await _upload_one(bench, task)
        assert archive.refused == 0
        if issuer is not None:
            # Expiry: once the first token is past its end, the next request goes out
            # with a new one fetched before it, not after a refusal.
            (expires,) = issuer.tokens.issued.values()
            await asyncio.sleep(max(0.0, expires - time.time()) + 0.2)
            await _upload_one(bench, task)
            assert archive.refused == 0 and issuer.grants >= 2
            assert len(set(archive.authorizations)) >= 2
            # Refusal: the token in use is revoked at the archive.
            archive.revoke(archive.authorizations[-1])
        else:
            # AWS has no token: its keys are rotated (as a credentials agent would
            # rewrite the shared credentials file); the archive takes only the new one.
            clouds.aws.secret_key = secrets.token_urlsafe(30)
            clouds.aws.write_credentials_file(clouds.root / "aws-credentials")
        grants = issuer.grants if issuer is not None else 0
        row = await _upload_one(bench, task)
    assert archive.refused == 1, "one refusal, then the refreshed credentials"
    assert row["attempts"] == 1, "the resend is part of the same attempt"
    if issuer is not None:
        assert issuer.grants == grants + 1
    else:
        assert clouds.aws.checked >= 3
    assert len(archive.stored) == (3 if issuer is not None else 2)
    assert_no_secret(clouds.secrets(), log=caplog.text)


@pytest.mark.asyncio
@pytest.mark.parametrize("cloud", list(CLOUDS))
async def test_a_duplicate_after_a_crash_ends_uploaded(
    cloud: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    answer = CLOUDS[cloud][1]
    archive.default = answer()
    archive.script(stored_then_dropped(answer()))
    bench = _bench(cloud, clouds, archive, tmp_path)
    uids = [bench.add(), bench.add()]
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert [len(r) for r in archive.requests] == [2, 2]
    assert set(archive.held) == set(uids)
    assert [rows[u]["attempts"] for u in uids] == [2, 2]
    # Google stores an identical re-send as any other; Azure answers 45070 and AWS
    # says stored: both are checked against the archive's metadata.
    checked = sorted(archive.metadata_requests)
    assert checked == ([] if cloud == "google" else sorted(uids))
    assert archive.refused == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("cloud", list(CLOUDS))
async def test_a_conflicting_duplicate_fails_with_the_reason(
    cloud: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    archive.default = CLOUDS[cloud][1]()
    bench = _bench(cloud, clouds, archive, tmp_path)
    uid = bench.add(patient_id="OURS")
    archive.hold(bench.spool.path_of(bench.rows()[uid]["path"]), PatientID="THEIRS")
    # An earlier request carried it (AWS files a conflicting re-send away silently:
    # only an instance sent before is checked when the answer says stored).
    bench.store.submit(
        lambda c: c.execute("UPDATE instances SET sends = 1 WHERE sop_instance_uid = ?", (uid,))
    ).result()
    async with bench.running() as task:
        rows = await bench.until("failed", task, _all(QueueState.FAILED))
    reason = rows[uid]["last_error"]
    assert reason.startswith("archive holds a different instance under this UID"), reason
    assert "PatientID archive 'THEIRS' vs ours 'OURS'" in reason
    assert rows[uid]["attempts"] == 1 and len(archive.requests) == 1
    assert archive.metadata_requests == [uid]
    assert _metric(bench, "dicom_gateway_archive_verifications_total", {"result": "mismatch"}) == 1


#: Per cloud: the warning its double sends, and the text recorded for it.
_WARNINGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "google": ({"warnings": 0xB000}, ["0xB000 coercion of data elements"]),
    "azure": (
        {"warnings": (45063, ("DICOM100: (0008,0020) - Content does not validate",))},
        [
            "0xB007 data set does not match SOP class (Azure 45063)",
            "attributes DICOM100: (0008,0020) - Content does not validate",
        ],
    ),
    "aws": ({"warnings": 0xB100}, ["0xB100 transcoding exception: pixel data stored as a blob"]),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("cloud", list(CLOUDS))
async def test_warnings_are_recorded_while_the_instance_counts_as_stored(
    cloud: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path
) -> None:
    sent, expected = _WARNINGS[cloud]
    bench = _bench(cloud, clouds, archive, tmp_path)
    warned, plain = bench.add(), bench.add()
    archive.default = CLOUDS[cloud][1](warnings={warned: sent["warnings"]})
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert json.loads(rows[warned]["warnings"]) == expected
    assert rows[plain]["warnings"] is None
    code = expected[0].split()[0]
    assert _metric(bench, "dicom_gateway_stow_warnings_total", {"code": code}) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("cloud", list(CLOUDS))
async def test_the_archives_size_limit_is_kept(
    cloud: str, clouds: Clouds, archive: ScriptedArchive, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The profile's limit scaled down to 60 kB a request (AWS 1 GB, Azure 4 GB; Google
    has no size limit but 30 minutes a transaction, here 0.6 s at 100 kB/s)."""
    limit, min_rate = 60_000, 100_000
    profile = archives.PROFILES[cloud]
    if cloud == "google":
        scaled = dataclasses.replace(profile, max_request_seconds=limit / (0.9 * min_rate))
    else:
        scaled = dataclasses.replace(profile, max_request_bytes=limit, max_instance_bytes=limit)
    monkeypatch.setitem(archives.PROFILES, cloud, scaled)
    archive.default = CLOUDS[cloud][1]()
    bench = _bench(
        cloud, clouds, archive, tmp_path, batch_max_instances=4, min_bytes_per_second=min_rate
    )
    small = [bench.add(), bench.add(), bench.add()]  # 39 kB each: one per request
    big = bench.add("OBXXXX1A.dcm")  # 486 kB
    big_end = QueueState.UPLOADED if cloud == "google" else QueueState.FAILED
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until(
            "settled", task, lambda r: r[big]["state"] == big_end
            and all(r[u]["state"] == QueueState.UPLOADED for u in small),
        )  # fmt: skip
    small_requests = [size for r, size in zip(archive.requests, archive.request_sizes, strict=True)
                      if big not in r]  # fmt: skip
    assert len(small_requests) == 3 and all(size <= limit for size in small_requests)
    if cloud == "google":
        # Unlimited in size: the big one goes, alone.
        assert [r for r in archive.requests if big in r] == [[big]]
    else:
        assert not any(big in r for r in archive.requests)
        assert rows[big]["last_error"].endswith(f"upload.archive = {cloud!r}); not sent")


#: What ``dicom-gateway doctor`` prints for each cloud's credentials against its
#: doubles (the start of its auth line; the rest names the token's lifetime).
_DOCTOR_AUTH = {
    "google": "PASS  auth             google: google token valid for",
    "azure": "PASS  auth             azure: azure token valid for",
    "aws": "PASS  auth             aws-sigv4: SigV4 for medical-imaging in us-east-1",
}


@pytest.mark.parametrize("cloud", list(CLOUDS))
def test_doctor_against_each_cloud(
    cloud: str, clouds: Clouds, archive: ScriptedArchive, gateway_factory: GatewayFactory
) -> None:
    """``dicom-gateway doctor --config FILE`` as a field technician runs it on a box
    whose gateway runs, against the cloud's doubles: every line passes or skips, and
    the auth line has obtained a token (or signed) and made a QIDO-RS search with it."""
    method, _ = CLOUDS[cloud]
    clouds.accept(method, archive)
    gw = gateway_factory(
        upload={**archive.upload_config(), "archive": cloud, "compression": "none"},
        **{"upload.auth": clouds.auth(method)},
    )
    proc = _cli("doctor", "--config", str(gw.config_path), timeout=120)
    out = proc.stdout
    print(out)  # the run's output, in the test report
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    (auth_line,) = [line for line in lines if line[6:].startswith("auth ")]
    assert auth_line.startswith(_DOCTOR_AUTH[cloud]), out
    assert auth_line.endswith("QIDO-RS GET /dicom-web/studies?limit=1 answered HTTP 200"), out
    assert ("GET", "/dicom-web/studies?limit=1") in archive.other_requests
    assert not [line for line in lines if line.startswith("FAIL")], out
    assert gw.stop() == 0
    assert_no_secret(clouds.secrets(), doctor=out + proc.stderr, log=gw.log)
