"""`fedtune server ...` (certificates, SuperLink, site registration, signing keys) and `fedtune run`.

The operator's commands wrap Flower's deployment engine: `flower-superlink`
for the server, Flower's Control API for registering sites and starting runs.
Anything that would weaken security (no TLS, unsigned apps) must be asked for
explicitly and is announced loudly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel

from fedtune.client.agent import AgentError
from fedtune.common.processes import child_env
from fedtune.common.terminal import error_line

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)

Superlink = Annotated[str, typer.Option(help="SuperLink address HOST:PORT (its HTTPS API).")]
RootCerts = Annotated[Path | None, typer.Option(help="The federation CA (ca.pem) to verify the SuperLink.")]
Insecure = Annotated[bool, typer.Option(help="No TLS. Local experiments only.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(error_line(message))
    return typer.Exit(code)


def _insecure_banner(what: str) -> None:
    err_console.print(
        Panel(
            f"[bold]--insecure[/bold]: {what} WITHOUT TLS. Updates, keys and metrics travel in the clear and "
            "sites cannot authenticate the server; SuperNode authentication is off. Never use this with real data.",
            title="[bold red]WARNING: INSECURE",
            border_style="red",
        )
    )


@app.command()
def certs(
    out: Annotated[Path, typer.Argument(help="Folder for ca.pem, ca.key, server.pem, server.key.")],
    san: Annotated[
        list[str] | None,
        typer.Option(
            help="Host name or IP sites dial (repeat); 127.0.0.1 and localhost are always added (the SuperLink "
            "dials itself)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 825,
    force: Annotated[bool, typer.Option(help="Replace an existing CA and certificate.")] = False,
) -> None:
    """Create the federation CA and the SuperLink's TLS certificate (ECDSA P-384) with `cryptography`."""
    from fedtune.server.certs import DEFAULT_SANS, certificate_sans, create_certificates

    try:
        paths = create_certificates(out, san or list(DEFAULT_SANS), days=days, overwrite=force)
    except (FileExistsError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]CA[/green]      {paths.ca_cert}  (give this file to every site)")
    console.print(f"[green]CA key[/green]  {paths.ca_key}  (keep offline; mode 0600)")
    console.print(
        f"[green]server[/green]  {paths.server_cert} + {paths.server_key} "
        f"for: {', '.join(certificate_sans(paths.server_cert))}"
    )


