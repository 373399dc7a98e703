"""`fedtune client ...`: the site agent's commands (init, check, start, status, audit, ledger).

Needs only `fedtune[client]`. Every command reads the site config, so a site
administrator works with one file; errors say which file and what to change.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from fedtune.client.agent import (
    AgentError,
    MetricsOptions,
    SupernodeOptions,
    generate_node_auth_key,
    run_site_agent,
    supernode_command,
)
from fedtune.common.config import ConfigError, FederationSpec, SiteSpec, load_federation, load_site
from fedtune.common.terminal import error_line

if TYPE_CHECKING:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.privacy import Accountant

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
ledger_app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Verify, back up and restore the privacy ledger (STATE_DIR/ledger.sqlite). Stop the agent first to restore.",
)
app.add_typer(ledger_app, name="ledger")
console = Console()
err_console = Console(stderr=True)

SiteArg = Annotated[Path, typer.Argument(help="The site config TOML (from `fedtune client init`).")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(error_line(message))
    return typer.Exit(code)


def _site(path: Path) -> SiteSpec:
    try:
        return load_site(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _federation(path: Path | None) -> FederationSpec | None:
    if path is None:
        return None
    try:
        return load_federation(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for site.toml and the state/ folder with the keys.")],
    name: Annotated[str | None, typer.Option(help="Site name (default: the folder name).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing site.toml (keys are never replaced).")] = False,
) -> None:
    """Write a commented site config and create this site's keys; print what to send to the operator."""
    from fedtune.client.site_template import SITE_TEMPLATE
    from fedtune.common.secagg.keys import (
        generate_identity_key,
        load_identity_key,
        public_key_to_hex,
        save_identity_key,
    )

    directory = Path(directory)
    name = name or directory.resolve().name
    config = directory / "site.toml"
    if config.exists() and not force:
        raise _fail(f"{config} already exists; edit it, or pass --force to rewrite it (keys are kept)")
    state = directory / "state"
    identity = state / "identity.pem"
    if identity.exists():
        key = load_identity_key(identity)
    else:
        key = generate_identity_key()
        save_identity_key(key, identity)
    public_hex = public_key_to_hex(key)
    node_private, node_public = generate_node_auth_key(state)
    from fedtune.client.ledger import PrivacyLedger

    PrivacyLedger(state / "ledger.sqlite").close()  # the ledger and its high-water mark exist from day one
    # absolute paths: the file may be copied elsewhere (DEPLOY.md installs it in /etc/fedtune) and still name
    # this folder's state and data
    config.write_text(SITE_TEMPLATE.format(name=name, public_key=public_hex, root=directory.resolve().as_posix()))
    (directory / "data").mkdir(exist_ok=True)
    console.print(f"[green]wrote[/green] {config}  (edit data.train, epsilon_cap and {escape('[peers]')})")
    console.print(f"[green]keys[/green]  {identity} (secure aggregation), {node_private} (SuperNode auth), mode 0600")
    console.print(
        Panel.fit(
            f"[bold]identity public key[/bold] (every site pins it in {escape('[peers]')}):\n{public_hex}\n\n"
            f"[bold]SuperNode auth public key[/bold] (the operator runs `fedtune server register-site {name} "
            f"{node_public.name}`):\n{node_public.read_text().strip()}",
            title=f"send to the operator and the other sites: {name}",
        )
    )


