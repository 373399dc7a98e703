"""A real federation on 127.0.0.1 for the deployment tests: SuperLink, sites, keys, certificates.

Every process is started in its own process group by `ManagedProcess` and
stopped (with all its Flower helpers) by `Federation.close`, even when a test
fails half-way.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedtune.client.agent import generate_node_auth_key
from fedtune.common.config import DataSpec, FederationSpec, SiteSpec
from fedtune.common.processes import ManagedProcess, free_port, wait_for_port
from fedtune.common.secagg.keys import generate_identity_key, public_key_to_hex, save_identity_key
from fedtune.server.appbundle import (
    generate_signing_key,
    read_public_ssh,
    trusted_entities_yaml,
)
from fedtune.server.certs import create_certificates
from fedtune.server.processes import SuperlinkOptions, superlink_command
from fedtune.server.submit import Connection, online_nodes, register_node


@dataclass
class SiteHandle:
    name: str
    dir: Path
    config: Path
    state: Path
    runtime_port: int
    process: ManagedProcess | None = None
    starts: int = 0
    node_id: int | None = None

    @property
    def egress(self) -> Path:
        return self.state / "egress.jsonl"

    @property
    def ledger(self) -> Path:
        return self.state / "ledger.sqlite"


@dataclass
class Federation:
    root: Path
    port: int
    certs: Path
    database: Path
    signing_key: Path
    trusted: Path
    superlink: ManagedProcess
    sites: dict[str, SiteHandle] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def conn(self) -> Connection:
        return Connection(self.address, self.certs / "ca.pem")

    def add_site(self, name: str, train: Path, *, epsilon_cap: float | None = None) -> SiteHandle:
        d = self.root / "sites" / name
        state = d / "state"
        save_identity_key(generate_identity_key(), state / "identity.pem")
        generate_node_auth_key(state)
        handle = SiteHandle(name, d, d / "site.toml", state, free_port())
        self.sites[name] = handle
        spec = {"name": name, "state_dir": str(state), "data": {"train": str(train)}, "device": "cpu"}
        if epsilon_cap is not None:
            spec["epsilon_cap"] = epsilon_cap
        handle.config.write_text(tomli_w.dumps(spec))
        return handle

    def pin_peers(self, **site_settings: object) -> None:
        """Every site pins every site's identity key (the out-of-band exchange); `site_settings` go into every
        site's file too (e.g. a lower threshold floor a test's federation relies on)."""
        from fedtune.common.secagg.keys import load_identity_key

        peers = {n: public_key_to_hex(load_identity_key(s.state / "identity.pem")) for n, s in self.sites.items()}
        for s in self.sites.values():
            import tomllib

            data = tomllib.loads(s.config.read_text())
            data["peers"] = peers
            # a federation of two: each site accepts sums of two, knowing the other learns its update from the sum
            data["min_round_sites"] = max(2, min(3, len(self.sites)))
            data.update(site_settings)
            s.config.write_text(tomli_w.dumps(data))
            SiteSpec.model_validate({**data, "data": DataSpec(**data["data"])})

    def register(self, name: str) -> int:
        node_id = register_node(self.conn, self.sites[name].state / "supernode-auth.pub", name)
        self.sites[name].node_id = node_id
        return node_id

    def wait_status(self, name: str, status: str, timeout: float) -> None:
        """Wait until the SuperLink reports this site's node in `status` (e.g. offline after a kill)."""
        deadline = time.monotonic() + timeout
        while online_nodes(self.conn).get(self.sites[name].node_id) != status:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not {status} after {timeout:.0f}s")
            time.sleep(2.0)

    def start_site(
        self, name: str, *, trusted: Path | None = None, root_certificates: Path | None = None, **overrides: object
    ) -> ManagedProcess:
        """The site agent as an operator's site runs it: `fedtune client start` (warm worker + SuperNode)."""
        s = self.sites[name]
        cmd = [str(Path(sys.executable).parent / "fedtune"), "client", "start", str(s.config)]
        cmd += ["--superlink", self.address, "--root-certificates", str(root_certificates or self.certs / "ca.pem")]
        cmd += ["--auth-key", str(s.state / "supernode-auth"), "--runtime-port", str(s.runtime_port)]
        cmd += ["--trusted-entities", str(trusted if trusted is not None else self.trusted)]
        for flag, value in overrides.items():
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
        s.starts += 1
        env = _env(s.dir / "flwr-home")
        s.process = ManagedProcess(cmd, s.dir / f"supernode-{s.starts}.log", cwd=s.dir, env=env)
        return s.process

    def wait_online(self, count: int, timeout: float = 90.0) -> dict[int, str]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = online_nodes(self.conn)
            if sum(1 for v in nodes.values() if v == "online") >= count:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {nodes} after {timeout:.0f}s; logs in {self.root}")
            time.sleep(1.0)

    def close(self) -> None:
        for s in self.sites.values():
            if s.process is not None:
                s.process.stop(grace=5)
        self.superlink.stop(grace=5)


def _env(flwr_home: Path) -> dict[str, str]:
    from fedtune.common.processes import child_env

    env = child_env()
    env["FLWR_HOME"] = str(flwr_home)  # each party keeps its own Flower state, as on separate machines
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"  # two sites and a server share a 2-core test machine
    env["MKL_NUM_THREADS"] = "1"
    return env


def start_superlink(root: Path) -> Federation:
    root.mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    create_certificates(certs, ["127.0.0.1", "localhost"])
    port = free_port()
    database = root / "superlink.sqlite"
    cmd = superlink_command(
        SuperlinkOptions(
            database=database,
            host="127.0.0.1",
            port=port,
            ca_cert=certs / "ca.pem",
            server_cert=certs / "server.pem",
            server_key=certs / "server.key",
        )
    )
    proc = ManagedProcess(cmd, root / "superlink.log", cwd=root, env=_env(root / "flwr-home-server"))
    signing, signing_pub = generate_signing_key(root / "operator-signing")
    trusted = root / "trusted-entities.yaml"
    trusted.write_text(trusted_entities_yaml([read_public_ssh(signing_pub)]))
    fed = Federation(root, port, certs, database, signing, trusted, proc)
    try:
        wait_for_port("127.0.0.1", port, timeout=60, proc=proc.proc)
        if not proc.wait_for_log("Application startup complete", timeout=60):
            raise TimeoutError(f"SuperLink did not start; see {proc.log_path}")
    except Exception:
        fed.close()
        raise
    return fed


def write_federation(path: Path, spec: FederationSpec) -> Path:
    data = spec.model_dump(mode="json", exclude_none=True)
    path.write_text(tomli_w.dumps(data))
    return path
