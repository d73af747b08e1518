"""Command line: the only place that prints to the terminal and picks exit codes."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, instances
from .commitment.requests import RequestState
from .config import EXIT_CONFIG, Config, ConfigError, load
from .instances import QueueState
from .mpps import outbox as mpps_outbox
from .mpps.outbox import OutboxState
from .store import Store

#: The gateway could not start for a reason outside its config (port taken, disk).
EXIT_START_FAILED = 71


def _load_or_exit(path: str | None) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"dicom-gateway: config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    from .app import Gateway
    from .auth import check_secret_files
    from .notify import setup_logging

    config = _load_or_exit(args.config)
    try:
        # A secret file others can read is refused like a broken key (exit 78).
        check_secret_files(config)
    except ConfigError as exc:
        print(f"dicom-gateway: config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    setup_logging(config.logging.level)
    try:
        return asyncio.run(Gateway(config).run())
    except (OSError, sqlite3.Error) as exc:
        logging.getLogger("gateway").critical("cannot start: %s", exc)
        return EXIT_START_FAILED


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.file)
    print(f"{config.source}: ok")
    return 0


def _database(config: Config) -> Path | None:
    """The queue database of *config*, or None (said on stderr) when there is none."""
    from .upgrade import database_in_use

    path = database_in_use(config)
    if not path.exists():
        print(f"dicom-gateway: no queue database at {path}", file=sys.stderr)
        return None
    return path


def _list(
    args: argparse.Namespace,
    listing: Callable[[sqlite3.Connection, str | None, int], list[dict[str, Any]]],
    line: Callable[[dict[str, Any]], str],
) -> int:
    """``ls``: *listing* (a table owner's) filtered by ``--state``, as JSON or lines."""
    db_path = _database(_load_or_exit(args.config))
    if db_path is None:
        return 1
    store = Store(db_path)
    rows = store.read(lambda conn: listing(conn, args.state, args.limit))
    store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(line(r))
    return 0


def _retry(
    args: argparse.Namespace,
    retry_failed: Callable[[sqlite3.Connection, list[str] | None], int],
    what: str,
    uids_name: str,
) -> int:
    """``retry``: *retry_failed* for the named SOP Instance UIDs, or for all with --all."""
    config = _load_or_exit(args.config)
    if not args.all and not args.sop_instance_uids:
        print(f"dicom-gateway: name {uids_name} to retry, or --all", file=sys.stderr)
        return 2
    db_path = _database(config)
    if db_path is None:
        return 1
    store = Store(db_path)
    store.open()
    try:
        uids = None if args.all else list(args.sop_instance_uids)
        count = store.submit(lambda conn: retry_failed(conn, uids)).result()
    finally:
        store.close()
    print(f"{count} failed {what}(s) queued again")
    return 0


def _error(r: dict[str, Any]) -> str:
    return f"  {r['last_error']}" if r["last_error"] else ""


def _warnings(r: dict[str, Any]) -> str:
    return f"  warnings: {'; '.join(r['warnings'])}" if r["warnings"] else ""


#: What ``queue ls`` shows of each row (``/api/queue`` shows them all), in this order.
_QUEUE_LS_FIELDS = (
    "sop_instance_uid", "study_instance_uid", "calling_ae", "state", "attempts", "size",
    "received_at", "last_error", "warnings",
)  # fmt: skip


def _queue_listing(conn: sqlite3.Connection, state: str | None, limit: int) -> list[dict[str, Any]]:
    rows = instances.listing(conn, state, limit, newest_first=False)
    return [{k: r[k] for k in _QUEUE_LS_FIELDS} for r in rows]


def cmd_queue_ls(args: argparse.Namespace) -> int:
    return _list(
        args,
        _queue_listing,
        lambda r: (
            f"{r['received_at']}  {r['state']:<11} {r['attempts']:>3}  {r['calling_ae']:<16}"
            f"  {r['sop_instance_uid']}  {r['size']}{_error(r)}{_warnings(r)}"
        ),
    )


def cmd_queue_retry(args: argparse.Namespace) -> int:
    return _retry(args, instances.retry_failed, "instance", "SOP Instance UIDs")


def cmd_mpps_ls(args: argparse.Namespace) -> int:
    return _list(
        args,
        mpps_outbox.listing,
        lambda r: (
            f"{r['seq']:>6}  {r['received_at']}  N-{r['kind'].upper():<6} {r['state']:<8}"
            f" {r['attempts']:>3}  {r['sop_instance_uid']}{_error(r)}"
        ),
    )


def cmd_mpps_retry(args: argparse.Namespace) -> int:
    return _retry(args, mpps_outbox.retry_failed, "MPPS message", "MPPS SOP Instance UIDs")


def _study_store(args: argparse.Namespace) -> tuple[Store, Config] | None:
    config = _load_or_exit(args.config)
    db_path = _database(config)
    return None if db_path is None else (Store(db_path), config)


def _stage_cell(stage: Any) -> str:
    return f"{stage['count']:>5}"


def cmd_study_ls(args: argparse.Namespace) -> int:
    from . import studies

    opened = _study_store(args)
    if opened is None:
        return 1
    store, config = opened
    found = store.read(lambda conn: studies.recent(conn, args.limit, config.study.quiet_seconds))
    store.close()
    rows = [dataclasses.asdict(p) for p in found]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'last received':<19}  {'stage':<10} {'recv':>5} {'compr':>5} {'upld':>5}"
          f" {'conf':>5} {'comm':>5} {'fail':>4}  study")  # fmt: skip
    for r in rows:
        print(
            f"{(r['received']['last_at'] or '')[:19]:<19}  {r['stage']:<10}"
            + "".join(f" {_stage_cell(r[s])}" for s in studies.STAGES)
            + f" {r['failed']:>4}  {r['study_instance_uid']}"
        )
    return 0