@app.command()
def check(
    site_config: SiteArg,
    federation: Annotated[Path, typer.Option(help="The operator's federation TOML.")],
    root_certificates: Annotated[Path | None, typer.Option(help="The federation CA (ca.pem).")] = None,
    trusted_entities: Annotated[Path | None, typer.Option(help="YAML of app-signing keys this site trusts.")] = None,
    inspect_model: Annotated[bool, typer.Option(help="Load the model to list the shared tensors.")] = True,
    superlink: Annotated[
        str | None, typer.Option(help="HOST:PORT of the SuperLink: check that its certificate is signed by the CA.")
    ] = None,
) -> None:
    """Validate config, data, base model, keys and certificates; show exactly what this site will share."""
    from fedtune.client.checks import EVAL_METRICS, TRAIN_METRICS, run_checks

    site = _site(site_config)
    spec = _federation(federation)
    assert spec is not None
    report = run_checks(
        site,
        spec,
        root_certificates=root_certificates,
        trusted_entities=trusted_entities,
        inspect_model=inspect_model,
        superlink=superlink,
    )
    table = Table(title=f"site {site.name}: checks", show_lines=False)
    table.add_column("", width=2)
    table.add_column("check", style="bold")
    table.add_column("result", overflow="fold")
    marks = {"ok": "[green]✔[/green]", "warn": "[yellow]![/yellow]", "error": "[red]✘[/red]"}
    for f in report.findings:
        table.add_row(marks[f.level], f.topic, f.message)
    console.print(table)
    if report.shares:
        shares = Table(title="what leaves this site each round (besides the metrics below)")
        shares.add_column("tensor", overflow="fold")
        shares.add_column("shape", justify="right")
        shares.add_column("bytes (float32)", justify="right")
        for s in report.shares:
            shares.add_row(s.name, "x".join(map(str, s.shape)), f"{s.nbytes:,}")
        total = sum(s.nbytes for s in report.shares)
        shares.add_row("[bold]total[/bold]", "", f"[bold]{total:,}[/bold]")
        console.print(shares)
        n = sum(s.nbytes // 4 for s in report.shares)
        if spec.secagg.enabled:
            console.print(
                f"secure aggregation on: the delta leaves only masked, as {n:,} uint32 values ({4 * n:,} bytes), "
                "plus signed public keys and encrypted Shamir shares; the server learns only the sum."
            )
        elif site.allow_plaintext:
            console.print("[yellow]secure aggregation OFF: the server sees this site's adapter delta in the clear.")
        else:
            console.print(
                "[yellow]secure aggregation OFF: this site declines every round (its file sets allow_plaintext = "
                "false); ask the operator to enable secagg."
            )
    secure = spec.secagg.enabled
    console.print(f"metrics sent after training: {', '.join(TRAIN_METRICS + (() if secure else ('num-examples',)))}")
    scores_in_sum = secure and site.secure_scores
    if site.share_eval_metrics:
        console.print(f"metrics sent after evaluation: {', '.join(EVAL_METRICS)}, epsilon (exact, no DP noise)")
    console.print(
        "held-out scores in the secure sum: correct, rows, loss (exact totals; once per round trained)"
        if scores_in_sum
        else "held-out scores in the secure sum: none (zeros)"
    )
    if not report.ok:
        errors = sum(1 for f in report.findings if f.level == "error")
        raise _fail(f"{errors} problem(s) found; fix them before `fedtune client start`", 1)
    console.print("[bold green]ready[/bold green]: start with `fedtune client start`")


@app.command()
def start(
    site_config: SiteArg,
    superlink: Annotated[str, typer.Option(help="Operator's SuperLink address, HOST:PORT.")],
    root_certificates: Annotated[Path | None, typer.Option(help="Federation CA (ca.pem) to verify the server.")] = None,
    auth_key: Annotated[
        Path | None, typer.Option(help="SuperNode auth private key; default STATE_DIR/supernode-auth.")
    ] = None,
    trusted_entities: Annotated[
        Path | None, typer.Option(help="YAML of trusted app-signing keys; apps not signed by one are refused.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Plain-text connection. Local experiments only.")] = False,
    runtime_port: Annotated[int, typer.Option(help="Local port of the SuperNode's runtime API.")] = 9094,
    max_wait_time: Annotated[float | None, typer.Option(help="Give up connecting after this many seconds.")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Give up after this many connection attempts.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the flower-supernode command and exit.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve /metrics (Prometheus) and /healthz on this port: epsilon, rounds, bytes sent, health. "
            "Off by default.",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address for --metrics-port; loopback unless the site's monitoring needs more.")
    ] = "127.0.0.1",
) -> None:
    """Run this site: its warm worker and its SuperNode (flower-supernode) with TLS, site authentication and
    app-signature checks. Both stop when either does, so that systemd or compose restarts them together."""
    site = _site(site_config)
    metrics = _metrics_options(metrics_port, metrics_host, site)
    if auth_key is None:
        default = Path(site.state_dir) / "supernode-auth"
        auth_key = default if default.is_file() else None
    if insecure:
        err_console.print(
            Panel(
                "[bold]--insecure[/bold]: NO TLS. Model updates, keys and metrics cross the network in the clear "
                "and the server is not authenticated. Never use this outside a throwaway local test.",
                title="[bold red]WARNING: INSECURE CONNECTION",
                border_style="red",
            )
        )
        auth_key = None  # Flower refuses SuperNode auth without TLS
    if trusted_entities is None:
        err_console.print(
            "[yellow]warning:[/yellow] no --trusted-entities: this site will run any app bundle the SuperLink sends"
        )
    opts = SupernodeOptions(
        site_config=site_config,
        superlink=superlink,
        root_certificates=root_certificates,
        auth_key=auth_key,
        trusted_entities=trusted_entities,
        insecure=insecure,
        runtime_port=runtime_port,
        max_wait_time=max_wait_time,
        max_retries=max_retries,
    )
    try:
        cmd = supernode_command(opts)
    except AgentError as exc:
        raise _fail(str(exc)) from None
    if dry_run:
        print(json.dumps(cmd))
        return
    console.print(f"site [bold]{site.name}[/bold] connecting to {superlink} ({'INSECURE' if insecure else 'TLS'})")
    raise typer.Exit(run_site_agent(Path(site.state_dir), cmd, release=opts, metrics=metrics))


def _metrics_options(port: int | None, host: str, site: SiteSpec) -> MetricsOptions | None:
    """--metrics-port checked before anything starts: the library installed, a warning off loopback."""
    if port is None:
        return None
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise _fail("--metrics-port needs the prometheus-client package: pip install 'fedtune[client]'")
    from fedtune.client.metrics_endpoint import is_loopback

    if not is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/yellow] --metrics-host {escape(host)} is not loopback: /metrics and /healthz have no "
            "token, so let only this site's own monitoring reach that port"
        )
    return MetricsOptions(port=port, host=host, epsilon_cap=site.cap_under(None))


