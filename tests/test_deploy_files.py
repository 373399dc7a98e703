"""deploy/ can't run here (no Docker, no systemd): check that it parses and points at real things.

Every `fedtune ...` invocation in a Dockerfile, the compose file or the systemd unit must name an existing
command and only options that command accepts, and every COPY source must exist.
Also: certificates, the SuperLink command line, app-bundle signing as Flower verifies it, the ServerApp's
federation loader.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import socket
import ssl
import stat
import threading
from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _fedtune_command() -> click.Group:
    from fedtune.cli import app

    return typer.main.get_command(app)


def _check_invocation(argv: list[str]) -> None:
    """argv starts after `fedtune`; every --option must belong to the resolved sub-command."""
    cmd: click.Command = _fedtune_command()
    args = list(argv)
    while isinstance(cmd, click.Group):
        name = args.pop(0)
        assert name in cmd.commands, f"`fedtune ... {name}` is not a command (have {sorted(cmd.commands)})"
        cmd = cmd.commands[name]
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    for token in args:
        if token.startswith("--"):
            assert token.split("=")[0] in known, f"{cmd.name}: unknown option {token} (known: {sorted(known)})"


def _dockerfile(name: str) -> dict[str, list]:
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    out: dict[str, list] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        out.setdefault(instr.upper(), []).append(rest.strip())
    return out


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.site"])
def test_dockerfile_copies_existing_paths_and_runs_real_commands(name: str) -> None:
    d = _dockerfile(name)
    assert d["FROM"][0].startswith("python:3.11")
    for copy in d["COPY"]:
        *sources, _dest = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist in the build context"
    assert any("pip install" in r and "[" in r for r in d["RUN"]), "the image must install fedtune with an extra"
    assert "USER" in d and d["USER"][0] != "root"
    entry = json.loads(d["ENTRYPOINT"][0])
    cmd = json.loads(d["CMD"][0])
    assert entry[0] == "fedtune"
    _check_invocation(entry[1:] + cmd)


def test_compose_services_images_and_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"superlink", "console", "bank", "hospital"} <= set(services)
    images = {}
    for _name, svc in services.items():
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
            images[svc["image"]] = svc["build"]["dockerfile"]
    for _name, svc in services.items():
        dockerfile = images[svc["image"]]
        d = _dockerfile(Path(dockerfile).name)
        entry = svc.get("entrypoint") or json.loads(d["ENTRYPOINT"][0])
        assert entry[0] == "fedtune"
        _check_invocation(entry[1:] + svc.get("command", []))
    for site in ("bank", "hospital"):
        cmd = services[site]["command"]
        assert "--root-certificates" in cmd and "--trusted-entities" in cmd and "--insecure" not in cmd
    assert "--certs" in services["superlink"]["command"]
    assert "9093:9093" in services["superlink"]["ports"]


def test_systemd_unit_has_sections_and_valid_commands() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(DEPLOY / "fedtune-site.service")
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    svc = unit["Service"]
    assert svc["User"] == "fedtune" and svc["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]
    for key in ("ExecStartPre", "ExecStart"):
        argv = shlex.split(svc[key])
        assert argv[0].endswith("/fedtune")
        _check_invocation([a for a in argv[1:] if not a.startswith("${")])
    assert "--root-certificates" in svc["ExecStart"] and "--trusted-entities" in svc["ExecStart"]


def test_deploy_md_mentions_every_step() -> None:
    text = (DEPLOY / "DEPLOY.md").read_text()
    for needle in ("fedtune server certs", "fedtune server start", "fedtune server register-site", "fedtune run",
                   "fedtune client init", "fedtune client check", "fedtune client start", "fedtune client status",
                   "fedtune client audit", "fedtune server signing-key"):  # fmt: skip
        assert needle in text, needle
    for match in re.finditer(r"^\s*fedtune (client|server) ([a-z-]+)", text, re.MULTILINE):
        _check_invocation([match.group(1), match.group(2)])


def test_certificates_chain_sans_and_key_modes(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedtune.server.certs import certificate_sans, create_certificates

    paths = create_certificates(tmp_path, ["fed.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    assert server.issuer == ca.subject
    # the operator's names, plus loopback: the SuperLink's own SuperExec dials it on 127.0.0.1
    assert set(certificate_sans(paths.server_cert)) == {"fed.example.org", "10.1.2.3", "127.0.0.1", "localhost"}
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_certificates(tmp_path)
    for days in (0, -5):  # an already expired certificate is refused, not issued
        with pytest.raises(ValueError, match="already expired"):
            create_certificates(tmp_path / f"d{days}", days=days)
        assert not (tmp_path / f"d{days}" / "server.pem").exists()


def test_superlink_command_requires_full_tls(tmp_path: Path) -> None:
    from fedtune.client.agent import AgentError
    from fedtune.server.certs import create_certificates
    from fedtune.server.processes import SuperlinkOptions, superlink_command

    with pytest.raises(AgentError, match="TLS needs"):
        superlink_command(SuperlinkOptions(database=tmp_path / "db"))
    with pytest.raises(AgentError, match="needs TLS"):
        superlink_command(SuperlinkOptions(database=tmp_path / "db", insecure=True))
    p = create_certificates(tmp_path / "c")
    cmd = superlink_command(
        SuperlinkOptions(
            database=tmp_path / "db", ca_cert=p.ca_cert, server_cert=p.server_cert, server_key=p.server_key
        )
    )
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--database") + 1] == str((tmp_path / "db").resolve())


def test_server_start_refuses_without_tls_and_warns_when_insecure(tmp_path: Path) -> None:
    from fedtune.server.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["start", "--database", str(tmp_path / "db"), "--dry-run"])
    assert refused.exit_code == 2 and "TLS is required" in refused.output
    loud = runner.invoke(app, ["start", "--database", str(tmp_path / "db"), "--insecure", "--dry-run"])
    assert loud.exit_code == 0 and "INSECURE" in loud.output
    assert "--insecure" in json.loads(loud.output.strip().splitlines()[-1])


def test_bundle_signature_is_what_flower_supernodes_verify(tmp_path: Path, tiny_spec) -> None:
    import tomli_w
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    from fedtune.server.appbundle import (
        build_bundle,
        generate_signing_key,
        key_id,
        load_signing_key,
        read_public_ssh,
        sign_bundle,
        trusted_entities_yaml,
    )

    fed = tmp_path / "federation.toml"
    fed.write_text(tomli_w.dumps(tiny_spec.model_dump(mode="json", exclude_none=True)))
    bundle = build_bundle(fed)
    assert bundle.app_id == "@fedtune/fedtune"
    operator, operator_pub = generate_signing_key(tmp_path / "operator")
    rogue, _ = generate_signing_key(tmp_path / "rogue")
    trusted = yaml.safe_load(trusted_entities_yaml([read_public_ssh(operator_pub)]))
    assert list(trusted) == [key_id(read_public_ssh(operator_pub))]
    good = sign_bundle(bundle, load_signing_key(operator))
    assert _verify_fab(Fab(bundle.sha256, bundle.content, good), trusted)
    assert not _verify_fab(Fab(bundle.sha256, bundle.content, sign_bundle(bundle, load_signing_key(rogue))), trusted)
    tampered = bundle.content.replace(b"fedtune", b"fedtunf", 1)
    assert not _verify_fab(Fab(bundle.sha256, tampered, good), trusted)
    assert stat.S_IMODE(operator.stat().st_mode) == 0o600


def test_server_app_reads_federation_from_path_or_inline(tmp_path: Path, tiny_spec) -> None:
    import tomli_w

    from fedtune.common.config import ConfigError
    from fedtune.server.appbundle import federation_toml
    from fedtune.server.server_app import spec_from_run_config

    path = tmp_path / "federation.toml"
    path.write_text(tomli_w.dumps(tiny_spec.model_dump(mode="json", exclude_none=True)))
    assert spec_from_run_config(str(path)).name == "tiny"
    inline = spec_from_run_config(federation_toml(tiny_spec))
    assert inline.base_model.path == Path(tiny_spec.base_model.path).resolve()
    with pytest.raises(ConfigError, match="federation"):
        spec_from_run_config("")
    with pytest.raises(ConfigError, match="invalid federation"):
        spec_from_run_config("name = 'x'\n[task]\nkind = 'nope'\n")


def test_bundle_declares_the_resume_key_so_fedtune_run_can_override_it(tmp_path, tiny_spec):
    """Flower refuses override keys an app does not declare; `fedtune run --resume` relies on this one."""
    import io
    import tomllib
    import zipfile

    from fedtune.server.appbundle import build_bundle, federation_toml

    fed = tmp_path / "federation.toml"
    fed.write_text(federation_toml(tiny_spec))
    bundle = build_bundle(fed)
    with zipfile.ZipFile(io.BytesIO(bundle.content)) as fab:
        config = tomllib.loads(fab.read("pyproject.toml").decode())["tool"]["flwr"]["app"]["config"]
    assert config["resume"] == ""
    assert tomllib.loads(config["federation"])["name"] == tiny_spec.name


def _serve_tls(cert: Path, key: Path) -> tuple[str, threading.Thread]:
    """A real TLS listener on loopback presenting `cert`, for as long as one handshake takes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))

    def accept_once() -> None:
        with sock:
            conn, _ = sock.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=accept_once, daemon=True)
    thread.start()
    return f"127.0.0.1:{sock.getsockname()[1]}", thread


