"""The site agent around Flower's `flower-supernode`: keys it needs and the exact command line.

Flower authenticates SuperNodes with a NIST P-384 ECDSA key (OpenSSH format)
whose public half the operator registers; fedtune's secure aggregation uses a
separate Ed25519 identity key pinned by the other sites. Two keys, two trust
relationships: the operator decides who may connect, the sites decide whom
they mask with. Both private keys stay on the site, owner-readable only.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


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


def child_env() -> dict[str, str]:
    """Flower starts `flower-superexec`/`flwr-clientapp` by name, so this venv's bin must lead PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


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


def supernode_command(opts: SupernodeOptions) -> list[str]:
    """The `flower-supernode` invocation for this site; refuses combinations Flower would misuse."""
    site_config = Path(opts.site_config).resolve()
    if '"' in str(site_config):
        raise AgentError(f"{site_config}: the site config path must not contain double quotes")
    cmd = [flower_executable("flower-supernode"), "--superlink", opts.superlink]
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
