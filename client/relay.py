"""`flwr-clientapp` for a site with a warm worker: hands Flower's task to the worker and exits with its status.

Standard library only, on purpose: Flower starts this once per message, and importing nothing heavy is what
makes a message cost milliseconds instead of seconds (see `client/worker.py`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

SOCKET_ENV = "FEDTUNE_WORKER_SOCKET"  # set by `fedtune client start` for its SuperNode
WAIT_ENV = "FEDTUNE_WORKER_WAIT"  # seconds to wait for a worker that is still starting (default 600)


def _connect(path: str, wait: float) -> socket.socket:
    """The worker's socket; while the worker is still starting (importing torch, the model), wait for it."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str]) -> int:
    path = os.environ.get(SOCKET_ENV)
    if not path:
        print(f"fedtune relay: {SOCKET_ENV} is not set; start the site with `fedtune client start`", file=sys.stderr)
        return 2
    try:
        with _connect(path, float(os.environ.get(WAIT_ENV, "600"))) as sock:
            sock.sendall(json.dumps({"argv": argv}).encode() + b"\n")
            line = sock.makefile("rb").readline()
    except OSError as exc:
        print(
            f"fedtune relay: the site worker at {path} is not reachable ({exc}): restart `fedtune client start`",
            file=sys.stderr,
        )
        return 3
    reply = json.loads(line or b"{}")
    if "error" in reply:
        print(f"fedtune relay: the site worker refused the task: {reply['error']}", file=sys.stderr)
    return int(reply.get("code", 4))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
