"""`fedtune runs`, `fedtune export`, `fedtune console`: the run store from the terminal and the browser."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtune.common.terminal import error_line
from fedtune.server.store import RunStore, StoreError

console = Console()

STORE_ENV = "FEDTUNE_STORE"
# Where `fedtune simulate` and a deployed ServerApp (default output_dir) put their stores.
DEFAULT_STORES = (Path(".fedtune/simulation/store.sqlite"), Path(".fedtune/runs/store.sqlite"))

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help=f"Run store file (default: ${STORE_ENV}, else {' or '.join(map(str, DEFAULT_STORES))}).",
    ),
]


def resolve_store(given: Path | None) -> Path:
    if given is not None:
        return given
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    for candidate in DEFAULT_STORES:
        if candidate.is_file():
            return candidate
    tried = ", ".join(map(str, DEFAULT_STORES))
    raise StoreError(f"no run store found (looked at {tried}); pass --store PATH or set ${STORE_ENV}")


def _open(given: Path | None) -> RunStore:
    try:
        return RunStore(resolve_store(given), readonly=True)
    except StoreError as exc:
        _fail(exc)


def _fail(exc: Exception, code: int = 2) -> NoReturn:
    console.print(error_line(exc))
    raise typer.Exit(code)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_STATUS_STYLE = {"running": "blue", "completed": "green", "failed": "red", "interrupted": "yellow"}


def _status(text: str) -> str:
    return f"[{_STATUS_STYLE.get(text, 'white')}]{text}[/]"


runs_app = typer.Typer(
    help="Runs in the run store: list, show one, write TensorBoard events, log to MLflow.", no_args_is_help=False
)


@runs_app.callback(invoke_without_command=True)
def runs_list(ctx: typer.Context, store: StoreOption = None) -> None:
    """List runs: status, rounds done, latest weighted accuracy."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = store  # `fedtune runs --store X show RUN` means the same as `runs show RUN --store X`
        return
    from fedtune.server.console.views import runs_overview

    with _open(store) as db:
        rows = runs_overview(db)
        table = Table(title=f"runs in {db.path}")
    table.add_column("run", no_wrap=True)
    for col in ("federation", "status", "rounds", "accuracy", "attempts", "started", "finished"):
        table.add_column(col, justify="right" if col in ("rounds", "accuracy", "attempts") else "left")
    for r in rows:
        table.add_row(
            r["id"],
            r["name"],
            _status(r["status"]),
            f"{r['rounds_done']}/{r['rounds_total']}",
            _num(r["accuracy"]),
            str(r["attempts"]),
            _when(r["started"]),
            _when(r["finished"]),
        )
    console.print(table if rows else f"no runs yet in {db.path}")


def _rounds_table(view: dict[str, Any]) -> Table:
    table = Table(title="rounds")
    for col in ("round", "status", "accuracy", "eval loss", "wall s", "trained", "declined", "up KiB", "down KiB"):
        table.add_column(col, justify="left" if col == "status" else "right")
    per_round: dict[int, dict[str, int]] = {}
    for s in view["site_rounds"]:
        c = per_round.setdefault(s["round"], {"trained": 0, "declined": 0})
        c["trained"] += int(bool(s["trained"]))
        c["declined"] += int(bool(s["declined"]))
    bytes_ = {b["round"]: b for b in view["bytes"]}
    for t in view["timeline"]:
        c, b = per_round.get(t["round"], {}), bytes_.get(t["round"], {"up": 0, "down": 0})
        status = t["status"] + (f" (attempt {t['attempt']})" if t["attempt"] > 1 else "")
        table.add_row(
            str(t["round"]),
            _status(status) + (f" [red]{t['error']}[/]" if t["error"] else ""),
            _num(t["accuracy"]),
            _num(t["loss"]),
            _num(t["wall_s"], 1),
            str(c.get("trained", 0)),
            str(c.get("declined", 0)),
            f"{b['up'] / 1024:.1f}",
            f"{b['down'] / 1024:.1f}",
        )
    return table


