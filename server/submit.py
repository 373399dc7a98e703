"""Talking to a SuperLink's Control API with Flower's own client: start, follow, stop runs; list sites.

We use Flower's HTTP Control client (the one `flwr` uses) rather than
re-implementing the protocol, but call it directly so that `fedtune run` can
start a *stored, signed* bundle by hash, which `flwr run` cannot express.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedtune.server.appbundle import Bundle


class ControlError(RuntimeError):
    """The SuperLink refused or could not be reached; the message says why."""


@dataclass(frozen=True)
class Connection:
    address: str  # HOST:PORT of the SuperLink's HTTPS API
    root_certificates: Path | None = None
    insecure: bool = False


@dataclass(frozen=True)
class RunState:
    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | ""
    details: str


@contextmanager
def control_client(conn: Connection) -> Iterator[object]:
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    if not conn.insecure and conn.root_certificates is None:
        raise ControlError("pass --root-certificates CA.pem (the federation CA), or --insecure for a local test")
    connection = SuperLinkConnection(
        name="fedtune",
        address=conn.address,
        root_certificates=str(Path(conn.root_certificates).resolve()) if conn.root_certificates else None,
        insecure=conn.insecure,
    )
    client = init_http_client_from_connection(connection)
    try:
        yield client
    finally:
        client.close()


def _call(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as exc:  # Flower raises transport-specific errors; the operator needs the reason
        raise ControlError(f"SuperLink request failed: {exc}") from None


def start_run(conn: Connection, bundle: Bundle, *, signed: bool, overrides: dict[str, object] | None = None) -> int:
    """Start a run of `bundle`: by hash when it was stored signed, else by content (unsigned)."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = Fab(bundle.sha256, b"", {}) if signed else Fab(bundle.sha256, bundle.content, {})
    request = StartRunRequest(
        fab=fab_to_proto(fab),
        override_config=user_config_to_proto(dict(overrides or {})),
        app_spec=bundle.app_id if signed else "",
    )
    with control_client(conn) as client:
        response = _call(lambda: client.StartRun(request))
    if not response.HasField("run_id"):
        raise ControlError("the SuperLink did not start the run (no run id returned); see its log")
    return int(response.run_id)


def run_state(conn: Connection, run_id: int) -> RunState:
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    with control_client(conn) as client:
        response = _call(lambda: client.ListRuns(ListRunsRequest(run_id=run_id)))
    if not response.run_dict:
        raise ControlError(f"run {run_id} not found on the SuperLink")
    run = run_from_proto(next(iter(response.run_dict.values())))
    return RunState(run_id, run.status.status, run.status.sub_status, run.status.details)


def wait_for_run(conn: Connection, run_id: int, timeout: float, poll: float = 2.0) -> RunState:
    deadline = time.monotonic() + timeout
    while True:
        state = run_state(conn, run_id)
        if state.status == "finished":
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {state.status} after {timeout:.0f}s")
        time.sleep(poll)


def stop_run(conn: Connection, run_id: int) -> None:
    from flwr.proto.control_pb2 import StopRunRequest

    with control_client(conn) as client:
        _call(lambda: client.StopRun(StopRunRequest(run_id=run_id)))


def stream_logs(conn: Connection, run_id: int, emit: Callable[[str], None]) -> None:
    """Follow the run's ServerApp log until the run ends."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    after = 0.0
    with control_client(conn) as client:
        while True:
            try:
                for res in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=after)):
                    if res.log_output:
                        emit(res.log_output)
                    after = max(after, res.latest_timestamp)
            except Exception as exc:  # stream ends with an error status once the run finished
                if run_state(conn, run_id).status == "finished":
                    return
                raise ControlError(f"log stream for run {run_id} broke: {exc}") from None
            if run_state(conn, run_id).status == "finished":
                return
            time.sleep(1.0)


def online_nodes(conn: Connection) -> dict[int, str]:
    """Registered SuperNodes and their status (online, offline, registered, ...)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    with control_client(conn) as client:
        response = _call(lambda: client.ListNodes(ListNodesRequest()))
    return {int(n.node_id): str(n.status) for n in response.nodes_info}


def register_node(conn: Connection, public_key_path: Path, name: str) -> int:
    """`flwr supernode register`, as a function: returns the node id the SuperLink assigned."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest

    key = try_load_public_key(Path(public_key_path).expanduser())
    with control_client(conn) as client:
        try:
            response = _call(lambda: client.RegisterNode(RegisterNodeRequest(public_key=key, name=name)))
        except ControlError as exc:
            if "Precondition" in str(exc) or "FAILED_PRECONDITION" in str(exc) or "already" in str(exc):
                raise ControlError(
                    f"{name}'s SuperNode key {public_key_path} is already registered with this SuperLink; nothing "
                    "to do (to replace it, unregister the old node with `flwr supernode unregister` first)"
                ) from None
            raise
    if not response.node_id:
        raise ControlError(f"the SuperLink did not register {name}; is the key already registered?")
    return int(response.node_id)