@app.command()
def status(
    site_config: SiteArg,
    federation: Annotated[Path | None, typer.Option(help="Federation TOML, for its default epsilon cap.")] = None,
    rounds: Annotated[int, typer.Option(help="How many recent rounds to list.")] = 10,
) -> None:
    """The privacy ledger (epsilon spent per dataset vs the cap, spends, declines) and the last rounds."""
    from fedtune.client.audit import EgressLog, egress_path
    from fedtune.client.ledger import LedgerError, PrivacyLedger
    from fedtune.common.data import dataset_fingerprint

    site = _site(site_config)
    spec = _federation(federation)
    cap = site.cap_under(spec)
    state = Path(site.state_dir)
    try:
        current = dataset_fingerprint(site.data.train)
    except (OSError, ValueError):
        current = None
    try:
        ledger = PrivacyLedger(state / "ledger.sqlite")
    except LedgerError as exc:
        raise _fail(f"NOT READY, training is refused: {exc}", 1) from None
    with ledger:
        delta = site.privacy_delta if spec is None else min(site.privacy_delta, spec.privacy.target_delta)
        accountant = "prv" if spec is None else spec.privacy.accountant
        everything = ledger.entries()
        distributed = any(e.worst_noise_multiplier is not None for e in everything)  # else: the table as before
        budget = Table(title=f"site {site.name}: privacy budget (epsilon at delta {delta:g})")
        budget.add_column("dataset budget")
        budget.add_column("epsilon spent", justify="right")
        if distributed:
            budget.add_column("epsilon, own share alone", justify="right")
        budget.add_column("delta", justify="right")
        budget.add_column("cap", justify="right")
        budget.add_column("left", justify="right")
        budget.add_column("rounds paid", justify="right")
        for dataset in ledger.datasets():
            entries = ledger.entries(dataset)
            spent = entries[-1].epsilon_after if entries else 0.0
            is_current = current is not None and (dataset == current or current in ledger.sources(dataset))
            label = dataset[:32] + ("  (current train file)" if is_current else "")
            left = f"{max(0.0, cap - spent):.3f}"
            style = "red" if spent >= cap * 0.999 else ""
            budget.add_row(
                label,
                f"[{style}]{spent:.3f}[/{style}]" if style else f"{spent:.3f}",
                *((_worst_epsilon(ledger, dataset, entries[-1].delta, accountant),) if distributed else ()),
                f"{entries[-1].delta:g}" if entries else "-",
                f"{cap:g}",
                left,
                str(len(entries)),
            )
        if not ledger.datasets():
            budget.add_row(current[:16] if current else "-", "0.000", f"{delta:g}", f"{cap:g}", f"{cap:g}", "0")
        console.print(budget)
        if distributed:
            console.print(
                "epsilon spent: charged against the cap, assuming min_honest_sites honest sites in each "
                "distributed-noise sum; own share alone: the epsilon if the server colluded with every other site "
                f"(accountant {accountant})",
                highlight=False,
            )
        console.print(
            f"accounting delta: {delta:g} (site privacy_delta {site.privacy_delta:g}"
            + (f", federation target_delta {spec.privacy.target_delta:g}" if spec else "")
            + "); a federation asking for a delta above privacy_delta is declined"
        )
        if spec is not None and spec.privacy.target_delta > site.privacy_delta:
            console.print(
                f"[red]this federation's target_delta {spec.privacy.target_delta:g} is above privacy_delta "
                f"{site.privacy_delta:g}: its rounds will be declined[/red]"
            )
        spends = Table(title="spends (most recent last)")
        shown = everything[-rounds:]
        own_sigma = any(e.worst_noise_multiplier is not None for e in shown)
        for col in ("run", "round", "sigma", *(("sigma own share alone",) if own_sigma else ()), "q", "steps"):
            spends.add_column(col)
        for col in ("epsilon after", "when"):
            spends.add_column(col)
        for e in shown:
            worst = "-" if e.worst_noise_multiplier is None else f"{e.worst_noise_multiplier:.3f}"
            spends.add_row(
                e.run_id,
                str(e.round),
                f"{e.noise_multiplier:.3f}",
                *((worst,) if own_sigma else ()),
                f"{e.sample_rate:.3f}",
                str(e.steps),
                f"{e.epsilon_after:.3f}",
                _when(e.created),
            )
        console.print(spends)
        declines = ledger.declines()
        if declines:
            table = Table(title="declined rounds")
            for col in ("run", "round", "reason", "when"):
                table.add_column(col, overflow="fold")
            for run, round_, reason, created in declines[-rounds:]:
                table.add_row(run, str(round_), reason, _when(created))
            console.print(table)
    _print_rounds(EgressLog(egress_path(state)).entries(), rounds)