def test_client_check_chains_the_superlink_certificate_to_the_pinned_ca(tmp_path: Path) -> None:
    """Same subject, other CA: refused. Right CA: accepted. A CA near expiry warns; an expired one is an error."""
    from fedtune.client.checks import CheckReport, check_tls
    from fedtune.server.certs import create_certificates

    real = create_certificates(tmp_path / "real", ["127.0.0.1"])
    impostor = create_certificates(tmp_path / "impostor", ["127.0.0.1"], days=10)
    for served, expect in ((real, "ok"), (impostor, "error")):
        address, thread = _serve_tls(served.server_cert, served.server_key)
        report = CheckReport()
        check_tls(real.ca_cert, None, report, superlink=address)
        thread.join(10)
        chain = [f for f in report.findings if f.topic == "tls" and address in f.message]
        assert [f.level for f in chain] == [expect], report.findings
    report = CheckReport()
    check_tls(impostor.ca_cert, None, report)
    assert any(f.level == "warn" and "expires on" in f.message for f in report.findings)

    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "old CA")])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    old = (
        x509.CertificateBuilder(subject_name=name, issuer_name=name, public_key=key.public_key(), serial_number=1)
        .not_valid_before(past - dt.timedelta(days=1))
        .not_valid_after(past)
        .sign(key, hashes.SHA256())
    )
    expired = tmp_path / "expired.pem"
    expired.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    report = CheckReport()
    check_tls(expired, None, report)
    assert any(f.level == "error" and "not valid now" in f.message for f in report.findings)


