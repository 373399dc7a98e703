"""The site agent around Flower's `flower-supernode`: keys it needs and the exact command line.

Flower authenticates SuperNodes with a NIST P-384 ECDSA key (OpenSSH format)
whose public half the operator registers; fedtune's secure aggregation uses a
separate Ed25519 identity key pinned by the other sites. Two keys, two trust
relationships: the operator decides who may connect, the sites decide whom
they mask with. Both private keys stay on the site, owner-readable only.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.client.relay import SOCKET_ENV
from fedtune.client.worker import (
    WorkerError,
    node_id_path,
    socket_path,
    wait_ready,
    worker_dir,
    write_relay,
)
from fedtune.common.processes import ManagedProcess, child_env

if TYPE_CHECKING:  # imported when --metrics-port asks for it: prometheus_client is not needed otherwise
    from fedtune.client.metrics_endpoint import MetricsEndpoint


class AgentError(RuntimeError):
    """The site agent cannot start as configured; the message says what to change."""


NODE_KEY_NAME = "supernode-auth"  # -> supernode-auth (private, OpenSSH) and supernode-auth.pub


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def generate_node_auth_key(state_dir: Path) -> tuple[Path, Path]:
    """Create the SuperNode authentication key pair (P-384, OpenSSH) unless it exists; return both paths."""
    private = Path(state_dir) / NODE_KEY_NAME
    public = private.with_name(NODE_KEY_NAME + ".pub")
    if private.exists():
        if not public.exists():
            public.write_bytes(node_public_key_ssh(private))
        return private, public
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public


def node_public_key_ssh(private: Path) -> bytes:
    key = serialization.load_ssh_private_key(Path(private).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AgentError(f"{private} is not an ECDSA key; Flower SuperNode auth needs a NIST P-384 key")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def flower_executable(name: str) -> str:
    """Flower's console script next to this interpreter (a venv need not be on PATH), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise AgentError(f"`{name}` not found: install the site agent with `pip install 'fedtune[client]'`")
    return found


@dataclass(frozen=True)
class SupernodeOptions:
    site_config: Path
    superlink: str
    root_certificates: Path | None
    auth_key: Path | None
    trusted_entities: Path | None
    insecure: bool = False
    runtime_port: int = 9094
    max_retries: int | None = None
    max_wait_time: float | None = None


@dataclass(frozen=True)
class MetricsOptions:
    """The agent's opt-in `/metrics` and `/healthz` endpoint (`fedtune client start --metrics-port`)."""

    port: int
    host: str = "127.0.0.1"
    epsilon_cap: float | None = None  # the site config's cap, exported beside the ledger's epsilon


def supernode_command(opts: SupernodeOptions) -> list[str]:
    """The `flower-supernode` invocation for this site; refuses combinations Flower would misuse.

    Flower's SuperNode runs through `fedtune.client.supernode`, which shortens its fixed polling sleeps.
    """
    site_config = Path(opts.site_config).resolve()
    if '"' in str(site_config):
        raise AgentError(f"{site_config}: the site config path must not contain double quotes")
    cmd = [sys.executable, "-m", "fedtune.client.supernode", "--superlink", opts.superlink]
    if opts.insecure:
        cmd.append("--insecure")
    else:
        if opts.root_certificates is None:
            raise AgentError(
                "TLS is required: pass --root-certificates CA.pem (the operator's ca.pem), "
                "or --insecure for a throwaway local test"
            )
        if not Path(opts.root_certificates).is_file():
            raise AgentError(f"--root-certificates {opts.root_certificates}: file not found")
        cmd += ["--root-certificates", str(Path(opts.root_certificates).resolve())]
        if opts.auth_key is not None:
            if not Path(opts.auth_key).is_file():
                raise AgentError(f"{opts.auth_key}: SuperNode auth key not found; create it with `fedtune client init`")
            cmd += ["--auth-supernode-private-key", str(Path(opts.auth_key).resolve())]
    if opts.trusted_entities is not None:
        if not Path(opts.trusted_entities).is_file():
            raise AgentError(f"--trusted-entities {opts.trusted_entities}: file not found")
        cmd += ["--trusted-entities", str(Path(opts.trusted_entities).resolve())]
    cmd += ["--port", str(opts.runtime_port), "--node-config", f'site-config="{site_config}"']
    if opts.max_retries is not None:
        cmd += ["--max-retries", str(opts.max_retries)]
    if opts.max_wait_time is not None:
        cmd += ["--max-wait-time", str(opts.max_wait_time)]
    return cmd