WORST_NOTE = (
    "epsilon own share alone: a site's epsilon if the server colluded with every other site of the distributed-noise "
    "sums; epsilon spent (charged against the cap) assumes the site's min_honest_sites sites add their noise honestly"
)


def _has_worst(view: dict[str, Any]) -> bool:
    return any(p["epsilon_worst"] is not None for p in view["privacy"])


def _sites_table(view: dict[str, Any]) -> Table:
    table = Table(title="sites: privacy and health")
    worst = _has_worst(view)  # distributed noise: the own-share figure beside the charged one
    numeric = ("epsilon spent", "epsilon own share alone", "cap", "used")
    cols = ("site", "epsilon spent", *(("epsilon own share alone",) if worst else ()), "cap", "used", "status")
    for col in (*cols, "last seen", "declined rounds"):
        table.add_column(col, justify="right" if col in numeric else "left")
    health = {h["site"]: h for h in view["health"]}
    for p in view["privacy"]:
        h = health.get(p["site"], {"status": "-", "last_seen": None, "declined": []})
        declined = "; ".join(f"R{d['round']}: {d['reason']}" for d in h["declined"]) or "none"
        table.add_row(
            p["site"],
            _num(p["epsilon"], 2),
            *((_num(p["epsilon_worst"], 2),) if worst else ()),
            _num(p["cap"], 2),
            "-" if p["fraction"] is None else f"{p['fraction']:.0%}",
            h["status"],
            _when(h["last_seen"]),
            declined,
        )
    return table


def _checkpoints_table(view: dict[str, Any]) -> Table:
    table = Table(title="model versions (export with `fedtune export RUN --round N OUT`)")
    for col in ("round", "accuracy", "sha256", "saved"):
        table.add_column(col)
    accuracy = {t["round"]: t["accuracy"] for t in view["timeline"]}
    for c in view["checkpoints"]:
        table.add_row(str(c["round"]), _num(accuracy.get(c["round"])), c["sha256"][:16] + "...", _when(c["created"]))
    return table


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    store: StoreOption = None,
) -> None:
    """One run: its rounds, each site's epsilon and health, its checkpoints."""
    from fedtune.server.console.views import run_view

    with _open(store or ctx.obj) as db:
        try:
            view = run_view(db, run)
        except StoreError as exc:
            _fail(exc)
    r = view["run"]
    t = view["federation"]["training"]
    secagg = "on" if view["federation"]["secagg"]["enabled"] else "OFF"
    noise = ", distributed noise" if view["federation"].get("privacy", {}).get("noise") == "distributed" else ""
    console.print(
        f"[bold]run {r['id']}[/bold] ({r['name']}) {_status(r['status'])}: {t['rounds']} rounds, "
        f"{t['local_steps']} local steps, secure aggregation {secagg}{noise}"
        f", attempts {r['attempts']}, started {_when(r['started'])}, finished {_when(r['finished'])}"
    )
    if r["error"]:
        console.print(error_line(r["error"]))
    console.print(_rounds_table(view))
    console.print(_sites_table(view))
    if _has_worst(view):
        console.print(WORST_NOTE, highlight=False)
    console.print(_checkpoints_table(view))
    if r["adapter_dir"]:
        console.print(f"final adapter (PEFT format): {r['adapter_dir']}")


@runs_app.command("tensorboard")
def runs_tensorboard(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    log_dir: Annotated[Path, typer.Argument(help="TensorBoard log directory; events go to LOG_DIR/RUN.")],
    store: StoreOption = None,
) -> None:
    """Write a run's metrics as TensorBoard event files (needs the `tensorboard` package)."""
    from fedtune.server.console.tensorboard import TensorBoardUnavailable, write_run

    with _open(store or ctx.obj) as db:
        try:
            out = write_run(db, run, log_dir)
        except (StoreError, TensorBoardUnavailable) as exc:
            _fail(exc)
    console.print(f"events written to {out}; view with `tensorboard --logdir {log_dir}`")


