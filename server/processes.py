"""The operator's `flower-superlink` command line, and child processes that are always cleaned up.

Flower's SuperLink and SuperNode each start helpers (`flower-superexec`, then one
`flwr-serverapp`/`flwr-clientapp` per task). Killing only the parent leaves those
running, so every process started here gets its own session and is stopped by
process group: SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.client.agent import AgentError, child_env, flower_executable


@dataclass(frozen=True)
class SuperlinkOptions:
    database: Path
    host: str = "0.0.0.0"
    port: int = 9093
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    insecure: bool = False
    supernode_auth: bool = True


def superlink_command(opts: SuperlinkOptions) -> list[str]:
    """`flower-superlink` with TLS, SuperNode auth and SQLite state; refuses a half-configured TLS setup."""
    cmd = [flower_executable("flower-superlink"), "--host", opts.host, "--port", str(opts.port)]
    cmd += ["--database", str(Path(opts.database).resolve())]
    # The app bundle pins `fedtune[client]`; the operator installs fedtune, never `uv sync` at run time.
    cmd.append("--disable-runtime-dependency-installation")
    if opts.insecure:
        if opts.supernode_auth:
            raise AgentError("SuperNode authentication needs TLS; drop --insecure or pass --no-site-auth")
        return [*cmd, "--insecure"]
    files = {"--ssl-ca-certfile": opts.ca_cert, "--ssl-certfile": opts.server_cert, "--ssl-keyfile": opts.server_key}
    for flag, path in files.items():
        if path is None:
            raise AgentError(f"TLS needs {flag}: create the files with `fedtune server certs DIR`, or pass --insecure")
        if not Path(path).is_file():
            raise AgentError(f"{flag} {path}: file not found")
        cmd += [flag, str(Path(path).resolve())]
    if opts.supernode_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Child, grandchild, ... pids of `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


class ManagedProcess:
    """A child in its own process group, with its output in a log file."""

    def __init__(self, cmd: list[str], log_path: Path, *, cwd: Path | None = None, env: dict | None = None) -> None:
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._seen: dict[int, str | None] = {}  # descendant pid -> start time (guards against pid reuse)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env or child_env(),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            time.sleep(0.5)
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group and every descendant (Flower detaches some helpers into new sessions)."""
        for pid in descendants(self.proc.pid):
            self._seen.setdefault(pid, _start_time(pid))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        for pid, started in self._seen.items():
            if started is not None and _start_time(pid) == started:  # still the helper we saw, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.kill(signal.SIGKILL)  # helpers may outlive a parent that exited on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()