@app.command()
def start(
    database: Annotated[Path, typer.Option(help="SQLite file for the SuperLink's state.")] = Path(
        ".fedtune/superlink.sqlite"
    ),
    certs_dir: Annotated[
        Path | None, typer.Option("--certs", help="Folder from `fedtune server certs` (ca.pem, server.pem/.key).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="HTTPS port for sites (Fleet) and operators (Control).")] = 9093,
    site_auth: Annotated[bool, typer.Option(help="Accept only registered sites (SuperNode auth).")] = True,
    insecure: Insecure = False,
    dry_run: Annotated[bool, typer.Option(help="Print the flower-superlink command and exit.")] = False,
) -> None:
    """Run the SuperLink (flower-superlink) with TLS, SuperNode authentication and a SQLite database."""
    from fedtune.server.processes import SuperlinkOptions, superlink_command

    if insecure:
        _insecure_banner("the SuperLink accepts connections")
        site_auth = False
    elif certs_dir is None:
        raise _fail("TLS is required: pass --certs DIR (create it with `fedtune server certs DIR`), or --insecure")
    d = Path(certs_dir) if certs_dir else None
    try:
        cmd = superlink_command(
            SuperlinkOptions(
                database=database,
                host=host,
                port=port,
                ca_cert=d / "ca.pem" if d else None,
                server_cert=d / "server.pem" if d else None,
                server_key=d / "server.key" if d else None,
                insecure=insecure,
                supernode_auth=site_auth,
            )
        )
    except AgentError as exc:
        raise _fail(str(exc)) from None
    if not site_auth and not insecure:
        err_console.print("[yellow]warning:[/yellow] site authentication OFF: any SuperNode may join")
    if dry_run:
        print(json.dumps(cmd))
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    console.print(f"SuperLink on {host}:{port} ({'INSECURE' if insecure else 'TLS'}), state in {database}")
    os.execve(cmd[0], cmd, child_env())


@app.command("register-site")
def register_site(
    name: Annotated[str, typer.Argument(help="The site's name (as in its site.toml).")],
    public_key: Annotated[Path, typer.Argument(help="The site's supernode-auth.pub (from `fedtune client init`).")],
    superlink: Superlink = "127.0.0.1:9093",
    root_certificates: RootCerts = None,
) -> None:
    """Allow a site to connect: registers its SuperNode auth key (what `flwr supernode register` does)."""
    from fedtune.server.submit import Connection, ControlError, register_node

    try:
        node_id = register_node(Connection(superlink, root_certificates), public_key, name)
    except (ControlError, Exception) as exc:  # Flower raises click exceptions for bad key files
        raise _fail(f"could not register {name}: {exc}") from None
    console.print(f"[green]registered[/green] site {name} as SuperNode {node_id}")


@app.command("signing-key")
def signing_key(
    path: Annotated[Path, typer.Argument(help="Where to write the Ed25519 app-signing key (PATH and PATH.pub).")],
    trusted_out: Annotated[
        Path | None, typer.Option(help="Also write the trusted-entities YAML that sites pass to `client start`.")
    ] = None,
) -> None:
    """Create the operator's app-signing key; sites trust its public half (`--trusted-entities`)."""
    from fedtune.server.appbundle import BundleError, generate_signing_key, read_public_ssh, trusted_entities_yaml

    try:
        private, public = generate_signing_key(path)
    except BundleError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]signing key[/green] {private} (0600), public {public}")
    if trusted_out is not None:
        trusted_out.write_text(trusted_entities_yaml([read_public_ssh(public)]))
        console.print(f"[green]trusted entities[/green] {trusted_out} (send to every site)")


def run_command(
    federation: Annotated[Path, typer.Argument(help="The federation TOML.")],
    superlink: Superlink = "127.0.0.1:9093",
    root_certificates: RootCerts = None,
    signing_key: Annotated[Path | None, typer.Option(help="Operator's Ed25519 app-signing key (OpenSSH).")] = None,
    database: Annotated[
        Path | None, typer.Option(help="The SuperLink's SQLite file (to store the signed bundle).")
    ] = None,
    unsigned: Annotated[bool, typer.Option(help="Submit without a signature (sites with trust lists refuse).")] = False,
    insecure: Insecure = False,
    follow: Annotated[bool, typer.Option(help="Stream the run's progress until it ends.")] = True,
    resume: Annotated[
        str | None, typer.Option(help="Continue this run from the run store after its last completed round.")
    ] = None,
) -> None:
    """Sign the federation's app bundle, submit it to the SuperLink and stream progress."""
    from fedtune.common.config import ConfigError
    from fedtune.server.appbundle import BundleError, build_bundle, load_signing_key, sign_bundle, store_signed_bundle
    from fedtune.server.submit import Connection, ControlError, run_state, start_run, stream_logs

    if insecure:
        _insecure_banner("the run is submitted")
    if not unsigned and (signing_key is None or database is None):
        raise _fail(
            "a signed run needs --signing-key (from `fedtune server signing-key`) and --database (the SuperLink's "
            "SQLite file); pass --unsigned to submit without a signature"
        )
    conn = Connection(superlink, root_certificates, insecure)
    started = time.monotonic()
    try:
        bundle = build_bundle(federation)
        if unsigned:
            err_console.print("[yellow]warning:[/yellow] unsigned app bundle: sites with --trusted-entities refuse it")
        else:
            assert signing_key is not None and database is not None
            store_signed_bundle(database, bundle, sign_bundle(bundle, load_signing_key(signing_key)))
        run_id = start_run(conn, bundle, signed=not unsigned, overrides={"resume": resume} if resume else None)
    except (ConfigError, BundleError, ControlError) as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"run [bold]{run_id}[/bold] started: bundle {bundle.app_id} {bundle.version} sha256 {bundle.sha256[:16]}..."
        f" ({'signed' if not unsigned else 'UNSIGNED'})"
    )
    if not follow:
        return
    problems: list[str] = []

    def emit(text: str) -> None:
        for line in text.splitlines():
            if "[fedtune]" in line:
                msg = line.split("[fedtune]", 1)[1].strip()
                bad = "error" in msg or "without update" in msg
                if bad:
                    problems.append(msg)
                console.print(f"[{'yellow' if bad else 'cyan'}]{msg}")
            elif "ERROR" in line or "Traceback" in line:
                problems.append(line)
                err_console.print(line)

    try:
        stream_logs(conn, run_id, emit)
        state = run_state(conn, run_id)
    except ControlError as exc:
        raise _fail(
            f"{exc}\nThe run store keeps every completed round: once the SuperLink is back, continue with "
            f"`fedtune run {federation} --resume {resume or run_id}` (and the same options)."
        ) from None
    wall = time.monotonic() - started
    console.print(f"run {run_id}: {state.status}/{state.sub_status or '-'} after {wall:.1f}s")
    if state.sub_status != "completed" or problems:
        raise _fail(f"run {run_id} did not complete cleanly{': ' + state.details if state.details else ''}", 1)