def cmd_study_show(args: argparse.Namespace) -> int:
    from . import studies
    from .config import is_valid_uid

    if not is_valid_uid(args.study_instance_uid):
        print(f"dicom-gateway: not a valid Study Instance UID: {args.study_instance_uid!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    opened = _study_store(args)
    if opened is None:
        return 1
    store, config = opened
    quiet = config.study.quiet_seconds
    found = store.read(lambda conn: studies.one(conn, args.study_instance_uid, quiet))
    store.close()
    if found is None:
        print(f"dicom-gateway: no instance of study {args.study_instance_uid} is known",
              file=sys.stderr)  # fmt: skip
        return 1
    r = dataclasses.asdict(found)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"study      {r['study_instance_uid']}")
    print(f"from       {', '.join(r['calling_aes'])}")
    print(f"instances  {r['instances']}")
    when = "complete" if r["complete"] else f"complete at {r['complete_at'][:19]} if quiet"
    print(f"stage      {r['stage']}  ({when})")
    for s in studies.STAGES:
        stage = r[s]
        when = f"  first {stage['first_at'] or '-'}  last {stage['last_at'] or '-'}"
        print(f"{s:<10} {stage['count']:>5}/{r['instances']}{when if stage['count'] else ''}")
    print(f"failed     {r['failed']:>5}")
    if r["seconds_to_confirmed"] is not None:
        print(f"first receipt to archive confirmation: {r['seconds_to_confirmed']:.1f} s")
    return 0


def cmd_commitment_ls(args: argparse.Namespace) -> int:
    from .commitment import requests as commitment_requests

    def line(r: dict[str, Any]) -> str:
        failed = "".join(
            f"\n    failed {f['sop_instance_uid']} 0x{f['failure_reason']:04X} {f['detail'] or ''}"
            for f in r["failures"]
        )
        return (
            f"{r['received_at']}  {r['state']:<9} {r['requesting_ae']:<16} {r['item_count']:>5}"
            f"  {r['transaction_uid']}{_error(r)}{failed}"
        )

    return _list(args, commitment_requests.listing, line)


def cmd_hash_password(args: argparse.Namespace) -> int:
    from .web.auth import hash_password, new_token, token_sha256

    if args.token:
        token = new_token()
        print(f"token (give to the monitoring client): {token}")
        print(f'token_sha256 = "{token_sha256(token)}"')
        return 0
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("dicom-gateway: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("dicom-gateway: use at least 8 characters", file=sys.stderr)
        return 1
    print(f'password_hash = "{hash_password(password)}"')
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .field import doctor

    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"FAIL  config           {exc}\n      fix: correct that key and run again")
        return 1
    return doctor(config)