def _worst_epsilon(ledger: PrivacyLedger, budget: str, delta: float, accountant: Accountant) -> str:
    """The budget's epsilon were every distributed-noise spend it composes only this site's own noise share, or "-"
    where none of those spends was distributed (the charged figure is then the only one)."""
    from fedtune.common.privacy import epsilon_spent

    entries = [e for b in ledger.composed(budget) for e in ledger.entries(b)]
    if all(e.worst_noise_multiplier is None for e in entries):
        return "-"
    return f"{epsilon_spent([e.worst_spend for e in entries], delta, accountant):.3f}"


def _print_rounds(entries: list, limit: int) -> None:
    per_round: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    last_seen: dict[tuple[str, int], float] = {}
    for e in entries:
        if e.delivered is False:  # prepared, never taken by the SuperNode: it did not leave
            continue
        per_round[(e.run, e.round)][e.kind] += e.bytes
        last_seen[(e.run, e.round)] = e.time
    table = Table(title="last rounds (from the egress audit log)")
    for col in ("run", "round", "bytes sent", "what", "last message"):
        table.add_column(col, overflow="fold")
    for key in sorted(per_round, key=lambda k: last_seen[k])[-limit:]:
        kinds = per_round[key]
        table.add_row(
            key[0],
            str(key[1]),
            f"{sum(kinds.values()):,}",
            ", ".join(sorted(kinds)),
            _when(last_seen[key]),
        )
    console.print(table)


