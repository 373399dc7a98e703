"""Child processes that are always cleaned up, and loopback port helpers.

Flower's SuperLink and SuperNode each start helpers (`flower-superexec`, then one
`flwr-serverapp`/`flwr-clientapp` per task). Killing only the parent leaves those
running, so every process started here gets its own session and is stopped by
process group and by the descendants seen: SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def child_env() -> dict[str, str]:
    """Flower starts `flower-superexec`/`flwr-clientapp` by name, so this venv's bin must lead PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def exit_with_parent() -> None:
    """Have Linux kill this process (SIGKILL) when the process that started it dies, however it dies.

    The site agent runs its SuperNode and worker in sessions of their own (so that it can stop each whole), and
    stops them itself on SIGTERM; a SIGKILLed agent (a test's process-group kill, `kill -9`, the OOM killer) could
    not, and left both running, retrying a SuperLink that was gone and holding the runtime port. Called first thing
    in each child; a parent that died before the request took effect is caught by the second look at the pid.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


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

    def __init__(
        self, cmd: list[str], log_path: Path | None, *, cwd: Path | None = None, env: dict | None = None
    ) -> None:
        """`log_path` None: the child writes to this process's stdout and stderr (a supervised agent's journal)."""
        self.cmd = cmd
        self.log_path = None if log_path is None else Path(log_path)
        self._log = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        self._seen: dict[int, str | None] = {}  # descendant pid -> start time (guards against pid reuse)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=None if self._log is None else subprocess.STDOUT,
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
        if self._log is None or self.log_path is None:
            return ""
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
        if self._log is not None:
            self._log.close()
