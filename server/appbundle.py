"""Flower App Bundles (FABs) for a federation: built, signed, registered, started.

Why the bundle carries no Python code: every site runs the fedtune version its
IT department installed and reviewed (`fedtune[client]`); the bundle only
names the entry points and pins the federation spec (model fingerprint, task,
privacy settings) as run config. A bundle that shipped its own `fedtune/`
folder would also shadow the installed package on the site.

Why signing goes through the SuperLink's state: Flower 1.42 SuperNodes with
`--trusted-entities` accept only FABs whose `verifications` carry an Ed25519
signature by a trusted key (over SHA-256(FAB) and a timestamp), but the
SuperLink's `StartRun` drops the verifications of a FAB submitted by content
(they normally come from Flower Hub). For a stored app, however, it keeps the
verifications recorded with it. So the operator signs the bundle here, stores
it in the SuperLink's own database through Flower's state API, and starts the
run by hash. The sites then verify the signature themselves: a SuperLink that
altered the bundle or the signature would be refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.client.worker import CLIENTAPP
from fedtune.common.config import FederationSpec, load_federation

PUBLISHER = "fedtune"
APP_NAME = "fedtune"
SERVERAPP = "fedtune.server.server_app:app"
VALID_LICENSE = "valid_license"  # the SuperNode refuses verifications without this marker


class BundleError(RuntimeError):
    """The app bundle cannot be built, signed or submitted; the message says what to fix."""


@dataclass(frozen=True)
class Bundle:
    content: bytes
    sha256: str
    app_id: str  # "@publisher/name", how the SuperLink keys stored apps
    version: str


def federation_toml(spec: FederationSpec) -> str:
    """The spec as TOML with absolute paths, suitable for the run config (and readable in the bundle)."""
    data = spec.model_dump(mode="json", exclude_none=True)
    data["base_model"]["path"] = str(Path(spec.base_model.path).resolve())
    data["output_dir"] = str(Path(spec.output_dir).resolve())
    return tomli_w.dumps(data)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fedtune")
    except Exception:  # not installed as a distribution: a source checkout
        return "0.0.0"


def build_bundle(federation: Path) -> Bundle:
    """A code-free FAB: pyproject.toml naming fedtune's ServerApp/ClientApp, with the federation inlined."""
    from flwr.cli.build import build_fab_from_files

    spec = load_federation(federation)
    version = _version()
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": version,
            "description": f"fedtune federation {spec.name}: DP-LoRA with secure aggregation",
            "license": "Apache-2.0",
            "dependencies": [f"fedtune[client]=={version}"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP},
                    # `resume` names a run in the operator's run store to continue (`fedtune run --resume`).
                    "config": {"federation": federation_toml(spec), "resume": ""},
                }
            }
        },
    }
    content, _ = build_fab_from_files({"pyproject.toml": tomli_w.dumps(pyproject).encode()})
    return Bundle(content, hashlib.sha256(content).hexdigest(), f"@{PUBLISHER}/{APP_NAME}", version)


# -- signing keys (OpenSSH Ed25519, the format Flower's --trusted-entities expects) ---------------


def generate_signing_key(path: Path, *, comment: str = "fedtune-operator") -> tuple[Path, Path]:
    """Create the operator's app-signing key (`path`, 0600) and `path.pub` (OpenSSH one-liner)."""
    path = Path(path)
    if path.exists():
        raise BundleError(f"{path} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    pub = path.with_name(path.name + ".pub")
    pub.write_text(public_ssh(key.public_key()) + f" {comment}\n")
    return path, pub


def public_ssh(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise BundleError(f"{path}: signing key not found; create one with `fedtune server signing-key`") from None
    except ValueError as exc:
        raise BundleError(f"{path}: not an OpenSSH private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: Flower verifies app signatures with Ed25519 keys only")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    """Stable id for a signing key: sites list it in their trusted-entities file."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:24]


def trusted_entities_yaml(public_keys: list[Ed25519PublicKey]) -> str:
    """The `--trusted-entities` file for a site that trusts these signers."""
    import yaml

    return yaml.safe_dump({key_id(k): public_ssh(k) for k in public_keys}, sort_keys=True)


def read_public_ssh(path: Path) -> Ed25519PublicKey:
    key = serialization.load_ssh_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def sign_bundle(bundle: Bundle, key: Ed25519PrivateKey, *, signed_at: int | None = None) -> dict[str, str]:
    """Verifications in the exact form the SuperNode checks: sign(timestamp_be64 || SHA-256(FAB))."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    signed_at = int(time.time()) if signed_at is None else signed_at
    digest = hashlib.sha256(bundle.content).digest()
    signature = key.sign(create_message_to_sign(digest, signed_at))
    b64 = base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
    return {
        key_id(key.public_key()): json.dumps({"signature": b64, "signed_at": signed_at}),
        VALID_LICENSE: "Valid",
    }


def store_signed_bundle(database: Path, bundle: Bundle, verifications: dict[str, str]) -> None:
    """Record the signed bundle in the SuperLink's SQLite state, as Flower does for a Hub app."""
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.supercore.fab import Fab
    from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

    database = Path(database)
    if not database.is_file():
        raise BundleError(
            f"{database}: SuperLink database not found; pass the file given to `fedtune server start --database`"
        )
    _, factory = get_objectstore_linkstate_factories(str(database), get_federation_manager())
    state = factory.state()
    state.store_app(
        fab=Fab(bundle.sha256, bundle.content, verifications),
        federation_id=NOOP_FEDERATION_ID,
        app_id=bundle.app_id,
        app_type=TaskType.SERVER_APP,
        added_by=NOOP_FLWR_AID,
    )
    stored = state.get_app(NOOP_FEDERATION_ID, bundle.app_id, bundle.sha256)
    if stored is None or stored.verifications != verifications:
        raise BundleError("the SuperLink database did not keep the bundle's signature; is this Flower 1.42?")