def test_a_site_runs_only_code_free_bundles_that_name_fedtune_s_client_app(tmp_path, tiny_spec):
    """Review round 6: the worker installed the operator-signed bundle and imported its ClientApp, with the bundle's
    folder first on sys.path, so a bundle could run its own code at the site or shadow OpenDP (no noise). The
    worker now runs the installed fedtune, and refuses a bundle with any file but pyproject.toml or naming
    another ClientApp; fedtune's own bundle passes."""
    import hashlib
    import io
    import tomllib
    import zipfile
    from types import SimpleNamespace

    import tomli_w
    from flwr.cli.build import build_fab_from_files

    from fedtune.client.worker import WorkerError, _check_bundle
    from fedtune.server.appbundle import build_bundle, federation_toml

    def fab(content: bytes, named: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(content=content, hash_str=named or hashlib.sha256(content).hexdigest())

    fed = tmp_path / "federation.toml"
    fed.write_text(federation_toml(tiny_spec))
    ours = build_bundle(fed).content
    _check_bundle(fab(ours))
    with zipfile.ZipFile(io.BytesIO(ours)) as bundle:
        pyproject = tomllib.loads(bundle.read("pyproject.toml").decode())
    shadow = build_fab_from_files(
        {"pyproject.toml": tomli_w.dumps(pyproject).encode(), "opendp/__init__.py": b"print('no noise')\n"}
    )[0]
    with pytest.raises(WorkerError, match=r"holds only pyproject\.toml"):
        _check_bundle(fab(shadow))
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "evil:app"
    other = build_fab_from_files({"pyproject.toml": tomli_w.dumps(pyproject).encode()})[0]
    with pytest.raises(WorkerError, match="names ClientApp 'evil:app'"):
        _check_bundle(fab(other))
    with pytest.raises(WorkerError, match="the SuperNode named"):
        _check_bundle(fab(ours, named="0" * 64))
