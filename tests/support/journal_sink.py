"""Run the gateway with a stand-in journald, for tests/test_notify.py.

Run inside a private mount namespace whose /run/systemd is a fresh tmpfs (the test
starts it under ``unshare --mount``): binds /run/systemd/journal/socket, the path
libsystemd's sd_journal_send() writes to, starts ``python -m gateway run`` with
stderr on a file named in ``JOURNAL_STREAM`` (as systemd does), and appends every
datagram (journald's native protocol) to OUT, each followed by a NUL line.
Stops the gateway when it receives SIGTERM, then exits with the gateway's status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def main() -> int:
    out_path, config = sys.argv[1], sys.argv[2]
    os.makedirs("/run/systemd/journal", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/run/systemd/journal/socket")
    sock.settimeout(0.2)
    stderr = open(out_path + ".stderr", "wb")  # noqa: SIM115 - the child owns it
    st = os.fstat(stderr.fileno())
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", config], stderr=stderr, env=env
    )
    signal.signal(signal.SIGTERM, lambda *_: gateway.send_signal(signal.SIGTERM))
    with open(out_path, "ab", buffering=0) as out:
        while gateway.poll() is None:
            try:
                out.write(sock.recv(1 << 20) + b"\n\0\n")
            except TimeoutError:
                continue
    return gateway.returncode


if __name__ == "__main__":
    raise SystemExit(main())
