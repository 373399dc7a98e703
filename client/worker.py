"""The warm site worker: one long-lived process per site that runs every Flower task of that site.

Why: Flower 1.42's SuperNode starts a fresh `flwr-clientapp` process for every message. A fedtune site gets
five messages per secure round, and each fresh process imports torch and Flower (about 4 s), reloads the base
model and re-tokenises the data before doing milliseconds of work; a GPU site with a 7B model would reload it
from disk twice per round. The worker imports all that once and keeps the base model, the tokenised data, the
cached features and the sigma search's history across messages, rounds and runs.

How it plugs into Flower without changing Flower: the SuperNode's SuperExec starts the task command
`flwr-clientapp` by name. `fedtune client start` puts a relay of that name first on the SuperNode's PATH
(`client/relay.py`, standard library only, so it starts in milliseconds). The relay hands the task's arguments
(runtime API address, one-task token) to this worker over a Unix socket that only the site's user can open,
and exits with the task's status. The worker then does what `flwr-clientapp` does, with Flower's own runtime
calls: pull the message and context, run the ClientApp the signed bundle names, push the reply and the context.

Because the worker pushes the reply itself, it also knows when the SuperNode has taken it: only then does it
mark the reply's egress-log entries delivered (`EgressLog.confirm`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import resource
import socket
import socketserver
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RELAY_NAME = "flwr-clientapp"  # the command Flower's SubprocessExecutor starts for a ClientApp task


class WorkerError(RuntimeError):
    """The worker cannot run as configured; the message says what to change."""


def worker_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "worker"


def socket_path(state_dir: str | Path) -> Path:
    return worker_dir(state_dir) / "worker.sock"


def tasks_log_path(state_dir: str | Path) -> Path:
    """One JSON line per task: kind, round, seconds to pull / run / push, arrays received, peak RSS."""
    return worker_dir(state_dir) / "tasks.jsonl"


def node_id_path(state_dir: str | Path) -> Path:
    """The node id the SuperLink gave this site, as its tasks report it: a restarted agent releases that node."""
    return worker_dir(state_dir) / "node-id"


def write_relay(state_dir: str | Path) -> Path:
    """The `flwr-clientapp` the SuperNode will find first on its PATH; returns its folder."""
    bin_dir = worker_dir(state_dir) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    script = bin_dir / RELAY_NAME
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedtune.client.relay "$@"\n')
    script.chmod(0o700)
    return bin_dir


@dataclass(frozen=True)
class Task:
    """What Flower's SuperExec passes to `flwr-clientapp` for one task."""

    runtime_api_address: str
    token: str
    insecure: bool
    root_certificates: str | None


def parse_task(argv: list[str]) -> Task:
    parser = argparse.ArgumentParser(prog=RELAY_NAME, add_help=False, exit_on_error=False)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--allow-runtime-dependency-installation", action="store_true")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise WorkerError(f"unexpected {RELAY_NAME} arguments {unknown}: this fedtune worker supports Flower 1.42")
    if args.allow_runtime_dependency_installation:
        raise WorkerError(
            "the SuperNode allows run-time dependency installation: a site runs the fedtune it installed; "
            "start flower-supernode without --allow-runtime-dependency-installation"
        )
    return Task(args.runtime_api_address, args.token, args.insecure, args.root_certificates)