@app.command()
def audit(
    site_config: SiteArg,
    run: Annotated[str | None, typer.Option(help="Only this run id.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to print (0 = all); verification always covers all.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary on stdout.")] = False,
) -> None:
    """Print the egress log and verify that only allowed kinds of data ever left this site (exit 1 if not)."""
    from fedtune.client.audit import ALLOWED_KINDS, EgressLog, egress_path

    site = _site(site_config)
    log_path = egress_path(site.state_dir)
    try:
        entries = EgressLog(log_path).entries()
    except (json.JSONDecodeError, TypeError) as exc:
        raise _fail(f"{log_path}: unreadable line(s) ({exc}); the log may have been altered", 1) from None
    if run is not None:
        entries = [e for e in entries if e.run == run]
    findings = [e for e in entries if e.kind not in ALLOWED_KINDS]
    per_round: dict[str, int] = defaultdict(int)
    for e in entries:
        per_round[f"{e.run}:{e.round}"] += e.bytes
    if as_json:
        print(
            json.dumps(
                {
                    "entries": len(entries),
                    "bytes": sum(e.bytes for e in entries),
                    "bytes_per_round": per_round,
                    "findings": [e.kind for e in findings],
                    "undelivered": sum(1 for e in entries if e.delivered is False),
                }
            )
        )
    else:
        table = Table(title=f"site {site.name}: egress audit log ({log_path})")
        for col in ("time", "run", "round", "kind", "record", "bytes", "sha256", "sent", "detail"):
            table.add_column(col, overflow="fold")
        shown = entries[-limit:] if limit else entries
        sent = {True: "yes", False: "[yellow]not delivered[/yellow]", None: "-"}
        for e in shown:
            kind = f"[red]{e.kind}[/red]" if e.kind not in ALLOWED_KINDS else e.kind
            table.add_row(
                _when(e.time),
                e.run,
                str(e.round),
                kind,
                e.record,
                f"{e.bytes:,}",
                e.sha256[:16],
                sent[e.delivered],
                e.detail,
            )
        console.print(table)
        if limit and len(entries) > limit:
            console.print(f"(showing the last {limit} of {len(entries)} entries; --limit 0 for all)")
        console.print(f"{len(entries)} message record(s), {sum(e.bytes for e in entries):,} bytes in total")
        if undelivered := sum(1 for e in entries if e.delivered is False):
            console.print(f"{undelivered} record(s) prepared but never taken by the SuperNode: they did not leave")
    if findings:
        kinds = sorted({e.kind for e in findings})
        raise _fail(
            f"{len(findings)} record(s) of kinds not allowed to leave a site: {', '.join(kinds)} "
            f"(allowed: {', '.join(sorted(ALLOWED_KINDS))}); investigate before the next round",
            1,
        )
    if not as_json:
        console.print(f"[green]verified[/green]: only {', '.join(sorted(ALLOWED_KINDS))} ever left this site")


def _ledger_path(site: SiteSpec) -> Path:
    return Path(site.state_dir) / "ledger.sqlite"


@ledger_app.command("verify")
def ledger_verify(site_config: SiteArg) -> None:
    """Integrity check, and a comparison with the high-water mark written after every spend (exit 1 if short)."""
    from fedtune.client.ledger import verify

    site = _site(site_config)
    result = verify(_ledger_path(site))
    for line in result.lines:
        console.print(line, highlight=False)
    if not result.ok:
        raise _fail(f"{_ledger_path(site)}: NOT OK; training is refused until the ledger is restored", 1)
    console.print("[green]ledger ok[/green]")


@ledger_app.command("backup")
def ledger_backup(
    site_config: SiteArg,
    dest: Annotated[Path, typer.Argument(help="New file for the backup (kept off the site's state disk).")],
) -> None:
    """A consistent copy of the ledger (SQLite's online backup API), safe while the agent runs."""
    from fedtune.client.ledger import LedgerError, PrivacyLedger

    site = _site(site_config)
    try:
        with PrivacyLedger(_ledger_path(site)) as ledger:
            state = ledger.backup(dest)
    except LedgerError as exc:
        raise _fail(str(exc), 1) from None
    console.print(f"[green]backed up[/green] {_ledger_path(site)} -> {dest}: {state.spends} spend(s)")


@ledger_app.command("restore")
def ledger_restore(
    site_config: SiteArg,
    backup: Annotated[Path, typer.Argument(help="A file written by `fedtune client ledger backup`.")],
    force: Annotated[
        bool,
        typer.Option(help="Restore a backup older than the high-water mark; the spends it lacks are re-added."),
    ] = False,
) -> None:
    """Replace the ledger with a backup (stop the agent first); refuses a backup older than the high-water mark."""
    from fedtune.client.ledger import LedgerError, restore

    site = _site(site_config)
    try:
        lines = restore(_ledger_path(site), backup, force=force)
    except LedgerError as exc:
        raise _fail(str(exc), 1) from None
    for line in lines:
        console.print(line, highlight=False)
    console.print("[green]restored[/green]; check with `fedtune client ledger verify`")