def cmd_enroll(args: argparse.Namespace) -> int:
    import socket

    from .field import enroll

    name = args.common_name or socket.getfqdn()
    try:
        subject = enroll(Path(args.key), Path(args.csr), name, force=args.force)
    except FileExistsError:
        print(
            f"dicom-gateway: {args.key} exists; --force replaces it (the old certificate "
            "then stops working)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"dicom-gateway: cannot write the key or CSR: {exc}", file=sys.stderr)
        return 1
    print(f"key {args.key} (EC P-256, mode 0600), CSR {args.csr} for {subject}")
    print("send the CSR to the archive's CA; install the signed certificate as upload.client_cert")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from .field import SendResult, send

    config = _load_or_exit(args.config)
    port = args.port if args.port is not None else config.dimse.port
    called = args.called_ae or config.dimse.ae_title

    def report(result: SendResult) -> None:
        print(f"{'OK  ' if result.ok else 'FAIL'}  {result.path}  {result.detail}", flush=True)

    return send([Path(f) for f in args.files], args.host, port, called, args.calling_ae, report)


def cmd_conformance(args: argparse.Namespace) -> int:
    from .dicom.conformance import render

    sys.stdout.write(render())
    return 0


def _fleet_config_or_exit(path: str) -> Any:
    from .fleet.config import load as load_fleet

    try:
        return load_fleet(path)
    except ConfigError as exc:
        print(f"dicom-gateway: config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_fleet_serve(args: argparse.Namespace) -> int:
    from .fleet.server import FleetServer
    from .notify import setup_logging

    config = _fleet_config_or_exit(args.config)
    setup_logging(config.logging.level)
    try:
        return asyncio.run(FleetServer(config).run())
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        # A port in use, an unreadable certificate or key, a database it cannot open.
        logging.getLogger("gateway").critical("cannot start the fleet receiver: %s", exc)
        return EXIT_START_FAILED


def cmd_fleet_check_config(args: argparse.Namespace) -> int:
    config = _fleet_config_or_exit(args.file)
    print(f"{config.source}: ok")
    return 0


def cmd_fleet_forget(args: argparse.Namespace) -> int:
    from .fleet import boxes
    from .fleet.database import FleetDatabase

    config = _fleet_config_or_exit(args.config)
    db = FleetDatabase(config.database.path)
    if not config.database.path.exists():
        print(f"dicom-gateway: no fleet database at {config.database.path}", file=sys.stderr)
        return 1
    db.open()
    try:
        removed = db.submit(boxes.forget(args.boxes)).result()
    finally:
        db.close()
    print(f"{removed} box(es) forgotten (a box that heartbeats again comes back)")
    return 0 if removed == len(set(args.boxes)) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-gateway", description="DICOM edge gateway for imaging sites."
    )
    parser.add_argument("--version", action="version", version=f"dicom-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    queue = sub.add_parser("queue", help="inspect the upload queue")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    ls = queue_sub.add_parser("ls", help="list queued instances")
    ls.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    ls.add_argument("--state", choices=[s.value for s in QueueState])
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_queue_ls)
    retry = queue_sub.add_parser("retry", help="send failed instances again")
    retry.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    retry.add_argument("--all", action="store_true", help="every failed instance")
    retry.add_argument("sop_instance_uids", nargs="*", metavar="SOP_INSTANCE_UID")
    retry.set_defaults(func=cmd_queue_retry)

    mpps = sub.add_parser("mpps", help="inspect the MPPS outbox (messages for the RIS)")
    mpps_sub = mpps.add_subparsers(dest="mpps_command", required=True)
    mls = mpps_sub.add_parser("ls", help="list MPPS messages in delivery order")
    mls.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    mls.add_argument("--state", choices=[s.value for s in OutboxState])
    mls.add_argument("--limit", type=int, default=100)
    mls.add_argument("--json", action="store_true", help="print JSON")
    mls.set_defaults(func=cmd_mpps_ls)
    mretry = mpps_sub.add_parser("retry", help="send failed MPPS messages again, in order")
    mretry.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    mretry.add_argument("--all", action="store_true", help="every failed message")
    mretry.add_argument("sop_instance_uids", nargs="*", metavar="MPPS_SOP_INSTANCE_UID")
    mretry.set_defaults(func=cmd_mpps_retry)

    commitment = sub.add_parser("commitment", help="inspect Storage Commitment requests")
    commitment_sub = commitment.add_subparsers(dest="commitment_command", required=True)
    cls = commitment_sub.add_parser("ls", help="list Storage Commitment requests, newest first")
    cls.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    cls.add_argument("--state", choices=[s.value for s in RequestState])
    cls.add_argument("--limit", type=int, default=100)
    cls.add_argument("--json", action="store_true", help="print JSON")
    cls.set_defaults(func=cmd_commitment_ls)

    study = sub.add_parser("study", help="per-study proof of delivery")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    sls = study_sub.add_parser("ls", help="the studies received most recently, and their stage")
    sls.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    sls.add_argument("--limit", type=int, default=20)
    sls.add_argument("--json", action="store_true", help="print JSON")
    sls.set_defaults(func=cmd_study_ls)
    sshow = study_sub.add_parser("show", help="one study's stages, counts and times")
    sshow.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    sshow.add_argument("--json", action="store_true", help="print JSON")
    sshow.add_argument("study_instance_uid", metavar="STUDY_INSTANCE_UID")
    sshow.set_defaults(func=cmd_study_show)

    hash_pw = sub.add_parser(
        "hash-password",
        help="print a web.password_hash line (password read from the terminal or stdin)",
    )
    hash_pw.add_argument(
        "--token", action="store_true", help="make a random API token and its web.token_sha256"
    )
    hash_pw.set_defaults(func=cmd_hash_password)

    doctor = sub.add_parser("doctor", help="check config, spool, port, certificate, archive")
    doctor.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    doctor.set_defaults(func=cmd_doctor)

    enroll = sub.add_parser("enroll", help="make this box's key and a CSR for the archive's CA")
    enroll.add_argument("--key", metavar="FILE", required=True, help="private key to write")
    enroll.add_argument("--csr", metavar="FILE", required=True, help="CSR to write")
    enroll.add_argument("--common-name", metavar="CN", help="subject CN (default: host name)")
    enroll.add_argument("--force", action="store_true", help="replace an existing key")
    enroll.set_defaults(func=cmd_enroll)

    conformance = sub.add_parser(
        "conformance", help="print the DICOM Conformance Statement (Markdown)"
    )
    conformance.set_defaults(func=cmd_conformance)

    send = sub.add_parser("send", help="test C-STORE of files to a DICOM peer")
    send.add_argument("--config", metavar="FILE", help="defaults for port and called AE")
    send.add_argument("--host", default="127.0.0.1", help="peer address (default: this box)")
    send.add_argument("--port", type=int, help="peer port (default: dimse.port)")
    send.add_argument("--called-ae", metavar="AE", help="peer AE title (default: dimse.ae_title)")
    send.add_argument("--calling-ae", metavar="AE", default="DGW-SEND", help="our AE title")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.set_defaults(func=cmd_send)

    fleet = sub.add_parser("fleet", help="the fleet receiver: many boxes' heartbeats")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    serve = fleet_sub.add_parser("serve", help="receive heartbeats; serve the page and /metrics")
    serve.add_argument("--config", metavar="FILE", required=True, help="fleet.toml")
    serve.set_defaults(func=cmd_fleet_serve)
    fcheck = fleet_sub.add_parser("check-config", help="validate a fleet.toml and exit")
    fcheck.add_argument("file", metavar="FILE")
    fcheck.set_defaults(func=cmd_fleet_check_config)
    forget = fleet_sub.add_parser("forget", help="remove boxes taken out of service")
    forget.add_argument("--config", metavar="FILE", required=True, help="fleet.toml")
    forget.add_argument("boxes", nargs="+", metavar="BOX", help="certificate CN of the box")
    forget.set_defaults(func=cmd_fleet_forget)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
