"""The operator's `flower-superlink` command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedtune.client.agent import AgentError, flower_executable


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