def _pull_task_input(client: object, parts: dict[str, float]) -> tuple:
    """Flower's `run_clientapp.pull_task_input` with a short first backoff.

    SuperExec starts a task as soon as the SuperNode has stored the message, sometimes before the message's
    objects are stored: the first pull then misses, and Flower's 1 s backoff made every secure-aggregation stage
    cost a site 1.2 s for 10 ms of work (measured with `benchmarks/deploy.py`).
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.common.flower_waits import BACKOFF_CAP_S, FIRST_BACKOFF_S

    started = time.monotonic()
    res = client.PullTaskInput(PullTaskInputRequest())  # type: ignore[attr-defined]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        res.task_id,
        res.run.run_id,
        res.context.node_id,
    )
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    parts["task_input_s"] = time.monotonic() - started
    pulled = client.PullMessages(PullAppMessagesRequest())  # type: ignore[attr-defined]
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),  # type: ignore[attr-defined]
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived,  # type: ignore[attr-defined]
            node,
            context.run_id,
        ),
        return_type=Message,
        initial_backoff=FIRST_BACKOFF_S,  # Flower's 1 s first backoff was most of a stage's time at the site
        backoff_cap=BACKOFF_CAP_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    parts["message_s"] = time.monotonic() - started - parts["task_input_s"]
    return message, context, run, fab


@dataclass
class _Outcome:
    """What one task did, for the SuperNode (status, context) and for the tasks log."""

    context: object = None
    completed: bool = False
    details: str = "fedtune worker: task failed"
    kind: str = ""
    round: int | None = None
    array_bytes_in: int = 0
    pull_s: float = 0.0  # message, context and bundle from the SuperNode, app loaded
    pull_parts: dict[str, float] = field(default_factory=dict)  # where pull_s went (the deployment benchmark)
    app_s: float = 0.0
    push_s: float = 0.0  # reply and context to the SuperNode


class TaskRunner:
    """Runs Flower tasks in this process, one at a time, as `flwr-clientapp` would run each in a new one.

    Every task runs on the same thread: the site's cached state (its ledger's SQLite connection among it)
    belongs to the thread that made it, and a site handles one message at a time anyway.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtune-task")

    def run(self, task: Task) -> int:
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=task.runtime_api_address,
            insecure=task.insecure,
            root_certificates=validate_and_resolve_root_certificates(task.root_certificates, task.insecure),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name=RELAY_NAME),
                RuntimeTokenHttpInterceptor(task.token),
            ],
            retry_invoker=retry,
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()  # before queueing: a task waiting for its turn is alive, not lost
        try:
            outcome = self._executor.submit(self._execute, client, retry).result()
            return 0 if outcome.completed else 1
        finally:
            heartbeat.stop()
            client.close()

    def _execute(self, client: object, retry: object) -> _Outcome:
        """Pull, run, push the reply, then the context: the next task must see this one's context."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from fedtune.client.audit import EgressLog, egress_path

        started, out, pushed = time.monotonic(), _Outcome(), None
        try:
            message, out.context, _, fab = _pull_task_input(client, out.pull_parts)
            self._remember_node(out.context.node_id)
            out.kind = message.metadata.message_type
            out.array_bytes_in = sum(len(a.data) for r in message.content.array_records.values() for a in r.values())
            config = message.content.config_records.get("config")
            out.round = int(config["round"]) if config is not None and "round" in config else None
            _check_bundle(fab)
            from fedtune.client.client_app import app  # the fedtune this site installed, never the bundle's code

            log = EgressLog(egress_path(self.state_dir))
            mark = log.mark()
            t0 = time.monotonic()
            out.pull_s = t0 - started
            try:
                reply = app(message=message, context=out.context)
                out.completed, out.details = True, ""
            except Exception as exc:  # the server reads the reason; the worker stays up for the next task
                out.details = f"{type(exc)}:<'{exc}'>"
                print(f"fedtune worker: {out.kind} raised {out.details}", file=sys.stderr, flush=True)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=out.details), reply_to=message)
                if log.mark() == mark:  # raised before fedtune's handler could log it (a message type it lacks)
                    log.record_error(out.details, run="", round_=0, delivered=False)
            out.app_s = time.monotonic() - t0
            pushed = time.monotonic()
            push_message(client, reply, out.context)
            log.confirm(since=mark)  # the SuperNode has the reply: only now is it sent
            return out
        except Exception as exc:
            out.completed, out.details = False, f"fedtune worker: {type(exc).__name__}: {exc}"
            print(out.details, file=sys.stderr, flush=True)
            return out
        finally:
            retry.max_tries = 1  # type: ignore[attr-defined]
            status = SubStatus.COMPLETED if out.completed else SubStatus.FAILED
            push_task_output(client=client, context=out.context, sub_status=status, details=out.details)
            out.push_s = 0.0 if pushed is None else time.monotonic() - pushed
            self._record(out, time.monotonic() - started)

    def _remember_node(self, node_id: int) -> None:
        path = node_id_path(self.state_dir)
        if not path.exists() or path.read_text().strip() != str(node_id):
            path.write_text(f"{node_id}\n")

    def _record(self, out: _Outcome, total_s: float) -> None:
        """What the deployment benchmark reads: per-stage site time, arrays received, peak memory."""
        line = {"time": time.time(), "pid": os.getpid(), "task": out.kind, "round": out.round}
        line |= {"pull_s": round(out.pull_s, 4), "app_s": round(out.app_s, 4), "push_s": round(out.push_s, 4)}
        line |= {name: round(value, 4) for name, value in out.pull_parts.items()}
        line |= {"total_s": round(total_s, 4), "array_bytes_in": out.array_bytes_in}
        line["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with tasks_log_path(self.state_dir).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")


CLIENTAPP = "fedtune.client.client_app:app"  # what fedtune's bundles name (server/appbundle.py)


def _check_bundle(fab: Any) -> None:
    """The run's app bundle: the bytes the SuperNode named, and code-free, naming fedtune's ClientApp.

    The worker runs the fedtune this site installed and never installs or imports from a bundle: Flower's loader
    would put the bundle's folder first on `sys.path`, so a bundle the operator signed could ship its own ClientApp
    or shadow a library the site imports later (OpenDP's sampler: a site adding no noise), with the site's rights
    (review round 6). fedtune's bundles carry only pyproject.toml (and Flower's `.info/` manifest).
    """
    digest = hashlib.sha256(fab.content).hexdigest()
    if digest != fab.hash_str:
        raise WorkerError(f"app bundle bytes hash to {digest[:12]}, the SuperNode named {fab.hash_str[:12]}")
    try:
        with zipfile.ZipFile(io.BytesIO(fab.content)) as bundle:
            files = [name for name in bundle.namelist() if not name.startswith(".info/")]
            pyproject = tomllib.loads(bundle.read("pyproject.toml").decode()) if "pyproject.toml" in files else {}
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WorkerError(f"the app bundle is unreadable ({exc}); refusing the run") from None
    if files != ["pyproject.toml"]:
        raise WorkerError(
            f"the app bundle carries {sorted(files)[:5]}: a fedtune bundle holds only pyproject.toml, and a site runs "
            "the fedtune it installed, never code from a bundle; refusing the run"
        )
    named = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if named != CLIENTAPP:
        raise WorkerError(f"the app bundle names ClientApp {named!r}, not {CLIENTAPP!r}; refusing the run")


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        request = json.loads(self.rfile.readline() or b"{}")
        if request.get("ping"):
            reply = {"ready": True, "pid": os.getpid()}
        else:
            try:
                reply = {"code": self.server.runner.run(parse_task(list(request.get("argv", []))))}
            except Exception as exc:  # a task that could not even start: the relay prints why
                print(f"fedtune worker: task refused: {exc}", file=sys.stderr, flush=True)
                reply = {"code": 1, "error": str(exc)}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, runner: TaskRunner) -> None:
        self.runner = runner
        old = os.umask(0o177)  # the socket is created 0600: only the site's user may hand it tasks
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)


def serve(state_dir: Path) -> None:
    """Listen on STATE_DIR/worker/worker.sock until killed; import the heavy parts first so tasks start warm."""
    path = socket_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    lock = (path.parent / "worker.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when this process dies
    except BlockingIOError:
        raise WorkerError(f"a worker already serves {path}: one worker per site") from None
    path.unlink(missing_ok=True)  # a killed worker's socket
    import fedtune.client.client_app  # noqa: F401  torch, transformers, peft, opacus and Flower: once

    with _Server(path, TaskRunner(Path(state_dir))) as server:
        print(f"fedtune worker {os.getpid()} ready on {path}", file=sys.stderr, flush=True)
        server.serve_forever()


def ping(path: Path, timeout: float = 5.0) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b'{"ping": true}\n')
        return bool(json.loads(sock.makefile("rb").readline() or b"{}").get("ready"))


def wait_ready(path: Path, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise WorkerError(f"the site worker exited before it was ready on {path}; its log says why")
        with contextlib.suppress(OSError):
            if path.exists() and ping(path, timeout=2.0):
                return
        time.sleep(0.2)
    raise WorkerError(f"the site worker was not ready on {path} after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedtune.client.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, type=Path, help="the site's state_dir (site.toml)")
    args = parser.parse_args(argv)
    from fedtune.common.processes import exit_with_parent

    exit_with_parent()  # a worker never outlives the agent (or test) that started it
    try:
        serve(args.state_dir)
    except WorkerError as exc:
        sys.exit(f"fedtune worker: {exc}")


if __name__ == "__main__":
    main()