def worker_command(state_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fedtune.client.worker", "--state-dir", str(Path(state_dir).resolve())]


def supernode_env(state_dir: Path) -> dict[str, str]:
    """The SuperNode's environment: our relay first on PATH as `flwr-clientapp`, pointed at the site's worker.

    SuperExec polls for new tasks once a second by default; with a warm worker that poll is most of a secure-
    aggregation stage, so it is shortened (Flower's own setting, 10 ms minimum).
    """
    env = child_env()
    env["PATH"] = str(write_relay(state_dir)) + os.pathsep + env["PATH"]
    env[SOCKET_ENV] = str(socket_path(state_dir).resolve())
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    return env


def release_node(opts: SupernodeOptions, node_id: int) -> bool:
    """Mark this site's node offline at the SuperLink, signed with the site's own key; True if it was online.

    Flower 1.42 keeps a node that vanished without a goodbye (a crash, a kill) online until its heartbeat lapses
    (2 x 30 s) and refuses to activate the same key meanwhile, so a restarted site would sit out a minute of
    rounds. Flower's own Fleet API lets a node deactivate itself; the SuperLink checks that the request is
    signed by the key registered for that node id, so a site can release only its own node.
    """
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    if opts.auth_key is None or opts.root_certificates is None:
        return False  # without a registered key the SuperNode registers a fresh node each start
    key = serialization.load_ssh_private_key(Path(opts.auth_key).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AgentError(f"{opts.auth_key} is not an ECDSA key; Flower SuperNode auth needs a NIST P-384 key")
    interceptors = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(key, key.public_key()),
    ]
    root = Path(opts.root_certificates).read_bytes()
    with FleetHttpClient.from_server_address(opts.superlink, False, root, interceptors=interceptors) as client:
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        except (httpx.HTTPError, RuntimeError):
            return False  # already offline, unknown, or the SuperLink is down: the SuperNode will say which
    return True


def _metrics_endpoint(state_dir: Path, opts: MetricsOptions, alive: Callable[[], dict[str, bool]]) -> MetricsEndpoint:
    """Bound, not yet serving: a port in use is refused before any process starts. Raises AgentError."""
    from fedtune.client.metrics_endpoint import MetricsEndpoint
    from fedtune.client.site_metrics import site_health, site_registry

    registry = site_registry(state_dir, epsilon_cap=opts.epsilon_cap, processes=alive)
    try:
        return MetricsEndpoint(opts.host, opts.port, registry, lambda: site_health(state_dir, alive))
    except OSError as exc:
        raise AgentError(
            f"--metrics-port {opts.port}: cannot listen on {opts.host}:{opts.port} ({exc.strerror or exc}); "
            "pick a free port"
        ) from None


def run_site_agent(
    state_dir: Path,
    supernode: list[str],
    *,
    release: SupernodeOptions | None = None,
    ready_timeout: float = 600.0,
    metrics: MetricsOptions | None = None,
) -> int:
    """Start the warm worker and the SuperNode; stop both when either stops.

    One supervisor for both, so that systemd or compose restarts them together: a SuperNode without its worker
    could only fail its tasks, and a worker without a SuperNode gets none. Both start at once: the SuperNode
    rejoins within seconds while the worker imports torch and the model; a task that arrives before the worker
    is ready waits for it in the relay. `release`: first release the node this site had before a crash.
    `metrics`: also serve `/metrics` and `/healthz` (see `site_metrics`) until the agent stops.
    """
    worker_dir(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = (worker_dir(state_dir) / "agent.lock").open("w")  # held until this process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"fedtune client start: another agent already runs the site in {state_dir}", file=sys.stderr)
        return 1
    children: dict[str, ManagedProcess] = {}
    endpoint: MetricsEndpoint | None = None
    if metrics is not None:
        try:
            endpoint = _metrics_endpoint(state_dir, metrics, lambda: {n: p.alive() for n, p in children.items()})
        except AgentError as exc:
            print(f"fedtune client start: {exc}", file=sys.stderr)
            return 2
    node_file = node_id_path(state_dir)
    if release is not None and node_file.is_file() and release_node(release, int(node_file.read_text())):
        print("fedtune client start: released this site's node left online by an earlier start", file=sys.stderr)
    # the SuperNode first: rejoining is its activation, and the worker's imports would slow its start
    running = [ManagedProcess(supernode, None, env=supernode_env(state_dir))]
    worker = ManagedProcess(worker_command(state_dir), None, env=child_env())
    running.append(worker)
    children.update(supernode=running[0], worker=worker)
    if endpoint is not None:
        endpoint.start()

    def stop(signum: int, _frame: object) -> None:
        sys.exit(128 + signum)  # the finally block below stops both processes

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        wait_ready(socket_path(state_dir), ready_timeout, alive=worker.alive)
        while all(proc.alive() for proc in running):
            time.sleep(0.5)
        ended = next(proc for proc in running if not proc.alive())
        name = "the site worker" if ended is worker else "flower-supernode"
        print(f"fedtune client start: {name} exited with code {ended.proc.returncode}; stopping", file=sys.stderr)
        return ended.proc.returncode or 1
    except WorkerError as exc:
        print(f"fedtune client start: {exc}", file=sys.stderr)
        return 1
    finally:
        if endpoint is not None:
            endpoint.stop()
        for proc in reversed(running):
            proc.stop(grace=10)