@runs_app.command("mlflow")
def runs_mlflow(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's own default); a local "
            "sqlite:///FILE or file:DIR works offline."
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the federation's name)."),
    ] = None,
    store: StoreOption = None,
) -> None:
    """Log a run to MLflow: its recipe as params, per-round metrics (accuracy, loss, each site's epsilon, bytes,
    wall time) and the final adapter as artifacts (needs `mlflow-skinny`). Run it again to bring the same MLflow
    run up to date: no round is logged twice."""
    from fedtune.server.console.mlflow_sink import MlflowUnavailable, TrackingError, connect, export_run

    with _open(store or ctx.obj) as db:
        try:
            run_id = db.run(run)["id"]  # an unknown run is refused before a tracking store is created
            done = export_run(db, run_id, connect(tracking_uri, experiment))
        except (StoreError, MlflowUnavailable, TrackingError) as exc:
            _fail(exc)
    console.print(escape(done.describe()), highlight=False)


def export_command(
    run: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (created).")],
    round_: Annotated[
        int | None, typer.Option("--round", help="Round to export (default: the newest checkpoint).")
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            help="Fold the adapter into the base model: a Hugging Face model dir (a classifier's carries "
            "modeling_fedtune.py for the federation's pooling: load it with trust_remote_code=True)."
        ),
    ] = False,
    store: StoreOption = None,
) -> None:
    """Export a round's global adapter in PEFT format (or merged into the base model)."""
    from fedtune.common.merged import MergeError, load_hint
    from fedtune.common.model import BaseModelError
    from fedtune.server.console.export import export_round

    if out.exists() and any(out.iterdir()):
        _fail(ValueError(f"{out} exists and is not empty; pick a new directory"))
    with _open(store) as db:
        try:
            done = export_round(db, run, out, round_=round_, merge=merge)
        except (StoreError, BaseModelError, MergeError) as exc:
            _fail(exc)
    what = "merged model" if done.merged else "PEFT adapter"
    line = f"run {done.run} round {done.round}: {what} written to {done.path}"
    if done.merged and done.spec is not None:
        line += "; load it with " + load_hint(done.spec).replace("DIR", str(done.path))
    console.print(escape(line), highlight=False)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def console_command(
    store: StoreOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; loopback unless you mean to expose it.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8470,
    token: Annotated[
        str | None, typer.Option(help="Access token (default: $FEDTUNE_CONSOLE_TOKEN, else a new random one).")
    ] = None,
) -> None:
    """Serve the web console for a run store: runs, live round charts, epsilon, site health, downloads."""
    import uvicorn

    from fedtune.server.console.app import create_app
    from fedtune.server.console.auth import resolve_token

    try:
        path = resolve_store(store)
        secret, generated = resolve_token(token)
    except (StoreError, ValueError) as exc:
        _fail(exc)
    if not _is_loopback(host):
        console.print(
            f"[yellow]warning:[/yellow] listening on {host}, not loopback: the console is plain HTTP, so put it "
            "behind TLS (a reverse proxy or an SSH tunnel) before anyone reaches it over a network"
        )
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    console.print(f"fedtune console for {path}")
    console.print(f"open: http://{shown}:{port}/?token={secret}")
    console.print(
        f"(the page swaps the token for a session cookie and drops it from the address; or sign in at "
        f"http://{shown}:{port}/login; scripts send `Authorization: Bearer TOKEN`)",
        highlight=False,
    )
    if generated:
        console.print("(token generated for this session; set $FEDTUNE_CONSOLE_TOKEN to keep one across restarts)")
    uvicorn.run(create_app(path, secret), host=host, port=port, log_level="warning")


def register_top_level(app: typer.Typer) -> None:
    """Called by `fedtune.cli`: adds `runs`, `export` and `console` to the root command."""
    app.add_typer(runs_app, name="runs")
    app.command("export")(export_command)
    app.command("console")(console_command)
